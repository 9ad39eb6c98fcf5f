"""AWQ: scale each weight's input channels by how large its activations run, then round.

A plain 4-bit grid (symmetric, or with an integer zero point) rounds every input channel of a
weight alike, yet a few channels of x carry most of the product x @ W. For the weights that read
one x,

    y = x @ W = (x / s) @ (diag(s) W)        s_k = mean|x_k|^a / sqrt(max * min)   a in ALPHAS

so rows of W that meet large activations get a finer share of their block's grid. a is chosen per
input to minimise the output error on calibration rows X,

    err(a) = || X @ W  -  (X / s) @ Q(diag(s) W) ||^2        summed over the weights that read x

and a = 0 is s = 1 (plain rounding), so the choice is never worse than plain rounding on X. The
division by s is folded into the op that makes x (quantize/smooth.py: the RMSNorm's gamma, or
up_proj's columns for the down_proj input), so the graph gains no node; inputs whose producer
cannot take it (the attention output into o_proj) are rounded plainly.

The grid itself then rounds each block by the error it causes in the output rather than in the
weight: each row k's squared error counts E[(x_k / s_k)^2] (quantize/blockwise.py, importance),
for every weight AWQ has calibration rows of, o_proj's and the head's included (that needs no
fold).

Only for the plain grids. The offset grid reproduces a Q4_1 GGUF's own blocks exactly, and any
s != 1 would move its weights off them. Not the tied LM head either: its rows are also the
embedding table, which cannot take 1/s.
Reference: Lin et al., "AWQ: Activation-aware Weight Quantization", MLSys 2024 (arXiv:2306.00978).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from quantize import graph as g
from quantize.activations import Rows
from quantize.smooth import _array, _store, divide, fold_target

ALPHAS = tuple(i / 10 for i in range(11))

# (W [K, N], row importance [K]) -> the dequantized grid values [K, N]
Quantizer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class AwqStats:
    scaled: int  # inputs whose weights were rescaled (a > 0)
    plain: int  # inputs where a = 0 won (plain rounding was best on the calibration rows)
    skipped: int  # inputs not rescaled: the producer cannot take 1/s, or an `exclude` weight reads it
    why_not: dict[str, str] = field(default_factory=dict)  # input tensor -> why it was not rescaled
    alphas: dict[str, float] = field(default_factory=dict)  # input tensor -> the chosen a
    error_ratio: float = 1.0  # sum of err(chosen a) / sum of err(a = 0), over the inputs searched
    # weight -> E[x_k^2] of its (rescaled) input [K]: the grid's rounding weights (not in to_json)
    importance: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    # input tensor -> s [K] its weights were multiplied by (a > 0 only; the input is now x / s)
    scales: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"scaled_inputs": self.scaled, "plain_inputs": self.plain,
                "skipped_inputs": self.skipped, "alphas": sorted(set(self.alphas.values())),
                "not_rescaled": {why: sum(1 for w in self.why_not.values() if w == why)
                                 for why in sorted(set(self.why_not.values()))},
                "error_vs_plain_rounding": round(self.error_ratio, 4)}


def awq_inputs(model: onnx.ModelProto) -> list[str]:
    """The tensors AWQ needs calibration rows of: the inputs of every weight MatMul."""
    return list(dict.fromkeys(m.node.input[0] for m in g.weight_matmuls(model.graph)))


def awq(model: onnx.ModelProto, rows: dict[str, Rows], quantizer: Quantizer,
        exclude: set[str]) -> AwqStats:
    """Rescale weights and fold 1/s upstream, in place. `rows`: calibration rows per input;
    `exclude`: weights never rescaled (the tied head), which still get rounding importance."""
    graph = model.graph
    inits, cons = g.initializers(graph), g.consumers(graph)
    mms = g.weight_matmuls(graph)
    outputs = {m.node.output[0] for m in mms}
    by_x: dict[str, list[g.WeightMatMul]] = {}
    for m in mms:
        by_x.setdefault(m.node.input[0], []).append(m)
    alphas: dict[str, float] = {}
    importance: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    why_not: dict[str, str] = {}
    err_best = err_plain = 0.0
    for x, users in by_x.items():
        r = rows.get(x)
        if r is None:
            why_not[x] = "no calibration rows"
            continue
        fold = (None if any(m.weight in exclude for m in users) else
                fold_target(graph, x, inits, cons, outputs, unshare=True))
        h = r.mean_sq.astype(np.float64)
        if fold is None or len(cons.get(x, [])) != len(users):
            why_not[x] = _why_not(graph, x, users, exclude, fold is None)
            importance.update((m.weight, h) for m in users)  # the grid still rounds by output error
            continue
        weights = [_array(inits[m.weight]) for m in users]
        a, s, errs = _search(r, weights, quantizer)
        err_best, err_plain = err_best + min(errs), err_plain + errs[0]
        alphas[x] = a
        importance.update((m.weight, h / np.square(s.astype(np.float64))) for m in users)
        if a == 0.0:
            continue
        for m, w in zip(users, weights):
            _store(inits[m.weight], w * s[:, None])
        divide(inits, fold, s)
        scales[x] = s
    scaled = sum(1 for a in alphas.values() if a > 0)
    return AwqStats(scaled, len(alphas) - scaled, len(why_not), why_not, alphas,
                    err_best / err_plain if err_plain > 0 else 1.0, importance, scales)


def _why_not(graph: onnx.GraphProto, x: str, users: list[g.WeightMatMul], exclude: set[str],
             no_fold: bool) -> str:
    if any(m.weight in exclude for m in users):
        return "read by the tied LM head (its rows are the embedding table too)"
    if not no_fold:
        return "read by other nodes than its weights"
    p = g.producer(graph, x)
    return f"made by {p.op_type if p is not None else 'a graph input'}, which cannot take 1/s"


def _search(r: Rows, weights: list[np.ndarray],
            quantizer: Quantizer) -> tuple[float, np.ndarray, list[float]]:
    """(a, s, err per a): the a in ALPHAS with the least output error on r.sample."""
    X = r.sample.astype(np.float32)  # [n, K]
    base = np.maximum(r.mean_abs.astype(np.float64), 1e-6)
    h = r.mean_sq.astype(np.float64)
    errs: list[float] = []
    best: tuple[float, float, np.ndarray] = (np.inf, 0.0, np.ones_like(base, dtype=np.float32))
    for a in ALPHAS:
        s = base ** a
        s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # centred: no overall drift
        err = 0.0
        for w in weights:
            ws = w * s[:, None]
            delta = (ws - quantizer(ws, h / np.square(s))) / s[:, None]  # W - Q(diag(s) W) / s
            err += float(np.square(X @ delta).sum())
        errs.append(err)
        if err < best[0]:
            best = (err, a, s)
    return best[1], best[2], errs
