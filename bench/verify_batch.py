"""What verifying several rows' drafts in ONE step gives, against one row a step.

    python bench/verify_batch.py [--precisions fp32 int8 int4] [--rows 8] [--tokens 1 2 4 8 16]

Without `query_seqlens` [B] (ONNX Runtime 1.32: row b's first query_seqlens[b] tokens are real,
the rest right padding) GroupQueryAttention takes several tokens per row over a cache only for
one row, so a daemon verifies one row's draft per step. A CPU bundle's ragged graph
(convert/ragged.py, model.ragged.onnx) wires it, and a daemon with several slots steps every
row's draft in one step (device/serve/scheduler.py, joint steps). This bench loads a bundle as
such a daemon does (its ragged graph, `--rows` slots), fills the slots with `--position` random
prompt tokens each, and measures:
  time   t(B rows, T tokens) of one [B, T] step against B one-row [1, T] steps (spare token on,
         as the one-slot engine feeds it),
         medians of --repeat runs with the cache restored before each;
  exact  max |logits difference| between a row in the [B, T] step and the same row alone, with
         every row T tokens long and with ragged rows (lengths 1..T, positions padded with the
         last real one, so that each row's seqlens_k is its last real position).
Prints one table per precision. Without --bundle, the default SmolLM2-135M bundles of
bench/decode.py (converted into ~/.cache/toolkit-bench/ when missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.contract import RAGGED_MODEL_FILE  # noqa: E402


def median_ms(f: Callable[[], object], restore: Callable[[], None], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        restore()
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@dataclass
class Result:
    bundle: str
    times: list[tuple[int, float, float]]  # (T, one [B,T] step ms, B one-row [1,T] steps ms)
    same: float  # max |d logits| of a row in the [B,T] step (every row T tokens) against it alone
    ragged: list[tuple[int, float]]  # (a row's real tokens, max |d logits|) in a right-padded step


def measure(bundle: Path, args: argparse.Namespace) -> Result:
    """One ONNX Runtime backend over the bundle's ragged graph, as a daemon with several slots
    loads it: [B, T] steps with per-row lengths, and one row's [1, T] steps with its spare (the
    graph adds it for a batch of one; fed the full T, the ragged graph computes what model.onnx
    does, tests/convert/test_ragged.py). Both through the backend's cached bindings, as the
    daemon steps them."""
    from device.runtime.generate import prefill
    from device.runtime.runner import load_bundle

    B, P, T = args.rows, args.position, max(args.tokens)
    backend = load_bundle(bundle, slots=B, threads=args.threads, ragged=True).backend
    if not getattr(backend, "ragged_steps", False):
        raise SystemExit(f"{bundle} has no {RAGGED_MODEL_FILE} this runtime loads (not a CPU decoder "
                         "bundle, one converted before 2026-12-06, or ONNX Runtime < 1.32)")
    backend.spare_token = True  # what the one-slot engine feeds (the graph ignores it for B > 1)
    rng = np.random.default_rng(0)
    prompts = rng.integers(100, 5000, (B, P)) % backend.vocab_size
    for r in range(B):
        prefill(backend, prompts[r].tolist(), r)
    snapshot = [buf.copy() for buf in backend.cache.buffers]

    def restore() -> None:
        for buf, saved in zip(backend.cache.buffers, snapshot):
            buf[...] = saved

    def batched(ids: np.ndarray, pos: np.ndarray, lens: np.ndarray) -> np.ndarray:
        return backend.step(ids, pos, range(B), lengths=lens)  # [B, T, V], a reused buffer

    def alone(ids: np.ndarray, pos: np.ndarray, row: int) -> np.ndarray:
        return backend.step(ids, pos, [row])  # [1, T, V], a reused buffer

    draft = rng.integers(100, 5000, (B, T)) % backend.vocab_size
    pos = np.tile(P + np.arange(T), (B, 1))
    restore()
    full = batched(draft, pos, np.full(B, T)).copy()
    same = 0.0
    for r in range(B):
        restore()
        same = max(same, float(np.abs(alone(draft[r:r + 1], pos[r:r + 1], r)[0] - full[r]).max()))
    lens = np.array([1 + (r * (T - 1)) // max(1, B - 1) for r in range(B)])  # 1 .. T
    ids, rpos = draft.copy(), pos.copy()
    for r, n in enumerate(lens):
        ids[r, n:], rpos[r, n:] = 0, P + n - 1  # padding: seqlens_k is the last real position
    restore()
    ragged = batched(ids, rpos, lens).copy()
    diffs = []
    for r, n in enumerate(lens):
        restore()
        one = alone(draft[r:r + 1, :n], pos[r:r + 1, :n], r)
        diffs.append((int(n), float(np.abs(one[0] - ragged[r, :n]).max())))
    times = []
    for t in sorted(args.tokens):
        d, p = draft[:, :t], pos[:, :t]
        one_step = median_ms(partial(batched, d, p, np.full(B, t)), restore, args.repeat)
        per_row = median_ms(partial(alone, d[:1], p[:1], 0), restore, args.repeat)
        times.append((t, one_step, B * per_row))
    backend.close()
    return Result(bundle.name, times, same, diffs)


def show(r: Result, args: argparse.Namespace) -> None:
    print(f"\n{r.bundle}: {args.rows} rows at position {args.position}, {args.threads} threads, "
          f"medians of {args.repeat}")
    print(f"  {'T':>3} {'one [B,T] step ms':>18} {'B x [1,T] steps ms':>19} {'ratio':>7}")
    for t, one_step, rows in r.times:
        print(f"  {t:>3} {one_step:>18.1f} {rows:>19.1f} {rows / one_step:>6.2f}x")
    print(f"  exact, every row {max(args.tokens)} tokens: max |d logits| per row {r.same:.3g}")
    print("  exact, ragged rows (tokens: max |d logits|): "
          + ", ".join(f"{n}: {d:.3g}" for n, d in r.ragged))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", default=None,
                    help="a CPU decoder bundle (repeatable); default: the default SmolLM2 bundles")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--position", type=int, default=192, help="tokens already in each row's cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    if args.bundle:
        bundles = args.bundle
    else:
        from bench.decode import default_bundle

        bundles = [default_bundle(p) for p in args.precisions]
    for bundle in bundles:
        show(measure(bundle, args), args)


if __name__ == "__main__":
    main()
