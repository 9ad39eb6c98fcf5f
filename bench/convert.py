"""Conversion time and peak memory for SmolLM2-135M (recorded; no target yet).

    python bench/convert.py [--model smollm2-135m] [--targets cpu,jetson] [--max-seq 2048]

Each target converts in a fresh subprocess that reports its own peak RSS (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from pathlib import Path
from convert.pipeline import convert_model
from bundle.progress import Steps
steps = Steps(quiet=True)
t0 = time.perf_counter()
res = convert_model(sys.argv[1], sys.argv[2], Path(sys.argv[3]), max_seq=int(sys.argv[4]), steps=steps)
print(json.dumps({"seconds": time.perf_counter() - t0, "steps": res.seconds, "bytes": res.bytes,
                  "parity": res.manifest.parity.max_abs_logits_diff,
                  "greedy": res.manifest.parity.greedy_match,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(model: str, target: str, max_seq: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-c", CHILD, model, target, str(Path(tmp) / "b"),
                               str(max_seq)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"convert failed for {target}:\n{proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--targets", default="cpu,jetson")
    ap.add_argument("--max-seq", type=int, default=2048)
    args = ap.parse_args()
    rows = []
    for target in args.targets.split(","):
        t0 = time.perf_counter()
        r = run(args.model, target, args.max_seq)
        r["wall"] = time.perf_counter() - t0
        rows.append((target, r))
    print(f"\nconvert {args.model}, max_seq {args.max_seq}\n")
    print(f"{'target':<22}{'total s':>9}{'load':>8}{'export':>8}{'optim':>8}{'parity':>8}"
          f"{'bundle MB':>11}{'peak RSS MB':>13}{'max|dlogit|':>13}{'greedy':>8}")
    for target, r in rows:
        s = {k.split(" ")[0]: v for k, v in r["steps"].items()}
        print(f"{target:<22}{r['seconds']:>9.1f}{s.get('loading', 0):>8.1f}{s.get('exporting', 0):>8.1f}"
              f"{s.get('optimising', 0):>8.1f}{s.get('checking', 0):>8.1f}{r['bytes'] / 1e6:>11.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['parity']:>13.1e}{str(r['greedy']):>8}")


if __name__ == "__main__":
    main()
