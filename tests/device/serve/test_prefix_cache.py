"""The prefix cache and chunked prefill (device/serve/prefix_cache.py, device/serve/prefill.py):
answers with a cache hit, after eviction, or read in chunks between other requests' decode steps
are the answers a cold, unchunked request gets; the block copies of both backends (TensorRT's on
the simulated driver) write what they read."""

from __future__ import annotations

import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fake_pycuda  # noqa: E402
import numpy as np
import pytest
from daemon_fixtures import llama_bundle  # noqa: F401 - a fixture
from paths import TOOLS

from bundle.contract import KVCacheLayout
from device.runtime.generate import GREEDY, prefill
from device.runtime.kvcache import StaticKVCache
from device.runtime.runner import load_bundle
from device.runtime.sampling import SamplingParams
from device.serve.prefill import CHUNK_SHARE, CHUNK_STEPS, ChunkSizer
from device.serve.prefix_cache import PrefixCache, block_keys
from device.serve.scheduler import Finished, GenerationRequest, Scheduler, TextDelta

BLOCK = 8  # tokens: the tiny model's cache holds 64


@dataclass
class FakeBlock:
    tokens: int
    nbytes: int
    released: bool = False

    def release(self) -> None:
        self.released = True


def test_lookup_is_an_exact_prefix_in_whole_blocks_never_the_last_token() -> None:
    cache = PrefixCache(1 << 20, block_tokens=4)
    seq = list(range(100, 112))  # 3 blocks
    assert cache.insert(seq, lambda lo, hi: FakeBlock(hi - lo, 10)) == 3
    assert len(cache.lookup(seq)) == 2  # the 12th token's logits are needed: 2 blocks, not 3
    assert len(cache.lookup(seq + [1])) == 3
    assert len(cache.lookup(seq[:4] + [0] + seq[5:] + [1])) == 1  # differs in block 2: block 1 only
    assert cache.lookup([7] + seq[1:] + [1]) == []  # the chain: block 2's tokens alone do not hit
    assert block_keys(seq, 2, 4)[1] != block_keys(seq[4:8] * 2, 2, 4)[1]
    s = cache.status()
    assert (s["hits"], s["misses"], s["tokens_reused"], s["entries"], s["bytes"]) == (3, 1, 24, 3, 30)


def test_lru_evicts_the_ends_of_chains_first_and_budget_0_is_off() -> None:
    cache = PrefixCache(50, block_tokens=2)
    a, b = [1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]
    blocks: list[FakeBlock] = []

    def read(lo: int, hi: int) -> FakeBlock:
        blocks.append(FakeBlock(hi - lo, 10))
        return blocks[-1]

    cache.insert(a, read)
    cache.insert(b, read)  # 60 bytes > 50: the oldest leaf goes, a's last block
    assert cache.bytes == 50 and blocks[2].released and not blocks[0].released
    assert len(cache.lookup(a + [0])) == 2 and len(cache.lookup(b + [0])) == 3
    cache.clear()
    assert cache.bytes == 0 and all(blk.released for blk in blocks)
    off = PrefixCache(0)
    assert off.insert(a, read) == 0 and off.lookup(a) == [] and not off.enabled


def test_time_sized_chunks_converge_to_the_target_and_are_paced_by_decode_time() -> None:
    sizer = ChunkSizer()
    for _ in range(12):  # decode steps of 20 ms; a chunk of n tokens takes 2 ms + 0.1 ms a token
        sizer.observe_decode(0.020)
        n = sizer.size(10_000)
        sizer.observe_prefill(n, 0.002 + 0.0001 * n, chunked=True)
    assert abs(0.002 + 0.0001 * sizer.size(10_000) - CHUNK_STEPS * 0.020) < 0.002
    sizer.credit = 0.0
    ran, decode_time, prefill_time = 0, 0.0, 0.0
    for _ in range(100):  # one iteration: a chunk when paid for, then a decode step
        if sizer.ready():
            ran += 1
            prefill_time += 0.050  # a chunk dearer than a decode step (a CPU)
            sizer.observe_prefill(16, 0.050, chunked=True)
        sizer.observe_decode(0.020)
        decode_time += 0.020
    assert 0 < ran < 100 and prefill_time <= CHUNK_SHARE * decode_time + 0.050
    assert ChunkSizer(5).size(3) == 3 and ChunkSizer(5).ready() and not ChunkSizer(0).enabled


def test_chunks_and_pace_scale_with_the_prompts_waiting() -> None:
    """A burst (7 prompts waiting) reads ~7x as much per decode step as one long prompt
    does, within the 1 + CHUNK_SHARE * waiting bound; one prompt waiting keeps 1 + CHUNK_SHARE."""
    sizes = {}
    for waiting in (1, 7):
        sizer = ChunkSizer()
        for _ in range(12):  # as above: decode 20 ms, a chunk 2 ms + 0.1 ms a token
            sizer.observe_decode(0.020, waiting=waiting)
            n = sizer.size(10_000)
            sizer.observe_prefill(n, 0.002 + 0.0001 * n, chunked=True)
        sizes[waiting] = sizer.size(10_000)
        sizer.credit = 0.0
        decode_time = prefill_time = 0.0
        for _ in range(200):
            if sizer.ready():
                n = sizer.size(10_000)
                prefill_time += 0.002 + 0.0001 * n
                sizer.observe_prefill(n, 0.002 + 0.0001 * n, chunked=True)
            sizer.observe_decode(0.020, waiting=waiting)
            decode_time += 0.020
        assert prefill_time <= CHUNK_SHARE * waiting * decode_time + CHUNK_STEPS * waiting * 0.020
        assert prefill_time >= 0.5 * CHUNK_SHARE * waiting * decode_time
    assert 5 * sizes[1] < sizes[7] < 9 * sizes[1]


def test_the_kv_cache_is_committed_memory_from_the_start() -> None:
    """Every page of a several-slot cache is resident once it exists: a step that first touches
    a slot must not page-fault its rows in (seconds on a board, the first time a batch runs).
    Asked of the kernel page by page (mincore), not through the process's RSS, which reused
    heap memory leaves unchanged."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE

    def resident_fraction(buf: np.ndarray) -> float:
        lo = buf.ctypes.data // page * page
        n = -(-(buf.ctypes.data + buf.nbytes - lo) // page)
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(ctypes.c_void_p(lo), ctypes.c_size_t(n * page), vec) == 0
        return sum(v & 1 for v in vec) / n

    layout = KVCacheLayout(num_layers=4, kv_heads=2, head_dim=64, max_seq=4096, dtype="float32")
    cache = StaticKVCache(layout, slots=4)  # 4 x 2 x 4096 x 64 x 4 B x 8 buffers = 64 MiB
    assert cache.nbytes == 64 << 20
    assert all(resident_fraction(b) == 1.0 for b in cache.buffers)


# --- the tiny model ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(llama_bundle: Path) -> Iterator[Any]:  # noqa: F811
    r = load_bundle(llama_bundle, slots=4, threads=1)
    yield r
    r.close()


def chat(runner: Any, text: str) -> list[int]:
    return runner.tokenizer.encode_chat([{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": text}])


SYSTEM = "you are a robot on the water. look at the time and write what you see of the day"


def run(engine: Scheduler, request: GenerationRequest) -> tuple[str, Finished, list[Any]]:
    with engine.reserve() as ticket:
        handle = engine.submit(ticket, request)
    text, logprobs, final = [], [], None
    for event in handle.events(timeout=60):
        if isinstance(event, TextDelta):
            text.append(event.text)
            logprobs += event.logprobs
        else:
            final = event
    assert isinstance(final, Finished), final
    return "".join(text), final, logprobs + list(final.logprobs)


def same_answer(a: tuple[str, Finished, list[Any]], b: tuple[str, Finished, list[Any]]) -> None:
    assert a[0] == b[0] and a[1].usage == b[1].usage
    assert [t.token for t in a[2]] == [t.token for t in b[2]]
    np.testing.assert_allclose([t.logprob for t in a[2]], [t.logprob for t in b[2]], atol=1e-4)


def test_block_copies_round_trip_and_a_hit_gives_the_cold_logits(runner: Any) -> None:
    backend = runner.backend
    ids = chat(runner, "paris")
    cold = prefill(backend, ids, 0)
    block = backend.read_kv(0, 8, 24)
    assert block.tokens == 16 and block.nbytes == 16 * backend.layout.bytes_per_position
    backend.write_kv(2, 8, block)
    for buf in backend.cache.buffers:
        np.testing.assert_array_equal(buf[2, :, 8:24], buf[0, :, 8:24])
    backend.write_kv(2, 0, backend.read_kv(0, 0, 8))
    warm = backend.step(np.asarray([ids[24:]]), np.arange(24, len(ids))[None], [2],
                        np.array([len(ids) - 25]))[0, -1]
    np.testing.assert_allclose(warm, cold, atol=1e-4)


def test_hits_after_eviction_answer_like_cold_requests(runner: Any) -> None:
    """Requests sharing a system prompt (3 blocks), each with 2 blocks of its own: with a cache of
    5 blocks every new prompt evicts the last one's own blocks, and each answer equals the answer
    without a cache."""
    users = ["cat dog " * 8, "moon star " * 8, "cat dog " * 8, "sun day " * 8, "moon star " * 8]
    prompts = [chat(runner, w) for w in users]
    assert all(p[:24] == prompts[0][:24] and len(p) > 40 for p in prompts)
    reqs = [GenerationRequest(p, 12, logprobs=2,
                              params=SamplingParams(temperature=0.8, seed=i) if i % 2 else GREEDY)
            for i, p in enumerate(prompts)]
    cold = Scheduler(runner.backend, runner.tokenizer)
    cold.start()
    try:
        want = [run(cold, r) for r in reqs]
    finally:
        cold.close()
    block_bytes = BLOCK * runner.backend.layout.bytes_per_position
    warm = Scheduler(runner.backend, runner.tokenizer, prefix_cache_bytes=5 * block_bytes,
                     prefix_block_tokens=BLOCK)
    warm.start()
    try:
        got = [run(warm, r) for r in reqs]
        st = warm.prefix_cache.status()
    finally:
        warm.close()
    for a, b in zip(want, got):
        same_answer(a, b)
    assert st["hits"] == 4 and st["misses"] == 1 and st["evicted"] >= 8  # 2 own blocks each
    assert st["tokens_reused"] == 4 * 24  # the own blocks were evicted before each came back
    assert st["bytes"] <= 5 * block_bytes and warm.prefix_cache.entries == 0  # close() released


Answer = tuple[str, Finished, list[Any]]  # run's: text, the end, logprobs


def next_turn(r: Any, params: SamplingParams = GREEDY) -> tuple[Scheduler, Answer, Answer, dict[str, Any]]:
    """A first turn (16 tokens under `params`) on an engine with the prefix cache, then a next
    turn that continues its prompt and answer: (the warm engine, its answer to the next turn,
    a cold engine's, the prefix cache's status after it), each answer (text, Finished, logprobs)."""
    first = chat(r, "cat")  # 29 tokens: 3 whole blocks
    block_bytes = BLOCK * r.backend.layout.bytes_per_position
    warm = Scheduler(r.backend, r.tokenizer, prefix_cache_bytes=64 * block_bytes, prefix_block_tokens=BLOCK)
    warm.start()
    try:
        answer = [t.token for t in run(warm, GenerationRequest(first, 16, logprobs=0, ignore_eos=True,
                                                              params=params))[2]]
        follow = GenerationRequest(first + answer + r.tokenizer.encode("dog sun"), 8, logprobs=2)
        got = run(warm, follow)
        st = warm.prefix_cache.status()
    finally:
        warm.close()
    cold = Scheduler(r.backend, r.tokenizer)
    cold.start()
    try:
        want = run(cold, follow)
    finally:
        cold.close()
    # blocks written: the prompt and the answer but its last token (never stepped)
    st["written"] = (len(first) + len(answer) - 1) // BLOCK * BLOCK
    st["prompt_blocks"] = len(first) // BLOCK * BLOCK
    return warm, got, want, st


def test_the_next_turn_of_a_chat_hits_the_stored_answer_too(runner: Any) -> None:
    """At finish the prompt and the answer are stored: a prompt that continues them (the next
    turn) reuses blocks beyond the first prompt's, and answers like a cold request."""
    _, got, want, st = next_turn(runner)
    same_answer(got, want)
    assert st["tokens_reused"] == st["written"] > st["prompt_blocks"]


def test_a_one_slot_engine_reuses_a_sampled_answer_exactly(llama_bundle: Path) -> None:  # noqa: F811
    """One slot with the spare's attention form (the default bundles' engine): a sampled row
    steps with the spare too, as it costs nothing there, so its keys/values are what a prompt's
    read writes. The next turn reuses the answer's blocks and answers as a cold engine does.
    (Stepped without the spare, the answer's rows differed in the last bits and were not stored
    at all.)"""
    one = load_bundle(llama_bundle, slots=1, threads=1)
    try:
        warm, got, want, st = next_turn(one, SamplingParams(temperature=0.9, seed=3))
    finally:
        one.close()
    assert warm.spare == "attention"
    assert [t.token for t in got[2]] == [t.token for t in want[2]]
    assert [t.logprob for t in got[2]] == [t.logprob for t in want[2]]  # bit for bit
    assert st["tokens_reused"] == st["written"] > st["prompt_blocks"]


def test_requests_admitted_together_hit_what_the_first_stored(runner: Any) -> None:
    """A burst of one prompt (as n > 1 choices are): the cache is looked up when a prefill
    starts, not at admission, so all but the first reuse the first one's blocks."""
    block_bytes = BLOCK * runner.backend.layout.bytes_per_position
    engine = Scheduler(runner.backend, runner.tokenizer, prefix_cache_bytes=64 * block_bytes,
                       prefix_block_tokens=BLOCK)
    req = GenerationRequest(chat(runner, "cat dog sun"), 6, logprobs=1)
    handles = []
    for _ in range(3):  # queued before the engine runs: its first iteration admits all three
        with engine.reserve() as ticket:
            handles.append(engine.submit(ticket, req))
    engine.start()
    try:
        out = []
        for h in handles:
            events = list(h.events(timeout=60))
            final = events[-1]
            assert isinstance(final, Finished)
            text = "".join(e.text for e in events if isinstance(e, TextDelta))
            lps = [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]
            out.append((text, final, lps + list(final.logprobs)))
        st = engine.prefix_cache.status()
    finally:
        engine.close()
    for other in out[1:]:
        same_answer(out[0], other)
    assert (st["hits"], st["misses"]) == (2, 1)


def test_the_first_token_streams_before_the_prompt_is_stored(runner: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Storing a prompt copies its whole cache blocks (SmolLM2, 128 tokens: ~3 ms), which the
    time to first token paid: the first token now goes out first. A request that ends on its
    first token has its prompt stored all the same."""
    from device.serve.scheduler import RequestHandle

    block_bytes = BLOCK * runner.backend.layout.bytes_per_position
    engine = Scheduler(runner.backend, runner.tokenizer, prefix_cache_bytes=64 * block_bytes,
                       prefix_block_tokens=BLOCK)
    order: list[str] = []  # on the engine thread: what it sent and stored, in turn
    store, put = engine.prefix_cache.insert, RequestHandle.put

    def insert(tokens: Any, read: Any) -> Any:
        order.append(f"store {len(tokens)}")
        return store(tokens, read)

    def record(handle: RequestHandle, event: Any) -> None:
        order.append(type(event).__name__)
        put(handle, event)

    engine.prefix_cache.insert = insert  # type: ignore[method-assign]
    monkeypatch.setattr(RequestHandle, "put", record)
    long, short = chat(runner, "sun moon"), chat(runner, "rain snow")
    engine.start()
    try:
        run(engine, GenerationRequest(long, 3, ignore_eos=True))
        run(engine, GenerationRequest(short, 1))  # ends on its first token
        st = engine.prefix_cache.status()
    finally:
        engine.close()
    assert order[:2] == ["TextDelta", f"store {len(long)}"]
    assert order[-2:] == ["Finished", f"store {len(short)}"]  # the short one: stored as it ended
    assert st["entries"] >= len(long) // BLOCK


class RecordingBackend:
    """Delegates to the real backend; records every step's (T, slots) and sleeps `delay` in
    decode steps (a device on which decoding takes time)."""

    def __init__(self, backend: Any, delay: float = 0.0) -> None:
        self.inner, self.delay = backend, delay
        self.slots, self.max_seq, self.vocab_size = backend.slots, backend.max_seq, backend.vocab_size
        self.steps: list[tuple[int, list[int]]] = []

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
        if ids.shape[1] == 1:
            time.sleep(self.delay)
        self.steps.append((ids.shape[1], list(slots)))
        return self.inner.step(ids, pos, slots, *rest)

    def read_kv(self, *args: Any) -> Any:
        return self.inner.read_kv(*args)

    def write_kv(self, *args: Any) -> None:
        self.inner.write_kv(*args)


def concurrent(engine: Scheduler, reqs: list[GenerationRequest], last_after: float) -> list[Any]:
    """The requests but the last at once; the last `last_after` seconds later."""
    out: list[Any] = [None] * len(reqs)

    def worker(i: int) -> None:
        out[i] = run(engine, reqs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads[:-1]:
        t.start()
    time.sleep(last_after)
    threads[-1].start()
    for t in threads:
        t.join(60)
    return out


def test_a_long_prompt_is_read_in_chunks_between_the_others_decode_steps(runner: Any) -> None:
    long_prompt = chat(runner, " ".join(["the water of the day"] * 5))
    assert len(long_prompt) > 40
    reqs = [GenerationRequest(chat(runner, w), 40, ignore_eos=True) for w in ("cat", "dog", "sun")]
    reqs.append(GenerationRequest(long_prompt, 8, logprobs=2))
    results = {}
    for mode, chunk in (("off", 0), ("chunked", 6)):
        rec = RecordingBackend(runner.backend, delay=0.005)
        engine = Scheduler(rec, runner.tokenizer, decode_mode="batched",  # type: ignore[arg-type]
                           prefill_chunk=chunk, speculate="off")  # drafts would be T>1 steps too
        rec.steps.clear()
        engine.start()
        try:
            results[mode] = (concurrent(engine, reqs, last_after=0.1), list(rec.steps),
                             engine.metrics.prefill_chunks.get())
        finally:
            engine.close()
    (off, off_steps, _), (chunked, steps, n_chunks) = results["off"], results["chunked"]
    for a, b in zip(off, chunked):
        same_answer(a, b)
    long_slot = 3
    reads = [i for i, (T, sl) in enumerate(steps) if sl == [long_slot] and T > 1]
    assert len(reads) == -(-len(long_prompt) // 6)  # in chunks of 6 tokens
    assert n_chunks >= len(reads)  # (the 2nd and 3rd short prompts came in chunks too)
    assert all(steps[i][0] <= 6 for i in reads)
    between = [steps[i + 1] for i in reads[:-1]]
    assert all(T == 1 and 0 in sl for T, sl in between)  # the others decoded after every chunk
    assert [T for T, sl in off_steps if sl == [long_slot]] == [len(long_prompt)]  # off: one read


def test_a_request_cancelled_while_prefilling_frees_its_slot(runner: Any) -> None:
    rec = RecordingBackend(runner.backend, delay=0.02)
    engine = Scheduler(rec, runner.tokenizer, prefill_chunk=2)  # type: ignore[arg-type]
    engine.start()
    try:
        with engine.reserve() as t:
            busy = engine.submit(t, GenerationRequest(chat(runner, "cat"), 40, ignore_eos=True))
        assert isinstance(busy.next_event(10), TextDelta)
        with engine.reserve() as t:
            late = engine.submit(t, GenerationRequest(chat(runner, "dog day"), 4))
        deadline = time.monotonic() + 5
        while not engine._prefilling and time.monotonic() < deadline:
            time.sleep(0.005)
        assert engine._prefilling and engine.running == 2
        late.cancel()
        while engine._prefilling and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not engine._prefilling and engine.running == 1
        assert late.next_event(0.1) is None  # no event after a cancel
        busy.cancel()
        assert engine.wait_idle(5) and engine.admission.in_flight == 0
    finally:
        engine.close()


# --- TensorRT's block copies, on the simulated driver -----------------------------------------

@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    return fake_pycuda.install(monkeypatch)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_trt_block_copies_match_the_host_cache(fake_cuda: types.ModuleType, dtype: str,
                                               tmp_path: Path) -> None:
    import importlib.util

    tool = TOOLS / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", tool)
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    layout = KVCacheLayout(num_layers=2, kv_heads=2, max_seq=24, head_dim=4, dtype=dtype)
    b = gpu_check.EnginelessBackend(tmp_path / "none.plan", layout, 16, slots=3)
    ref = StaticKVCache(layout, 3)
    rng = np.random.default_rng(0)
    for buf, want in zip(b._cache, ref.buffers):  # random contents in both caches
        want[:] = rng.standard_normal(want.shape).astype(dtype)
        b._cuda_ctx.push()
        try:
            fake_cuda.memcpy_htod(buf, want)
        finally:
            fake_cuda.Context.pop()
    try:
        block = b.read_kv(1, 5, 13)
        assert block.tokens == 8 and block.nbytes == 8 * layout.bytes_per_position
        b.write_kv(2, 11, block)
        ref.write_block(2, 11, ref.read_block(1, 5, 13))
        b._cuda_ctx.push()
        try:
            for buf, want in zip(b._cache, ref.buffers):
                got = np.empty_like(want)
                fake_cuda.memcpy_dtoh(got, buf)
                np.testing.assert_array_equal(got, want)
        finally:
            fake_cuda.Context.pop()
        used = fake_cuda.memory.used()
        block.release()
        assert fake_cuda.memory.used() == used - block.nbytes
        block.release()  # twice: nothing
        kept = b.read_kv(0, 0, 4)
    finally:
        b.close()
    assert fake_cuda.memory.blocks == {}  # close() freed the block still held
    with pytest.raises(Exception, match="closed"):
        b.read_kv(0, 0, 4)
    kept.release()
