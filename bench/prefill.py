"""Prefix cache and chunked prefill benchmark: SmolLM2-135M fp32 (the default bundle: max_seq 2048)
in the daemon's engine (device/serve/scheduler.py, in-process: the times are the engine's own,
without the HTTP path in front of it), on the CPU.

    python bench/prefill.py [--bundle BUNDLE] [--threads 2] [--rounds 5] [--only prefix chunked]

prefix   one slot, --prefix-cache-mb default. Each round: a request whose ~600-token system
         prompt is new (cold: it prefills everything), then another question under the same
         system prompt (a hit: the prompt's whole 32-token blocks are copied in). Reports both
         TTFTs and the median of the per-round ratios hit / cold (issue #20: <= 0.25), and checks
         that the hit's greedy answer equals the same request's answer with the cache off.
chunked  four slots. Three requests decode (ignore_eos) and, once they stream, a ~1,500-token
         prompt arrives. Per round, in turn: the three alone (base), with the long prompt read in
         one step (--prefill-chunk off), and chunked (auto, and each --fixed N). Reports, divided
         by the same round's base figure: the three's time per output token while the long
         prompt is being read (its arrival to its first token: mean gap between tokens), their
         p95 per-request TPOT (the metric's definition: each request's mean after its first
         token; issue #20: <= 2x), the p95 and max single gap; and the long request's TTFT.
         Medians over rounds.

Every ratio is taken inside one round (same-round pairs), so load from other processes on a
shared machine cancels out as far as it can; absolute times are only indicative.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from decode import PROMPT_TEXT, ensure_bundle  # noqa: E402

from device.runtime.sampling import SamplingParams  # noqa: E402
from device.serve.config import PREFIX_CACHE_MB  # noqa: E402
from device.serve.scheduler import Finished, GenerationRequest, Scheduler, TextDelta  # noqa: E402

SYSTEM_TOKENS = 600
LONG_TOKENS = 1500
QUESTIONS = ["What does the board share between its CPU and GPU?",
             "Why run language models close to the sensors?"]


@dataclass
class Stream:
    """One request's event times, as the consumer saw them."""

    start: float
    stamps: list[float] = field(default_factory=list)
    text: str = ""
    final: Finished | None = None


def consume(engine: Scheduler, req: GenerationRequest, out: Stream) -> None:
    with engine.reserve() as ticket:
        handle = engine.submit(ticket, req)
    for event in handle.events(timeout=600):
        if isinstance(event, TextDelta):
            out.stamps.append(time.monotonic())
            out.text += event.text
        elif isinstance(event, Finished):
            out.final = event
        else:
            raise RuntimeError(f"request failed: {event}")


def run(engine: Scheduler, req: GenerationRequest) -> Stream:
    s = Stream(time.monotonic())
    consume(engine, req, s)
    return s


def tokens(runner: Any, text: str, n: int) -> list[int]:
    ids: list[int] = runner.tokenizer.encode(text * (1 + n // 30))
    return ids[:n]


def system_prompt(runner: Any, round_no: int) -> list[int]:
    """~600 tokens, new in every round (its first words name the round): a cold prefix."""
    return tokens(runner, f"Session {round_no}. " + PROMPT_TEXT * 12, SYSTEM_TOKENS)


def bench_prefix(runner: Any, rounds: int) -> dict[str, Any]:
    on = Scheduler(runner.backend, runner.tokenizer, prefix_cache_bytes=PREFIX_CACHE_MB << 20)
    cold_t, hit_t, ratios, same = [], [], [], True
    on.start()
    try:
        for r in range(rounds):
            sys_ids = system_prompt(runner, r)
            reqs = [GenerationRequest(sys_ids + runner.tokenizer.encode(q), 16) for q in QUESTIONS]
            cold, hit = run(on, reqs[0]), run(on, reqs[1])
            assert cold.final and hit.final
            cold_t.append(cold.final.timings.ttft_s)
            hit_t.append(hit.final.timings.ttft_s)
            ratios.append(hit_t[-1] / cold_t[-1])
            print(f"prefix round {r + 1}: cold {cold_t[-1] * 1e3:.0f} ms, hit {hit_t[-1] * 1e3:.0f} ms",
                  file=sys.stderr)
        stats = on.prefix_cache.status()
    finally:
        on.close()
    off = Scheduler(runner.backend, runner.tokenizer)  # the hit's answer without the cache
    off.start()
    try:
        want = run(off, GenerationRequest(system_prompt(runner, rounds - 1)
                                          + runner.tokenizer.encode(QUESTIONS[1]), 16))
        same = want.text == hit.text
    finally:
        off.close()
    return {"cold_ttft_ms": statistics.median(cold_t) * 1e3, "hit_ttft_ms": statistics.median(hit_t) * 1e3,
            "ratio": statistics.median(ratios), "ratios": ratios, "same_answer": same, "cache": stats}


def bench_chunked(runner: Any, rounds: int, fixed: list[int], decode_tokens: int) -> dict[str, Any]:
    long_ids = tokens(runner, PROMPT_TEXT, LONG_TOKENS)
    short = [GenerationRequest(tokens(runner, f"Request {i}. " + PROMPT_TEXT, 60), decode_tokens,
                               SamplingParams(), ignore_eos=True) for i in range(3)]
    modes: list[tuple[str, int | None]] = [("off", 0), ("auto", None)] + [(str(n), n) for n in fixed]
    keys = ("window_tpot", "request_tpot_p95", "gap_p95", "gap_max", "ttft_ms")
    per_mode: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m, _ in modes}
    for r in range(rounds):
        base = one_round(runner, short, None, 0)
        base_gaps = gaps(base[:3], None)
        base_mean, base_p95, base_req = (statistics.mean(base_gaps), p95(base_gaps),
                                         p95([tpot(s) for s in base]))
        for name, chunk in modes:
            streams = one_round(runner, short, long_ids, chunk)
            window = (streams[3].start, streams[3].stamps[0])
            g = gaps(streams[:3], window)
            got = per_mode[name]
            got["window_tpot"].append(statistics.mean(g) / base_mean)
            got["request_tpot_p95"].append(p95([tpot(s) for s in streams[:3]]) / base_req)
            got["gap_p95"].append(p95(g) / base_p95)
            got["gap_max"].append(max(g) / base_p95)
            got["ttft_ms"].append((window[1] - window[0]) * 1e3)
            print(f"chunked round {r + 1} {name}: base gap {base_mean * 1e3:.1f} ms; "
                  + ", ".join(f"{k} {v[-1]:.2f}" for k, v in got.items()) + f", {len(g)} gaps",
                  file=sys.stderr)
    return {m: {k: statistics.median(v) for k, v in d.items()} for m, d in per_mode.items()}


def one_round(runner: Any, short: list[GenerationRequest], long_ids: list[int] | None,
              chunk: int | None) -> list[Stream]:
    engine = Scheduler(runner.backend, runner.tokenizer, prefill_chunk=chunk)
    engine.start()
    try:
        streams = [Stream(time.monotonic()) for _ in short]
        threads = [threading.Thread(target=consume, args=(engine, q, s)) for q, s in zip(short, streams)]
        for t in threads:
            t.start()
        while any(len(s.stamps) < 16 for s in streams):  # all three stream: decode is under way
            time.sleep(0.005)
        if long_ids is not None:
            streams.append(Stream(time.monotonic()))
            threads.append(threading.Thread(target=consume, args=(
                engine, GenerationRequest(long_ids, 4), streams[-1])))
            threads[-1].start()
        for t in threads:
            t.join()
    finally:
        engine.close()
    return streams


def gaps(streams: list[Stream], window: tuple[float, float] | None) -> list[float]:
    """Gaps between consecutive tokens of each stream (ending inside the window, when given)."""
    out = []
    for s in streams:
        for a, b in zip(s.stamps, s.stamps[1:]):
            if window is None or window[0] < b <= window[1] + (b - a):
                out.append(b - a)
    return out


def tpot(s: Stream) -> float:
    """A request's time per output token after its first (the tpot histogram's definition)."""
    return (s.stamps[-1] - s.stamps[0]) / (len(s.stamps) - 1)


def p95(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.95 * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="A SmolLM2-135M cpu bundle (default: "
                   "the default-settings bundle of bench/decode.py, converted when missing).")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", nargs="*", choices=["prefix", "chunked"], default=["prefix", "chunked"])
    p.add_argument("--fixed", type=int, nargs="*", default=[64], help="Fixed chunk sizes to compare.")
    p.add_argument("--decode-tokens", type=int, default=400,
                   help="Tokens each of the three decoding requests generates.")
    args = p.parse_args()
    from device.runtime.runner import load_bundle

    bundle = ensure_bundle(args.bundle)
    lines = [f"bundle {bundle} (max_seq from its manifest), {args.threads} threads, "
             f"{args.rounds} rounds, medians of same-round ratios"]
    if "prefix" in args.only:
        runner = load_bundle(bundle, slots=1, threads=args.threads)
        res = bench_prefix(runner, args.rounds)
        runner.close()
        lines.append(f"prefix cache, {SYSTEM_TOKENS}-token system prompt: TTFT cold "
                     f"{res['cold_ttft_ms']:.0f} ms, hit {res['hit_ttft_ms']:.0f} ms, hit/cold "
                     f"{res['ratio']:.3f} (target <= 0.25), answers identical: {res['same_answer']}")
    if "chunked" in args.only:
        runner = load_bundle(bundle, slots=4, threads=args.threads)
        res = bench_chunked(runner, args.rounds, args.fixed, args.decode_tokens)
        runner.close()
        for mode, r in res.items():
            lines.append(f"{LONG_TOKENS}-token prompt, --prefill-chunk {mode}: the others' TPOT while "
                         f"it is read {r['window_tpot']:.2f}x base, p95 per-request TPOT "
                         f"{r['request_tpot_p95']:.2f}x (target <= 2), gap p95 {r['gap_p95']:.2f}x, "
                         f"max {r['gap_max']:.2f}x; long TTFT {r['ttft_ms']:.0f} ms")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
