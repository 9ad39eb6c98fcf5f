"""The per-token cost of constrained decoding: decode tok/s with and without a JSON schema, on
the same chat prompt, through one daemon, in one run.

    python bench/structured.py [--bundle BUNDLE] [--threads 2] [--pairs 8] [--out result.json]

Each pair is one constrained request (response_format json_schema, SCHEMA below) and one free
request on the same messages, greedy, run back to back in alternating order; the free one runs
exactly as many tokens as the constrained one produced (max_tokens = that count, EOS ignored), so
both decode the same number of tokens from the same prompt. The rate is the daemon's own decode
rate (timings.predicted_per_second: tokens after the first over the time they took, HTTP and
TTFT excluded). Reported: the median of each, and the median of the per-pair ratios
constrained / free, which is robust to other load on a shared machine (never best-of-N).
The target (issue #19) is a ratio >= 0.90: at most 10 % slower.

Without --bundle, SmolLM2-135M is converted first as bench/decode.py does (~/.cache/toolkit-bench/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from decode import BenchDaemon, ensure_bundle  # noqa: E402 - after the path set-up

TARGET = 0.90  # constrained / free decode tok/s
MESSAGES = [{"role": "user", "content": "Plan eight moves for the robot arm as JSON: each step has an "
                                        "action, x and y."}]
STEP = {"type": "object", "additionalProperties": False, "required": ["action", "x", "y", "note"],
        "properties": {"action": {"enum": ["move", "grab", "release", "wait"]},
                       "x": {"type": "integer", "minimum": -100, "maximum": 100},
                       "y": {"type": "integer", "minimum": -100, "maximum": 100},
                       "note": {"type": "string", "maxLength": 24}}}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["steps"],
          "properties": {"steps": {"type": "array", "minItems": 8, "maxItems": 8, "items": STEP}}}


def chat(daemon: BenchDaemon, constrained: bool, n: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": MESSAGES, "temperature": 0}
    if constrained:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "plan", "schema": SCHEMA}}
        body["max_tokens"] = 400
    else:
        body.update(max_tokens=n, ignore_eos=True)
    reply: dict[str, Any] = daemon.client.post("/v1/chat/completions", body)
    return reply


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = ap.parse_args()
    daemon = BenchDaemon(ensure_bundle(args.bundle), args.threads)
    try:
        first = chat(daemon, True, None)  # warm-up: the grammar engine's vocabulary, the schema
        n = first["usage"]["completion_tokens"]
        json.loads(first["choices"][0]["message"]["content"])  # it is whole and valid
        chat(daemon, False, n)
        pairs: list[tuple[float, float]] = []
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            rate = {}
            for constrained in order:
                reply = chat(daemon, constrained, n)
                assert reply["usage"]["completion_tokens"] == n, "the greedy output changed length"
                rate[constrained] = reply["timings"]["predicted_per_second"]
            pairs.append((rate[True], rate[False]))
    finally:
        daemon.close()
    ratio = statistics.median(c / f for c, f in pairs)
    result = {"tokens": n, "pairs": len(pairs), "threads": args.threads,
              "constrained_tok_s_median": statistics.median(c for c, _ in pairs),
              "free_tok_s_median": statistics.median(f for _, f in pairs),
              "ratio_median": ratio, "target": TARGET, "ok": ratio >= TARGET,
              "pair_rates": pairs}
    print(f"{n} tokens x {len(pairs)} pairs: free {result['free_tok_s_median']:.1f} tok/s, "
          f"json_schema {result['constrained_tok_s_median']:.1f} tok/s; median ratio {ratio:.3f} "
          f"(target >= {TARGET}: {'ok' if result['ok'] else 'MISSED'})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
