"""Serving benchmark: this daemon beside llama.cpp's llama-server on the same weights, as a service.

    python bench/serve.py [--quick] [--rounds 2] [--json out.json]

For each precision (fp32, int8, int4: the default bundles, i.e. what `toolkit convert
smollm2-135m [--precision P]` writes, converted/quantized once into ~/.cache/toolkit-bench/) and
its matched llama.cpp GGUF (bench/peers.py MATCHED: F32, Q8_0, Q4_1, all from the packaged Q4_1):
  single stream   a 128-token prompt, 128 greedy tokens (EOS ignored): decode tok/s and TTFT of
                  the daemon, of this runtime in-process, of onnxruntime-genai and llama-server
  concurrency c   c = 1, 2, 4, 8 streams at once, each its own prompt: aggregate decode tok/s
                  (the tokens after the last stream's first token, up to the last token) and
                  p50/p95 time per output token (the gaps between tokens of every stream,
                  pooled: a stall, such as another request's prefill, shows)
  drafting off    the daemon again with --speculate off: single stream, c = 1 and c = 8. The
                  default drafts at every c (every row's draft in the decode step itself where
                  the bundle has a ragged graph: device/serve/scheduler.py), so its c=8 / c=1
                  mixes drafting's gain at c=1 into batching's; this row is batching alone
  open questions  the default daemon again at c = 1 and c = 8, on chat questions whose answers
                  copy nothing (OPEN_QUESTIONS). The bench's 128-token prompts repeat a paragraph
                  and SmolLM2's greedy continuation repeats it too, which prompt-lookup drafting
                  turns into ~15 tokens a step at c = 1; this row is c=8 / c=1 with the defaults
                  where drafts seldom hold
  step ratio      in-process, the same bundle (bench/verify_batch.py): one [8, 16] step of the
                  ragged graph against 8 one-row [1, 16] steps, positions a second of the one
                  over the other. With drafting, c = 1 on the bench's prompts already steps ~16
                  positions ([1, 16]) and c = 8 steps [8, 16], so this is about what the
                  daemon's c=8 / c=1 can be (if every draft token were kept at both and the
                  daemon cost nothing; c = 1 keeps fewer, so the daemon may land either side)
The servers run with --threads / -t THREADS and as many slots as streams (issue 20: slots =
concurrency): c streams go to a server started with c slots (`toolkit serve --slots c`,
`llama-server -np c -c c*2048 --cont-batching`), c = 1 being the daemon as `toolkit serve
BUNDLE` starts it (the bundle's one slot: a one-slot engine steps greedy rows with a spare token
and drafts at every precision, convert/spare_token.py; with several slots the engine steps
jointly, with the same exactness: convert/ragged.py), where the single stream runs too. Each
server is its own process, started fresh for each c every round; rounds interleave the variants
(rotating order) and every ratio is the median over rounds of that round's ratio, so load from
other work on a shared machine cancels out. Then, for the daemon alone (fp32 default bundle):
  prefix cache    a 600-token shared system prompt: TTFT of a request that hits the prefix cache
                  over a cold one (--prefix-cache-mb), and whether the answers are identical
  chunked prefill 3 streams decoding while one 1,500-token prompt arrives: the 3's p95 TPOT with
                  --prefill-chunk auto (the default) and off (the whole prompt at once), over
                  their p95 without it, and the longest gap; with the defaults (the 3 draft)
                  and again with --speculate off (plain decode steps between the chunks)
  drafting        an extraction prompt whose answer copies it: tok/s with --speculate ngram over
                  --speculate off, identical output, and the same ratio on the plain benchmark
Those rows print "n/a (daemon has no --flag)" when `toolkit serve --help` lacks the flag.
Perplexity of each matched pair over quantize/data/heldout.txt (ours from the bundle, llama.cpp's
from llama-cpp-python's logits) shows that the pairs are of matched quality.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.decode import BenchDaemon, default_bundle, stop  # noqa: E402
from bench.pareto import paired_ratio as median_ratio  # noqa: E402
from bench.peers import (  # noqa: E402
    MATCHED,
    LlamaCpp,
    Skipped,
    genai_model,
    gguf,
    llama_cpp,
    llama_cpp_python,
    llama_env,
)

PRECISIONS = tuple(MATCHED)  # fp32, int8, int4
CONCURRENCY = (1, 2, 4, 8)  # streams at once, each on a server of that many slots
MAX_SEQ = 2048  # the cpu target's default, which the default bundles have
PROMPT_TOKENS = 128
PPL_TOKENS = 512  # held-out tokens scored per model (two windows of 256)
PROMPT_TEXT = ("The Jetson Orin Nano is a small computer for robots and cameras. It has a GPU with "
               "tensor cores, a six-core ARM CPU and eight gigabytes of memory that the CPU and the "
               "GPU share. Engineers use it to run vision models and, more and more, small language "
               "models close to the sensors, where a network link is slow or absent. ")
# the flags of other work on the daemon: each row needs its flag in `toolkit serve --help`
PREFIX_FLAG, CHUNK_FLAG, SPEC_FLAG = "--prefix-cache-mb", "--prefill-chunk", "--speculate"


@dataclass(frozen=True)
class Settings:
    threads: int
    rounds: int
    new_tokens: int  # single stream
    conc_tokens: int  # per stream at concurrency c


@dataclass(frozen=True)
class Stream:
    """One streamed request as the client saw it."""

    t0: float  # request sent
    stamps: tuple[float, ...]  # arrival of each token's event
    tokens: int  # completion tokens (the server's count)
    text: str

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.t0

    @property
    def tok_s(self) -> float:
        """Decode tokens/s: the tokens after the first over the time they took."""
        span = self.stamps[-1] - self.stamps[0]
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


@dataclass(frozen=True)
class Concurrent:
    """c streams at once: aggregate decode tokens/s and the pooled inter-token gaps."""

    agg_tok_s: float
    p50_tpot: float
    p95_tpot: float
    max_gap: float = 0.0  # the longest stall any stream saw


def aggregate(streams: Sequence[Stream]) -> Concurrent:
    """Aggregate decode tokens/s once every stream decodes: the tokens that arrive after the
    last stream's first token (the c prompts' prefills are behind), up to the last token of
    all, over that span. It ended at the first stream's last token before (the window in which
    all decode), which holds a handful of tokens where drafting streams arrive in runs and end
    at different times: one round of 4 drafting streams measured 30.9 tok/s in it against 151
    the round before (2026-12-04); the tail where fewer streams remain is counted instead.
    When a stream ends before the last one starts (no moment when all decode), the whole span
    from the first first token to the last token. TPOT percentiles pool the gaps between tokens
    of every stream, stalls included."""
    lo, hi = max(s.stamps[0] for s in streams), max(s.stamps[-1] for s in streams)
    decoded = sum(1 for s in streams for t in s.stamps if t > lo)
    span = hi - lo
    if min(s.stamps[-1] for s in streams) <= lo or span <= 0:
        span = hi - min(s.stamps[0] for s in streams)
        decoded = sum(s.tokens - 1 for s in streams)
    gaps = sorted(g for s in streams for g in s.gaps())
    return Concurrent(decoded / span if span > 0 else 0.0, percentile(gaps, 50), percentile(gaps, 95),
                      gaps[-1] if gaps else 0.0)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of sorted `values` (numpy's default method)."""
    if not values:
        return 0.0
    k = (len(values) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def has_flag(help_text: str, flag: str) -> bool:
    """Whether `toolkit serve --help` lists `flag` (as an option, not inside another's name)."""
    return any(tok.rstrip(",=") == flag for line in help_text.splitlines() for tok in line.split())


# --- servers ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server in its own process and a streaming client; `open()` waits until it is ready."""

    name = ""
    proc: subprocess.Popen[bytes]

    def stream(self, ids: list[int], n: int, ignore_eos: bool = True) -> Stream:
        raise NotImplementedError

    def _wait(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not listening yet (DaemonError, OSError, ...)
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"{self.name} did not become ready")

    def close(self) -> None:
        stop(self.proc)


class Daemon(Server):
    """`toolkit serve BUNDLE` on a private Unix socket (bench/decode.py's launcher)."""

    name = "daemon"

    def __init__(self, bundle: Path, threads: int, slots: int | None = None,
                 flags: Sequence[str] = ()) -> None:
        """slots None: the bundle's own (what `toolkit serve BUNDLE` starts with)."""
        self.daemon = BenchDaemon(bundle, threads, [*(["--slots", str(slots)] if slots else []), *flags])
        self.proc, self.client = self.daemon.proc, self.daemon.client

    def stream(self, ids: list[int], n: int, ignore_eos: bool = True) -> Stream:
        body = {"prompt": ids, "max_tokens": n, "temperature": 0, "ignore_eos": ignore_eos,
                "stream_options": {"include_usage": True}}
        t0, stamps, text, tokens = time.perf_counter(), [], [], 0
        for event in self.client.stream("/v1/completions", body):
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                stamps.append(time.perf_counter())
                text.append(event["choices"][0]["text"])
        return Stream(t0, tuple(stamps), tokens, "".join(text))

    def close(self) -> None:
        self.daemon.close()


class LlamaServer(Server):
    """llama.cpp's llama-server: `slots` parallel slots of MAX_SEQ each, continuous batching."""

    name = "llama-server"

    def __init__(self, lc: LlamaCpp, model: Path, threads: int, slots: int = 1) -> None:
        self.port = _free_port()
        cmd = [str(lc.server), "-m", str(model), "-np", str(slots), "-c", str(slots * MAX_SEQ),
               "--cont-batching", "-t", str(threads), "-tb", str(threads), "-ngl", "0",
               "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=llama_env(lc), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self._wait(self._ready)

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def _ready(self) -> bool:
        conn = self._conn()
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    def stream(self, ids: list[int], n: int, ignore_eos: bool = True) -> Stream:
        # cache_prompt off: every request prefills its whole prompt, as the daemon's plain rows do
        body = {"prompt": ids, "n_predict": n, "temperature": 0, "top_k": 1, "ignore_eos": ignore_eos,
                "stream": True, "cache_prompt": False}
        conn = self._conn()
        t0, tokens = time.perf_counter(), 0
        stamps: list[float] = []
        text: list[str] = []
        try:
            conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise RuntimeError(f"llama-server: {resp.status} {resp.read()[:200]!r}")
            for line in resp:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("stop"):
                    tokens = int(event.get("timings", {}).get("predicted_n", len(stamps)))
                    break
                stamps.append(time.perf_counter())  # one event per token, text or not
                text.append(event.get("content", ""))
        finally:
            conn.close()
        return Stream(t0, tuple(stamps), tokens, "".join(text))


def run_concurrent(server: Server, prompts: list[list[int]], n: int,
                   starts: Sequence[float] | None = None) -> list[Stream]:
    """One streamed request per prompt, all at once (or each `starts[i]` seconds after the first)."""
    out: list[Stream | None] = [None] * len(prompts)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            if starts:
                time.sleep(starts[i])
            out[i] = server.stream(prompts[i], n)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [s for s in out if s is not None]


# --- prompts, bundles ------------------------------------------------------------------------

def tokenizer() -> Any:
    from device.runtime.runner import load_bundle

    tok = load_bundle(default_bundle("fp32"), slots=1, threads=1).tokenizer
    assert tok is not None, "a decoder bundle carries its tokenizer"
    return tok


def prompt_ids(tok: Any, n: int, variant: int = 0) -> list[int]:
    """n token ids of PROMPT_TEXT; `variant` k starts k words in, so prompts differ from the start."""
    words = PROMPT_TEXT.split()
    text = " ".join(words[variant % len(words):] + words) + " "
    ids: list[int] = []
    while len(ids) < n:
        text += PROMPT_TEXT
        ids = tok.encode(text, add_special_tokens=False)
    return ids[:n]


# --- children: in-process runner, onnxruntime-genai, perplexity --------------------------------

def child_runner(path: str, ids: list[int], n: int, threads: int) -> dict[str, Any]:
    from device.runtime.generate import generate
    from device.runtime.runner import load_bundle

    backend = load_bundle(Path(path), slots=1, threads=threads).backend
    list(generate(backend, ids[:16], 4))  # warm-up
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in generate(backend, ids, n)]
    return asdict(Stream(t0, tuple(stamps), len(stamps), ""))


def child_genai(path: str, ids: list[int], n: int, threads: int) -> dict[str, Any]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(path)

    def run(prompt: list[int], new: int) -> Stream:
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new,
                                  do_sample=False)
        g = og.Generator(model, params)
        g.append_tokens(np.asarray([prompt], dtype=np.int32))
        stamps = []
        while not g.is_done():
            g.generate_next_token()
            stamps.append(time.perf_counter())
        return Stream(t0, tuple(stamps), len(stamps), "")

    run(ids[:16], 4)
    return asdict(run(ids, n))


def _nll(logits: Any, target: int) -> float:
    import numpy as np

    lg = np.asarray(logits, np.float64)
    m = lg.max()
    return float(np.log(np.exp(lg - m).sum()) + m - lg[target])


def child_ppl_bundle(path: str, ids: list[int], n: int, threads: int) -> dict[str, Any]:
    """Perplexity from the bundle's logits: windows of 256 tokens, one prefill each."""
    import numpy as np

    from device.runtime.runner import load_bundle

    backend = load_bundle(Path(path), slots=1, threads=threads).backend
    nll: list[float] = []
    for start in range(0, len(ids) - 1, 256):
        w = ids[start:start + 257]
        T = len(w) - 1
        logits = backend.step(np.asarray([w[:-1]]), np.arange(T)[None], [0], np.arange(T))[0]
        nll += [_nll(logits[i], w[i + 1]) for i in range(T)]
    return {"ppl": float(np.exp(np.mean(nll)))}


def child_ppl_llama(path: str, ids: list[int], n: int, threads: int) -> dict[str, Any]:
    """Perplexity from llama-cpp-python's logits, the same windows."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=256, logits_all=True,
                verbose=False)
    nll: list[float] = []
    for start in range(0, len(ids) - 1, 256):
        w = ids[start:start + 257]
        llm.reset()
        llm.eval(w[:-1])
        logits = np.asarray(llm.scores[:len(w) - 1])
        nll += [_nll(logits[i], w[i + 1]) for i in range(len(w) - 1)]
    return {"ppl": float(np.exp(np.mean(nll)))}


CHILDREN = {"runner": child_runner, "genai": child_genai, "ppl-bundle": child_ppl_bundle,
            "ppl-llama": child_ppl_llama}


def child(kind: str, path: Path, ids: list[int], n: int, threads: int,
          env: dict[str, str] | None = None) -> dict[str, Any] | str:
    """Run one child in its own process: its JSON result, or why it failed."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ids, f)
    cmd = [sys.executable, __file__, "--child", kind, str(path), f.name, str(n), str(threads)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                           env={**(env or os.environ), "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})
    finally:
        os.unlink(f.name)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        return f"failed: {(r.stderr.strip().splitlines() or [str(r.returncode)])[-1]}"
    return dict(json.loads(lines[-1]))


# --- the measurements ------------------------------------------------------------------------

@dataclass
class Cells:
    """One variant at one precision, one entry per round (None where a round failed)."""

    ttft: list[float | None] = field(default_factory=list)
    tok_s: list[float | None] = field(default_factory=list)
    conc: dict[int, list[Concurrent | None]] = field(default_factory=dict)
    note: str = ""


VARIANTS = ("daemon", "in-process", "genai", "llama-server", "daemon-plain", "daemon-open")
PLAIN_FLAGS = ("--speculate", "off")  # daemon-plain: the default daemon without drafting
PLAIN_CONCURRENCY = (1, 8)  # daemon-plain's and daemon-open's
SINGLE = tuple(v for v in VARIANTS if v != "daemon-open")  # the single-stream rows' variants
OPEN_QUESTIONS = (  # daemon-open: one chat question a stream, answers that copy nothing
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving.",
    "Describe a busy market in a coastal town early in the morning.",
    "What are three good habits for learning a new language, and why do they work?",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain to a child why the sky is blue.",
    "Give advice to someone who is starting their first job as a cook.",
    "Describe how bread is made, from the field to the table.",
)


def measure_server(start: Callable[[int], Server], tok: Any, cells: Cells, s: Settings,
                   concurrency: Sequence[int] = CONCURRENCY, open_text: bool = False) -> None:
    """Each concurrency c on a server `start(c)` of c slots, the single stream on the first
    (c = 1), each after a warm-up request. open_text: OPEN_QUESTIONS' prompts, no single stream."""
    ids = prompt_ids(tok, PROMPT_TOKENS)
    for c in concurrency:
        server = start(c)
        try:
            server.stream(ids[:16], 4)  # warm-up
            if c == 1 and not open_text:
                one = server.stream(ids, s.new_tokens)
                cells.ttft.append(one.ttft)
                cells.tok_s.append(one.tok_s)
            prompts = ([tok.encode_chat([{"role": "user", "content": q}]) for q in OPEN_QUESTIONS[:c]]
                       if open_text else [prompt_ids(tok, PROMPT_TOKENS, variant=i + 1) for i in range(c)])
            cells.conc.setdefault(c, []).append(aggregate(run_concurrent(server, prompts, s.conc_tokens)))
        finally:
            server.close()


def measure_round(precision: str, order: Sequence[str], tok: Any, table: dict[str, Cells],
                  peers: dict[str, Any], s: Settings, r: int) -> None:
    bundle = default_bundle(precision)
    ids = prompt_ids(tok, PROMPT_TOKENS)
    for variant in order:
        cells = table[variant]
        peer = peers.get(variant)
        try:
            if isinstance(peer, Skipped):
                cells.note = peer.reason
            elif variant in ("daemon", "daemon-plain", "daemon-open", "llama-server"):
                plain = variant == "daemon-plain"

                def start(c: int, variant: str = variant, plain: bool = plain, peer: Any = peer) -> Server:
                    if variant == "llama-server":
                        return LlamaServer(peers["lc"], peer, s.threads, slots=c)
                    # c = 1: the daemon as `toolkit serve BUNDLE` starts it (the bundle's slot)
                    return Daemon(bundle, s.threads, slots=c if c > 1 else None,
                                  flags=PLAIN_FLAGS if plain else ())

                measure_server(start, tok, cells, s,
                               CONCURRENCY if variant in ("daemon", "llama-server") else PLAIN_CONCURRENCY,
                               open_text=variant == "daemon-open")
            else:
                kind, path = ("runner", bundle) if variant == "in-process" else ("genai", peer)
                res = child(kind, path, ids, s.new_tokens, s.threads)
                if isinstance(res, str):
                    raise RuntimeError(res)
                one = Stream(res["t0"], tuple(res["stamps"]), res["tokens"], "")
                cells.ttft.append(one.ttft)
                cells.tok_s.append(one.tok_s)
        except Exception as e:  # noqa: BLE001 - one variant's failure is a note in the table
            cells.note = f"failed: {e}"
        pad(cells, r + 1)
        print(f"  {precision} {variant}: tok/s {cells.tok_s[-1]}", file=sys.stderr)


def pad(cells: Cells, rounds: int) -> None:
    """None for whatever a failed or skipped variant did not measure in this round: the lists
    stay aligned by round, so same-round ratios pair the right figures."""
    for values in (cells.ttft, cells.tok_s):
        values.extend([None] * (rounds - len(values)))
    for c in CONCURRENCY:
        conc = cells.conc.setdefault(c, [])
        conc.extend([None] * (rounds - len(conc)))


def perplexity(precision: str, peers: dict[str, Any], tok: Any, threads: int) -> dict[str, float | str]:
    text = (REPO / "quantize" / "data" / "heldout.txt").read_text(encoding="utf-8")
    ids = tok.encode(text, add_special_tokens=False)[:PPL_TOKENS + 1]
    out: dict[str, float | str] = {}
    ours = child("ppl-bundle", default_bundle(precision), ids, 0, threads)
    out["ours"] = ours if isinstance(ours, str) else ours["ppl"]
    model, lc = peers.get("llama-server"), peers.get("lc")
    if isinstance(model, Path) and isinstance(lc, LlamaCpp) and peers.get("bindings") is None:
        theirs = child("ppl-llama", model, ids, 0, threads, env=llama_env(lc))
        out["llama.cpp"] = theirs if isinstance(theirs, str) else theirs["ppl"]
    else:
        out["llama.cpp"] = "n/a"
    return out


# --- the daemon-only rows (flags of the prefix-cache / chunked-prefill / drafting work) --------

@dataclass
class Extra:
    name: str
    figure: float | None = None  # the ratio the row is judged on
    detail: str = ""
    note: str = ""


def serve_help() -> str:
    r = subprocess.run([sys.executable, "-m", "toolkit", "serve", "--help"], capture_output=True,
                       text=True, cwd=REPO)
    return r.stdout


def prefix_row(tok: Any, s: Settings, help_text: str) -> Extra:
    row = Extra("prefix cache: TTFT hit / cold (600-token system prompt)")
    if not has_flag(help_text, PREFIX_FLAG):
        row.note = f"n/a (daemon has no {PREFIX_FLAG})"
        return row
    daemon = Daemon(default_bundle("fp32"), s.threads, slots=1, flags=[PREFIX_FLAG, "64"])
    ratios, same = [], True
    try:
        for r in range(s.rounds):
            system = prompt_ids(tok, 600, variant=3 * r + 1)  # a new prefix: the first request is cold
            q1, q2 = prompt_ids(tok, 16, variant=3 * r + 2), prompt_ids(tok, 16, variant=3 * r + 3)
            cold = daemon.stream(system + q1, 16, ignore_eos=False)
            hit = daemon.stream(system + q2, 16, ignore_eos=False)
            again = daemon.stream(system + q1, 16, ignore_eos=False)  # a hit on cold's prompt
            ratios.append(hit.ttft / cold.ttft)
            same = same and again.text == cold.text
    finally:
        daemon.close()
    row.figure = statistics.median(ratios)
    row.detail = f"answers identical to cold: {'yes' if same else 'NO'} (goal <= 0.25x)"
    return row


def chunk_row(tok: Any, s: Settings, help_text: str) -> Extra:
    row = Extra("chunked prefill: p95 TPOT of 3 streams, 1,500-token prompt arriving / none")
    if not has_flag(help_text, CHUNK_FLAG):
        row.note = f"n/a (daemon has no {CHUNK_FLAG})"
        return row
    # the 3 decoding streams, per case and round: p95 and the longest gap are read from these.
    # Twice: with the daemon's defaults (the 3 greedy streams draft, so their gaps without the
    # long prompt are already a drafting plan's rounds of verify steps), and with drafting off,
    # where the gaps are the plain decode steps the chunks are paced against.
    cases = {"defaults": [], "plain": [*PLAIN_FLAGS]}
    kinds = ("none", "chunked", "whole")  # nothing arriving; the long prompt chunked; read whole
    seen: dict[tuple[str, str], list[Concurrent]] = {(c, k): [] for c in cases for k in kinds}
    for r in range(s.rounds):
        for case, flags in cases.items():
            for label, chunk in (("chunked", "auto"), ("whole", "off")):  # the default, and none
                daemon = Daemon(default_bundle("fp32"), s.threads, slots=4,
                                flags=[CHUNK_FLAG, chunk, *flags])
                try:
                    three = [prompt_ids(tok, PROMPT_TOKENS, variant=10 * r + i) for i in range(3)]
                    if label == "chunked":  # the baseline: the same 3 streams, nothing arriving
                        seen[case, "none"].append(aggregate(run_concurrent(daemon, three, s.conc_tokens)))
                    long = prompt_ids(tok, 1500, variant=10 * r + 5)
                    # the long prompt arrives once the 3 are decoding (after their prefills)
                    arrive = 0.5 + 3 * 0.2
                    streams = run_concurrent(daemon, [*three, long], s.conc_tokens,
                                             starts=[0, 0, 0, arrive])
                    seen[case, label].append(aggregate(streams[:3]))
                finally:
                    daemon.close()
    p95 = {k: [c.p95_tpot for c in v] for k, v in seen.items()}
    stall = {k: [c.max_gap for c in v] for k, v in seen.items()}

    def detail(case: str) -> str:
        whole = median_ratio(p95[case, "whole"], p95[case, "none"])
        return (f"whole prompt at once: {whole:.2f}x; p95 none/chunked/whole "
                f"{'/'.join(_ms(p95[case, k]) for k in kinds)} ms, longest gap "
                f"{'/'.join(_ms(stall[case, k]) for k in kinds)} ms" if whole else "")

    row.figure = median_ratio(p95["defaults", "chunked"], p95["defaults", "none"])
    plain = median_ratio(p95["plain", "chunked"], p95["plain", "none"])
    # p95 hides the one long stall of a whole-prompt read among 3 x 128 gaps: the longest gap
    # shows it
    row.detail = (f"{detail('defaults')}; drafting off (--speculate off): chunked "
                  f"{plain:.2f}x, {detail('plain')} (goal <= 2x)" if plain else detail("defaults"))
    return row


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.0f}" if values else "-"


EXTRACTION = ("Order 4471 was shipped on 12 March 2026 to Ana Lopez, 18 Harbour Street, Porto, "
              "Portugal: two Jetson Orin Nano boards, one 64 GB SD card and a USB-C power supply, "
              "total 612.40 EUR, tracking number PT-99812-ZX.\n\nThe same record, copied exactly:\n"
              "Order 4471 was shipped")


def spec_row(tok: Any, s: Settings, help_text: str) -> Extra:
    row = Extra("drafting: tok/s --speculate ngram / off (extraction prompt)")
    if not has_flag(help_text, SPEC_FLAG):
        row.note = f"n/a (daemon has no {SPEC_FLAG})"
        return row
    copy_ids = tok.encode(EXTRACTION, add_special_tokens=False)
    plain = prompt_ids(tok, PROMPT_TOKENS)
    speed: dict[str, list[float]] = {"ngram": [], "off": []}
    bench: dict[str, list[float]] = {"ngram": [], "off": []}
    texts: dict[str, str] = {}
    for r in range(s.rounds):
        for mode in (("ngram", "off") if r % 2 == 0 else ("off", "ngram")):
            daemon = Daemon(default_bundle("fp32"), s.threads, slots=1, flags=[SPEC_FLAG, mode])
            try:
                daemon.stream(plain[:16], 4)
                out = daemon.stream(copy_ids, 64)
                speed[mode].append(out.tok_s)
                texts.setdefault(mode, out.text)
                bench[mode].append(daemon.stream(plain, s.new_tokens).tok_s)
            finally:
                daemon.close()
    row.figure = median_ratio(speed["ngram"], speed["off"])
    cost = median_ratio(bench["ngram"], bench["off"])
    same = texts.get("ngram") == texts.get("off")
    row.detail = (f"output identical: {'yes' if same else 'NO'}; plain 128-token benchmark "
                  f"{cost:.2f}x (goals >= 1.5x, cost <= 3%)" if cost else "")
    return row


def joint_step_ratio(precision: str, threads: int, quick: bool, position: int = 192) -> float:
    """8 x t([1, 16]) / t([8, 16]) in-process, each row `position` tokens into its cache (a
    128-token prompt and half its answer), medians (bench/verify_batch.py)."""
    from bench import verify_batch

    settings = argparse.Namespace(rows=8, tokens=[16], position=position, threads=threads,
                                  repeat=3 if quick else 9)
    _, one_step, rows = verify_batch.measure(default_bundle(precision), settings).times[0]
    return rows / one_step


# --- the table -------------------------------------------------------------------------------

@dataclass
class Report:
    settings: Settings
    tables: dict[str, dict[str, Cells]]  # precision -> variant -> cells
    ppl: dict[str, dict[str, float | str]]
    extras: list[Extra]
    peers: dict[str, str]  # precision -> what llama-server serves (or why not)
    step_ratios: dict[str, float] = field(default_factory=dict)  # precision -> joint_step_ratio


def _f(v: float | None, fmt: str, unit: str = "") -> str:
    return "-" if v is None else format(v, fmt) + unit


def _med(values: Sequence[float | None]) -> float | None:
    have = [v for v in values if v is not None]
    return statistics.median(have) if have else None


def render(rep: Report) -> str:
    s = rep.settings
    lines = [f"SmolLM2-135M default bundles (max_seq {MAX_SEQ}), {s.threads} threads, {PROMPT_TOKENS}-token "
             f"prompts, greedy; single stream {s.new_tokens} tokens, concurrency {s.conc_tokens} tokens "
             f"a stream; {s.rounds} rounds, medians (ratios: median of same-round ratios)", ""]
    head = f"{'':34}" + "".join(f"{p:>22}" for p in rep.tables)
    lines.append(head)

    def row(label: str, cell: Callable[[dict[str, Cells]], str]) -> None:
        lines.append(f"{label:34}" + "".join(f"{cell(t):>22}" for t in rep.tables.values()))

    def ratio(a: str, b: str,
              get: Callable[[Cells], list[float | None]]) -> Callable[[dict[str, Cells]], str]:
        return lambda t: _f(median_ratio(get(t[a]), get(t[b])), ".2f", "x")

    def tps(t: dict[str, Cells], v: str) -> str:
        return _f(_med(t[v].tok_s), ".1f")

    row("matched llama.cpp GGUF", lambda t: MATCHED[_key(rep, t)])
    row("perplexity ours / llama.cpp", lambda t: _ppl(rep.ppl.get(_key(rep, t), {})))
    lines.append("single stream: decode tok/s (daemon: the default, one slot; daemon-plain: the same, "
                 "--speculate off)")
    for v in SINGLE:
        row(f"  {v}", lambda t, v=v: tps(t, v))
    row("  daemon / in-process", ratio("daemon", "in-process", lambda c: c.tok_s))
    row("  daemon / onnxruntime-genai", ratio("daemon", "genai", lambda c: c.tok_s))
    row("  in-process / onnxruntime-genai", ratio("in-process", "genai", lambda c: c.tok_s))
    row("  daemon / llama-server", ratio("daemon", "llama-server", lambda c: c.tok_s))
    lines.append("single stream: TTFT ms")
    for v in SINGLE:
        row(f"  {v}", lambda t, v=v: _f(_scale(_med(t[v].ttft), 1e3), ".0f"))
    for label, v, cs in (("daemon", "daemon", CONCURRENCY),
                         ("daemon, drafting off (--speculate off)", "daemon-plain", PLAIN_CONCURRENCY),
                         ("daemon, open questions (answers that copy nothing)", "daemon-open",
                          PLAIN_CONCURRENCY),
                         ("llama-server", "llama-server", CONCURRENCY)):
        lines.append(f"{label}: aggregate decode tok/s, p50/p95 TPOT ms")
        for c in cs:
            row(f"  c={c}", lambda t, c=c, v=v: _conc(t[v].conc.get(c, [])))
        row("  c=8 / c=1", lambda t, v=v: _f(median_ratio(_agg(t[v], 8), _agg(t[v], 1)), ".2f", "x"))
        if v == "daemon" and rep.step_ratios:
            # about what c=8 / c=1 can be while every stream drafts (joint_step_ratio)
            row("  in-process [8,16] / [1,16]", lambda t: _f(rep.step_ratios.get(_key(rep, t)), ".2f", "x"))
    row("daemon / llama-server at c=8",
        lambda t: _f(median_ratio(_agg(t["daemon"], 8), _agg(t["llama-server"], 8)), ".2f", "x"))
    lines += ["", "goals: daemon >= 1.0x onnxruntime-genai and >= 0.97x in-process; c=8 >= 3x c=1 (fp32), "
              ">= 2x (int4); >= 1.2x llama-server at c=8", ""]
    if not rep.tables:  # --precisions with none named: the daemon-only rows alone
        lines = lines[:2]
    for e in rep.extras:
        lines.append(f"{e.name}: " + (e.note or f"{_f(e.figure, '.2f', 'x')}  {e.detail}"))
    notes = {f"{p} {v}": c.note for p, t in rep.tables.items() for v, c in t.items() if c.note}
    lines += [""] + [f"note: {k}: {n}" for k, n in notes.items()]
    lines += [f"llama-server {p}: {what}" for p, what in rep.peers.items()]
    return "\n".join(lines).rstrip()


def _key(rep: Report, t: dict[str, Cells]) -> str:
    return next(p for p, tt in rep.tables.items() if tt is t)


def _ppl(p: dict[str, float | str]) -> str:
    def one(v: float | str | None) -> str:
        return f"{v:.2f}" if isinstance(v, float) else "n/a"

    return f"{one(p.get('ours'))} / {one(p.get('llama.cpp'))}"


def _scale(v: float | None, k: float) -> float | None:
    return None if v is None else v * k


def _agg(c: Cells, n: int) -> list[float | None]:
    return [x.agg_tok_s if x else None for x in c.conc.get(n, [])]


def _conc(values: list[Concurrent | None]) -> str:
    have = [v for v in values if v is not None]
    if not have:
        return "-"
    agg = statistics.median(v.agg_tok_s for v in have)
    p50 = statistics.median(v.p50_tpot for v in have) * 1e3
    p95 = statistics.median(v.p95_tpot for v in have) * 1e3
    return f"{agg:.1f} ({p50:.0f}/{p95:.0f})"


# --- main ------------------------------------------------------------------------------------

def gather_peers(precision: str, threads: int, lc: LlamaCpp | Skipped,
                 bindings: Skipped | None) -> dict[str, Any]:
    peers: dict[str, Any] = {"lc": lc, "bindings": bindings, "genai": genai_model(precision, threads)}
    peers["llama-server"] = lc if isinstance(lc, Skipped) else gguf(precision, lc)
    return peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 round, fewer tokens (a smoke run).")
    ap.add_argument("--precisions", nargs="*", choices=PRECISIONS, default=list(PRECISIONS),
                    help="Precisions to measure (none named: only the daemon rows of the extras).")
    ap.add_argument("--no-extras", action="store_true", help="Skip the prefix/chunk/drafting rows.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    ap.add_argument("--no-build", action="store_true",
                    help="Use llama.cpp only if bench/peers.py has built it already.")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, path, ids_file, n, threads = args.child
        ids = json.loads(Path(ids_file).read_text())
        print(json.dumps(CHILDREN[kind](path, ids, int(n), int(threads))), flush=True)
        return
    s = (Settings(args.threads, 1, 32, 16) if args.quick else
         # 128 tokens a stream at concurrency too: 8 prompts arriving together are read over
         # ~2-4 s on 2 cores, and with 64 tokens the first streams finished before the last began
         Settings(args.threads, args.rounds, 128, 128))
    tok = tokenizer()
    lc = llama_cpp(build=not args.no_build)
    bindings = lc if isinstance(lc, Skipped) else llama_cpp_python(lc)
    peers = {p: gather_peers(p, s.threads, lc, bindings) for p in args.precisions}
    tables = {p: {v: Cells() for v in VARIANTS} for p in args.precisions}
    for r in range(s.rounds):
        for p in args.precisions:
            order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
            print(f"round {r + 1}/{s.rounds}: {p}", file=sys.stderr)
            measure_round(p, order, tok, tables[p], peers[p], s, r)
    ppl = {p: perplexity(p, peers[p], tok, s.threads) for p in args.precisions}
    step_ratios = {p: joint_step_ratio(p, s.threads, args.quick) for p in args.precisions}
    help_text = serve_help()
    extras = [] if args.no_extras else [f(tok, s, help_text) for f in (prefix_row, chunk_row, spec_row)]
    described = {p: str(peers[p]["llama-server"].reason if isinstance(peers[p]["llama-server"], Skipped)
                        else peers[p]["llama-server"].name) for p in args.precisions}
    rep = Report(s, tables, ppl, extras, described, step_ratios)
    text = render(rep)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(asdict(rep), indent=1, default=str))


if __name__ == "__main__":
    main()
