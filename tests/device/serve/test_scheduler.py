"""The engine in-process: continuous batching gives each request what it gets alone, stops,
budgets, admission, cancellation and the batch-invariance probe."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_fixtures import llama_bundle  # noqa: F401 - a fixture
from engine_helpers import OnlyTokens, SlowBackend, prompt, run

from bundle.errors import ToolkitError
from device.runtime.generate import generate
from device.runtime.runner import load_bundle
from device.runtime.sampling import SamplingParams
from device.serve.scheduler import (
    Failed,
    Finished,
    GenerationRequest,
    RequestRejected,
    Scheduler,
    TextDelta,
    probe_batch_invariance,
)


@pytest.fixture(scope="module")
def runner(llama_bundle: Path) -> Any:  # noqa: F811
    r = load_bundle(llama_bundle, slots=4, threads=1)
    yield r
    r.close()


@pytest.fixture
def engine(runner: Any) -> Iterator[Scheduler]:
    s = Scheduler(runner.backend, runner.tokenizer, queue_limit=8)
    s.start()
    yield s
    s.close()


WORDS = "cat dog tree road car sun moon star".split()


def requests(runner: Any) -> list[GenerationRequest]:
    """Greedy and seeded-sampling requests with prompts of different lengths."""
    out = []
    for i, w in enumerate(WORDS):
        params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, seed=i) if i % 2 else SamplingParams()
        out.append(GenerationRequest(prompt(runner, " ".join([w] * (i + 1))), 24, params))
    return out


def test_concurrent_requests_equal_each_request_alone(engine: Scheduler, runner: Any) -> None:
    reqs = requests(runner)
    alone = [run(engine, r) for r in reqs]
    together: list[Any] = [None] * len(reqs)

    def worker(i: int) -> None:
        together[i] = run(engine, reqs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert engine.batched, "ONNX Runtime CPU decode proved batch-invariant at start"
    for (text_a, fin_a), (text_b, fin_b) in zip(alone, together):
        assert text_a == text_b and fin_a.usage.completion_tokens == fin_b.usage.completion_tokens
    # greedy through the engine == the single-request loop that parity checks at convert time
    tok = runner.tokenizer
    ref = tok.decode(list(generate(runner.backend, reqs[0].prompt_ids, 24, stop_ids=tok.stop_ids)))
    assert alone[0][0] == ref


def test_stop_string_cuts_the_text(engine: Scheduler, runner: Any) -> None:
    req = requests(runner)[0]
    full, _ = run(engine, req)
    words = full.split()
    stop = words[len(words) // 2]
    cut, fin = run(engine, GenerationRequest(req.prompt_ids, req.max_tokens, req.params, (stop,)))
    assert fin.finish_reason == "stop" and fin.stop_reason == stop
    assert cut == full[:full.index(stop)]


def test_max_tokens_is_bounded_by_the_cache(engine: Scheduler, runner: Any) -> None:
    ids = prompt(runner, "cat " * 50)
    assert engine.check_prompt(len(ids)) == 64 - len(ids)
    _, fin = run(engine, GenerationRequest(ids, 1000))
    assert fin.finish_reason == "length" and fin.usage.completion_tokens == 64 - len(ids)
    with pytest.raises(RequestRejected) as e:
        engine.check_prompt(64)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_admission_rejects_beyond_slots_plus_queue(runner: Any) -> None:
    s = Scheduler(runner.backend, runner.tokenizer, queue_limit=2)  # not started: nothing runs
    tickets = [s.reserve() for _ in range(6)]
    with pytest.raises(RequestRejected) as e:
        s.reserve()
    assert e.value.status == 503 and e.value.code == "overloaded"
    tickets[0].release()
    s.reserve()  # the released place is free again
    s.begin_drain()
    with pytest.raises(RequestRejected) as e:
        s.reserve()
    assert e.value.code == "draining"


def test_cancel_frees_the_slot_and_the_queued_request_runs(runner: Any) -> None:
    slow = SlowBackend(runner.backend, 0.01)
    slow.slots = 1  # one slot (of the real backend's four): the second request must wait
    s = Scheduler(slow, runner.tokenizer, queue_limit=1, decode_mode="batched")  # type: ignore[arg-type]
    s.start()
    try:
        with s.reserve() as t1:
            first = s.submit(t1, GenerationRequest(prompt(runner, "cat"), 50))
        assert isinstance(first.next_event(5), TextDelta)
        with s.reserve() as t2:
            second = s.submit(t2, GenerationRequest(prompt(runner, "dog"), 3))
        with pytest.raises(RequestRejected):  # 1 running + 1 queued = full
            s.reserve()
        assert s.running == 1 and s.waiting == 1
        first.cancel()
        events = list(second.events(timeout=10))
        assert isinstance(events[-1], Finished) and events[-1].finish_reason == "length"
        assert s.wait_idle(5) and s.running == 0 and s.admission.in_flight == 0
    finally:
        s.close()


def test_decode_steps_use_preallocated_views_of_one_contiguous_span(runner: Any) -> None:
    slow = SlowBackend(runner.backend, 0.0)
    s = Scheduler(slow, runner.tokenizer, decode_mode="batched")  # type: ignore[arg-type]
    slow.calls.clear()  # the start-up smoke test is not a decode step of the engine
    s.start()
    try:
        done = []
        threads = [threading.Thread(target=lambda w=w: done.append(run(s, GenerationRequest(
            prompt(runner, w), 10)))) for w in WORDS[:3]]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        decodes = [c for c in slow.calls if c[0].shape[1] == 1]
        assert decodes and all(ids.base is s._ids and pos.base is s._pos for ids, pos, _ in decodes)
        assert all(sl == list(range(sl[0], sl[-1] + 1)) for _, _, sl in decodes)
        assert max(len(sl) for _, _, sl in decodes) > 1  # they did run together
    finally:
        s.close()


def _burst(runner: Any, burst_tokens: int | None, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Three requests queued before the engine starts (one burst), run to the end: the
    (rows, tokens) of every engine step, in order."""
    import device.serve.scheduler as sched

    if burst_tokens is not None:
        monkeypatch.setattr(sched, "BURST_TOKENS", burst_tokens)
    slow = SlowBackend(runner.backend, 0.0)
    s = Scheduler(slow, runner.tokenizer, decode_mode="batched", prefill_chunk=0,  # type: ignore[arg-type]
                  speculate="off")
    slow.calls.clear()  # the start-up smoke test and probe
    handles = []
    for w in WORDS[:3]:
        with s.reserve() as t:
            handles.append(s.submit(t, GenerationRequest(prompt(runner, w), 6)))
    s.start()
    try:
        for h in handles:
            assert isinstance(list(h.events(timeout=30))[-1], Finished)
    finally:
        s.close()
    return [(ids.shape[0], ids.shape[1]) for ids, _, _ in slow.calls]


def test_a_burst_is_prefilled_before_its_first_decode_step(runner: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that reach an idle engine together start decoding together (full batches from
    the first step), instead of one prefill between each decode step."""
    steps = _burst(runner, None, monkeypatch)
    assert [rows for rows, _ in steps[:3]] == [1, 1, 1] and all(t > 1 for _, t in steps[:3])
    assert all(rows == 3 and t == 1 for rows, t in steps[3:])  # every decode step holds all three
    # budgets that hold one prompt (the first is read whatever the budget) and two: the burst
    # ends there, and the rest are read between decode steps (as prompts arriving while others
    # decode are)
    for budget, together in ((1, 1), (sum(len(prompt(runner, w)) for w in WORDS[:2]), 2)):
        steps = _burst(runner, budget, monkeypatch)
        prefills = [i for i, (_, t) in enumerate(steps) if t > 1]
        first_decode = next(i for i, (_, t) in enumerate(steps) if t == 1)
        assert len(prefills) == 3 and prefills[:together] == list(range(together))
        assert first_decode == together  # the prompts that fit, then decoding begins


class NoisyBackend(SlowBackend):
    """A backend whose rows differ in the last bits with the batch size (so neither a lone row
    alone nor one paired with a padding row equals it batched)."""

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
        out = super().step(ids, pos, slots, *rest)
        return out + np.float32(1e-6) * (ids.shape[0] - 1)


class OneRowKernel(SlowBackend):
    """A backend whose one-row steps alone round differently (as 4-bit MatMulNBits does)."""

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
        out = super().step(ids, pos, slots, *rest)
        return out + np.float32(1e-6) * (ids.shape[0] == 1)


def test_a_lone_row_steps_paired_where_only_one_row_steps_differ(runner: Any) -> None:
    odd = OneRowKernel(runner.backend, 0.0)
    assert probe_batch_invariance(odd) == "paired"  # type: ignore[arg-type]
    s = Scheduler(odd, runner.tokenizer, speculate="off")  # type: ignore[arg-type]
    assert s.decode_mode == "batched" and s.pair_lone
    s.start()
    try:
        odd.calls.clear()
        text, fin = run(s, requests(runner)[0])
        assert fin.usage.completion_tokens == 24 and text
    finally:
        s.close()
    decode = [len(slots) for ids, _, slots in odd.calls if ids.shape[1] == 1]
    assert decode and min(decode) == 2  # every decode step of the lone row had two rows


def test_probe_falls_back_to_per_row_steps_when_batches_differ(runner: Any) -> None:
    assert probe_batch_invariance(runner.backend)
    noisy = NoisyBackend(runner.backend, 0.0)
    assert not probe_batch_invariance(noisy)  # type: ignore[arg-type]
    s = Scheduler(noisy, runner.tokenizer)  # type: ignore[arg-type]
    assert s.decode_mode == "per-row"
    s.start()
    try:
        text, fin = run(s, requests(runner)[0])
        assert fin.usage.completion_tokens == 24 and text
    finally:
        s.close()


def test_backend_failure_fails_the_request_and_the_engine_lives(runner: Any) -> None:
    class Broken(SlowBackend):
        fail = False

        def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
            if self.fail and ids.shape[1] == 1:
                raise RuntimeError("simulated device fault")
            return super().step(ids, pos, slots, *rest)

    broken = Broken(runner.backend, 0.0)
    s = Scheduler(broken, runner.tokenizer, decode_mode="batched")  # type: ignore[arg-type]
    s.start()
    broken.fail = True  # after the start-up smoke test, which would refuse to start otherwise
    try:
        with s.reserve() as t:
            h = s.submit(t, GenerationRequest(prompt(runner, "cat"), 5))
        events = list(h.events(timeout=10))
        assert isinstance(events[-1], Failed) and events[-1].status == 500
        broken.fail = False
        _, fin = run(s, GenerationRequest(prompt(runner, "cat"), 5))
        assert fin.finish_reason == "length"
    finally:
        s.close()


def test_a_bundle_that_cannot_run_refuses_to_start(runner: Any) -> None:
    class Dead(SlowBackend):
        def step(self, *args: Any) -> np.ndarray:
            raise RuntimeError("no such input: logits_index")

    with pytest.raises(ToolkitError, match="test inference fails: no such input"):
        Scheduler(Dead(runner.backend, 0.0), runner.tokenizer)  # type: ignore[arg-type]


def test_constrained_and_free_rows_share_a_batch(engine: Scheduler, runner: Any) -> None:
    """A constrained request gets exactly what its mask allows, and the free requests decoding in
    the same batched steps get what they get alone: the mask touches only its own row."""
    free = requests(runner)[:3]
    alone = [run(engine, r) for r in free]
    tok = runner.tokenizer
    forced = tok.encode("sun moon star sun moon", add_special_tokens=False)
    results: list[Any] = [None] * 4

    def worker(i: int) -> None:
        if i == 3:
            results[i] = run(engine, GenerationRequest(
                prompt(runner, "tree"), 24, SamplingParams(temperature=0.9, seed=1),
                constraint=OnlyTokens(forced, runner.backend.vocab_size)))  # type: ignore[arg-type]
        else:
            results[i] = run(engine, free[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    text, fin = results[3]
    assert text == tok.decode(forced) and fin.finish_reason == "stop" and fin.usage.completion_tokens == 5
    for (text_a, fin_a), (text_b, fin_b) in zip(alone, results[:3]):
        assert text_a == text_b and fin_a.usage.completion_tokens == fin_b.usage.completion_tokens


def test_greedy_fast_path_picks_what_the_float64_path_picks() -> None:
    """sample()'s greedy shortcut (argmax of the float32 row) against the full float64 path,
    on rows with ties, infinities and NaNs."""
    from device.runtime import sampling

    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(64).astype(np.float32) for _ in range(4)]
    rows[1][[5, 9]] = rows[1].max() + 1  # a tie: the first wins
    rows[2][[3, 7]] = np.inf
    rows[3][:] = -np.inf
    nan_row = rng.standard_normal(64).astype(np.float32)
    nan_row[[2, 40]] = np.nan
    rows.append(nan_row)
    greedy = SamplingParams()
    for row in rows:
        z = np.nan_to_num(row.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
        want = 0 if not np.isfinite(z).any() else int(np.argmax(z))
        assert sampling.sample(row, greedy, np.random.default_rng(1)) == want
