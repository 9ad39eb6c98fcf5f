"""What verifying several rows' drafts in ONE step gives, against one row a step.

    python bench/verify_batch.py [--precisions fp32 int8 int4] [--rows 8] [--tokens 1 2 4 8 16]

Without `query_seqlens` [B] (ONNX Runtime 1.32: row b's first query_seqlens[b] tokens are real,
the rest right padding) GroupQueryAttention takes several tokens per row over a cache only for
one row, so a daemon verifies one row's draft per step. A CPU bundle's ragged graph
(convert/ragged.py, model.ragged.onnx) wires it, and a daemon with several slots steps every
row's draft in one step (device/serve/scheduler.py, joint steps). This bench loads both graphs
of a bundle over one cache, fills `--rows` slots with `--position` random prompt tokens each,
and measures:
  time   t(B rows, T tokens) of one [B, T] step of the ragged graph against B one-row [1, T]
         steps of model.onnx (spare token on, as the one-slot engine feeds it),
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

from bundle.contract import QUERY_SEQLENS, RAGGED_MODEL_FILE  # noqa: E402


def ragged_graph(bundle: Path) -> Path:
    """The bundle's ragged graph (convert/ragged.py); bundles converted before it lack one."""
    path = bundle / RAGGED_MODEL_FILE
    if not path.is_file():
        raise SystemExit(f"{bundle} has no {RAGGED_MODEL_FILE} (not a CPU decoder bundle, or one "
                         "converted before 2026-12-06): convert it again")
    return path


class Steps:
    """In-place steps over one [rows, Hkv, S, D] cache per layer, as the ORT backend binds them."""

    def __init__(self, model: Path, threads: int, rows: int) -> None:
        from device.runtime.ort_backend import open_session

        self.session = open_session(model, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in inputs if n.startswith("past_")]
        shape = inputs[self.past[0]].shape  # [batch, Hkv, S, D]
        self.cache = {n: np.zeros((rows, shape[1], shape[2], shape[3]), np.float32) for n in self.past}
        self.spare = "spare_token" in inputs
        self.vocab = int(self.session.get_outputs()[0].shape[-1])

    def run(self, ids: np.ndarray, pos: np.ndarray, first: int, lens: np.ndarray | None = None,
            last_only: bool = False) -> np.ndarray:
        """Rows first..first+B-1 of the cache take ids/pos [B, T] -> logits [B, T or 1, V]."""
        B, T = ids.shape
        index = np.array([T - 1] if last_only else range(T), np.int64)
        out = np.empty((B, len(index), self.vocab), np.float32)
        b = self.session.io_binding()
        b.bind_cpu_input("input_ids", np.ascontiguousarray(ids, np.int64))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(pos, np.int64))
        b.bind_cpu_input("logits_index", index)
        if self.spare:  # what the one-slot engine feeds (the graph ignores it for B > 1)
            b.bind_cpu_input("spare_token", np.array(1, np.int32))
        if lens is not None:
            b.bind_cpu_input(QUERY_SEQLENS, lens.astype(np.int32))
        b.bind_output("logits", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        for name in self.past:
            view = self.cache[name][first:first + B]
            b.bind_cpu_input(name, view)
            b.bind_output(name.replace("past_", "present_"), "cpu", 0, np.float32, list(view.shape),
                          view.ctypes.data)
        self.session.run_with_iobinding(b)
        return out


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
    B, P, T = args.rows, args.position, max(args.tokens)
    rng = np.random.default_rng(0)
    batched = Steps(ragged_graph(bundle), args.threads, B)
    alone = Steps(bundle / "model.onnx", args.threads, B)
    alone.cache = batched.cache  # one cache: both graphs read and write the same rows
    prompts = rng.integers(100, 5000, (B, P)) % alone.vocab
    for r in range(B):
        alone.run(prompts[r:r + 1], np.arange(P)[None], r, last_only=True)
    snapshot = {k: v.copy() for k, v in batched.cache.items()}

    def restore() -> None:
        for k, v in batched.cache.items():
            v[...] = snapshot[k]

    draft = rng.integers(100, 5000, (B, T)) % alone.vocab
    pos = np.tile(P + np.arange(T), (B, 1))
    restore()
    full = batched.run(draft, pos, 0, np.full(B, T))
    same = 0.0
    for r in range(B):
        restore()
        same = max(same, float(np.abs(alone.run(draft[r:r + 1], pos[r:r + 1], r)[0] - full[r]).max()))
    lens = np.array([1 + (r * (T - 1)) // max(1, B - 1) for r in range(B)])  # 1 .. T
    ids, rpos = draft.copy(), pos.copy()
    for r, n in enumerate(lens):
        ids[r, n:], rpos[r, n:] = 0, P + n - 1  # padding: seqlens_k is the last real position
    restore()
    ragged = batched.run(ids, rpos, 0, lens)
    diffs = []
    for r, n in enumerate(lens):
        restore()
        one = alone.run(draft[r:r + 1, :n], pos[r:r + 1, :n], r)
        diffs.append((int(n), float(np.abs(one[0] - ragged[r, :n]).max())))
    times = []
    for t in sorted(args.tokens):
        d, p = draft[:, :t], pos[:, :t]
        one_step = median_ms(partial(batched.run, d, p, 0, np.full(B, t)), restore, args.repeat)
        per_row = median_ms(partial(alone.run, d[:1], p[:1], 0), restore, args.repeat)
        times.append((t, one_step, B * per_row))
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
