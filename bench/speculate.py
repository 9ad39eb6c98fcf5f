"""Prompt-lookup drafting benchmark: the daemon with `--speculate ngram` against `--speculate off`.

    python bench/speculate.py [--bundle BUNDLE] [--threads 2] [--rounds 3] [--draft-tokens 2 4 8]

Two workloads, each request greedy, through `toolkit serve` over its Unix socket:
  copy   an extraction task whose answer copies the prompt ("Repeat the following text exactly"
         + a paragraph of quantize/data/heldout.txt): where drafting pays
  plain  128 prompt tokens of heldout.txt, 128 new tokens (EOS ignored): the usual decode
         benchmark (SmolLM2-135M's greedy continuation soon repeats the prompt: drafts pay here too)
  open   a short question whose answer copies nothing (a story), 128 tokens: drafts are rarely
         right here, so this shows what a wrong draft costs
One daemon per setting (off, and ngram with each --draft-tokens) runs side by side; in each round
every daemon serves each workload once, in a rotating order, and the ratio of decode tokens/s
(tokens after the first over the time they took, client-side) of each ngram daemon to the off
daemon in that round is taken; the table shows the median ratio over the rounds (robust to
other load on a shared machine), the accepted/drafted counts the daemon reported, and whether
every output equalled the off daemon's.
Without --bundle: the default SmolLM2-135M bundle of bench/decode.py (`toolkit convert
smollm2-135m`: max_seq 2048, 1 slot), converted into ~/.cache/toolkit-bench/ when missing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.decode import BenchDaemon  # noqa: E402

HELDOUT = REPO / "quantize" / "data" / "heldout.txt"
COPY_INSTRUCTION = "Repeat the following text exactly, word for word:\n\n"
OPEN_QUESTION = "Write a short story about a lighthouse keeper who finds a strange radio."


class SpecDaemon(BenchDaemon):
    """`python -m toolkit serve BUNDLE --speculate MODE [--draft-tokens K]` on a private socket."""

    def __init__(self, bundle: Path, threads: int, speculate: str, draft_tokens: int | None) -> None:
        self.name = "off" if speculate == "off" else f"ngram k={draft_tokens}"
        extra = [] if draft_tokens is None else ["--draft-tokens", str(draft_tokens)]
        super().__init__(bundle, threads, ["--speculate", speculate, *extra])

    def generate(self, path: str, body: dict[str, Any]) -> tuple[float, str, dict[str, Any]]:
        """(decode tok/s, text, usage) of one streamed greedy request."""
        body = {**body, "temperature": 0, "stream_options": {"include_usage": True}}
        stamps, text, usage = [], [], None
        for event in self.client.stream(path, body):
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"]:
                c = event["choices"][0]
                piece = c.get("text") or (c.get("delta") or {}).get("content") or ""
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
        assert usage is not None and len(stamps) > 1
        return (usage["completion_tokens"] - 1) / (stamps[-1] - stamps[0]), "".join(text), usage


@dataclass
class Cell:
    ratios: list[float] = field(default_factory=list)  # ngram / off decode tok/s, per round
    tps: list[float] = field(default_factory=list)
    drafted: int = 0
    accepted: int = 0
    identical: bool = True


def workloads(bundle: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    from device.runtime.runner import load_bundle

    tok = load_bundle(bundle, slots=1, threads=1).tokenizer
    assert tok is not None
    paragraphs = [p for p in HELDOUT.read_text().split("\n\n") if len(p) > 400]
    plain = tok.encode(HELDOUT.read_text())[:128]
    return {"copy": ("/v1/chat/completions", {
                "messages": [{"role": "user", "content": COPY_INSTRUCTION + paragraphs[0]}],
                "max_tokens": 160}),
            "plain": ("/v1/completions", {"prompt": plain, "max_tokens": 128, "ignore_eos": True}),
            "open": ("/v1/chat/completions", {
                "messages": [{"role": "user", "content": OPEN_QUESTION}], "max_tokens": 128,
                "ignore_eos": True})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draft-tokens", type=int, nargs="+", default=[None],
                    help="one ngram daemon per value (default: the daemon's default)")
    args = ap.parse_args()
    bundle = args.bundle
    if bundle is None:
        from bench.decode import ensure_bundle

        bundle = ensure_bundle(None)
    loads = workloads(bundle)
    daemons = [SpecDaemon(bundle, args.threads, "off", None)]
    try:
        daemons += [SpecDaemon(bundle, args.threads, "ngram", k) for k in args.draft_tokens]
        for d in daemons:  # warm-up
            d.generate("/v1/completions", {"prompt": "Hello", "max_tokens": 4})
        cells = {(d.name, w): Cell() for d in daemons[1:] for w in loads}
        base: dict[str, list[float]] = {w: [] for w in loads}
        for r in range(args.rounds):
            order = daemons[r % len(daemons):] + daemons[:r % len(daemons)]
            for w, (path, body) in loads.items():
                got = {d.name: d.generate(path, body) for d in order}
                off_tps, off_text, _ = got["off"]
                base[w].append(off_tps)
                for d in daemons[1:]:
                    tps, text, usage = got[d.name]
                    cell = cells[(d.name, w)]
                    cell.ratios.append(tps / off_tps)
                    cell.tps.append(tps)
                    details = usage.get("completion_tokens_details") or {}
                    cell.accepted += details.get("accepted_prediction_tokens", 0)
                    cell.drafted += (details.get("accepted_prediction_tokens", 0)
                                     + details.get("rejected_prediction_tokens", 0))
                    cell.identical &= text == off_text
                print(f"round {r + 1}: {w} " + ", ".join(f"{n} {v[0]:.1f} tok/s" for n, v in got.items()),
                      file=sys.stderr, flush=True)
    finally:
        for d in daemons:
            d.close()
    print(f"\nbundle {bundle}, {args.threads} threads, {args.rounds} rounds; median of same-round "
          f"ratios of decode tok/s (ngram / off)\n")
    print("| setting | workload | off tok/s (median) | ngram tok/s (median) | ratio (median) | "
          "ratios | accepted / drafted | output identical |")
    print("|---|---|---|---|---|---|---|---|")
    for (name, w), c in cells.items():
        print(f"| {name} | {w} | {statistics.median(base[w]):.1f} | {statistics.median(c.tps):.1f} | "
              f"{statistics.median(c.ratios):.2f}x | {min(c.ratios):.2f}..{max(c.ratios):.2f} | "
              f"{c.accepted} / {c.drafted} | {'yes' if c.identical else 'NO'} |")


if __name__ == "__main__":
    main()
