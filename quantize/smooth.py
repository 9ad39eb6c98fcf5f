"""SmoothQuant for the W8A8 formats: move activation outliers into the weights before quantizing.

Per-tensor int8 activations fail on small LLMs: a handful of channels carry values hundreds of
times larger than the rest (SmolLM2-135M: up to 3,500 at a down_proj input against a typical
few units), so one scale per tensor rounds everything else to zero. For a linear layer
y = x @ W the per-input-channel factor s leaves y unchanged,

    y = (x / s) @ (diag(s) W)          s_j = max|x_j|^a / max|W_j,:|^(1-a)   (a = 0.5)

and the division by s is folded into the op that makes x, so the graph gains no node:
  * x = RMSNorm(h) * gamma       -> gamma_j /= s_j            (q/k/v, gate/up inputs; the
                                    decomposed Mul, or ORT's fused (Skip)SimplifiedLayerNorm)
  * x = silu(gate) * (h @ W_up)  -> W_up[:, j] /= s_j          (down_proj input; also where
                                    gate and up are one packed matrix split in two: its up columns)
Other producers (the attention output into o_proj) are left as they are.
Reference: Xiao et al., "SmoothQuant", ICML 2023 (arXiv:2211.10438).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from quantize import graph as g
from quantize.activations import Range

DEFAULT_ALPHA = 0.5


@dataclass(frozen=True)
class Fold:
    """Where x / s goes: into the producer's gamma ("vector"), gamma and beta ("affine"), or
    columns lo:hi of the matrix whose product x is multiplied by ("columns", W_up)."""

    kind: str
    names: tuple[str, ...]
    lo: int = 0
    hi: int | None = None  # None: to the last column


@dataclass(frozen=True)
class SmoothStats:
    smoothed: int  # activation tensors whose outliers moved into weights
    skipped: int  # activation tensors left as they are (producer not foldable)

    def to_json(self) -> dict[str, int]:
        return {"smoothed_tensors": self.smoothed, "skipped_tensors": self.skipped}


def smooth(model: onnx.ModelProto, ranges: dict[str, Range], alpha: float = DEFAULT_ALPHA) -> tuple[
        dict[str, Range], SmoothStats]:
    """Rescale weights in place; returns the activation ranges after smoothing."""
    graph = model.graph
    inits = g.initializers(graph)
    cons = g.consumers(graph)
    mms = g.weight_matmuls(graph)
    by_input: dict[str, list[g.WeightMatMul]] = {}
    for m in mms:
        by_input.setdefault(m.node.input[0], []).append(m)
    out = dict(ranges)
    done = skipped = 0
    for x, users in by_input.items():
        r = ranges.get(x)
        fold = fold_target(graph, x, inits, cons, {m.node.output[0] for m in mms})
        if r is None or r.channels is None or fold is None or len(cons.get(x, [])) != len(users):
            skipped += 1
            continue
        weights = [_array(inits[m.weight]) for m in users]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)  # [K]
        s = _factors(r.channels, wmax, alpha)
        for m, w in zip(users, weights):
            _store(inits[m.weight], w * s[:, None])
        divide(inits, fold, s)
        channels = r.channels / s
        out[x] = Range(float(channels.max()), r.observed_max, channels)
        done += 1
    return out, SmoothStats(done, skipped)


def _factors(act: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    s = np.power(np.maximum(act, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


# RMSNorm ops ONNX Runtime fuses on CPU graphs (convert/optimize.py): where their gamma sits
FUSED_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def fold_target(graph: onnx.GraphProto, x: str, inits: dict[str, onnx.TensorProto],
                cons: dict[str, list[onnx.NodeProto]], mm_outputs: set[str],
                unshare: bool = False) -> Fold | None:
    """("vector", gamma), ("affine", gamma, beta) of a LayerNormalization (phi, stablelm, gpt2:
    y / s = x_hat * gamma / s + beta / s) or ("columns", W_up) that x's producer multiplies by
    (W_up's product alone, or one part of a packed [gate; up] product's Split), else None
    (OLMo 2's q/k/v and up/gate read the residual stream itself: nothing to fold into).
    unshare: a gamma that other nodes read too (an exporter merges identical initializers, e.g.
    norms still at their all-ones init) gets a private copy first."""
    p = g.producer(graph, x)
    if p is not None and p.op_type in FUSED_NORMS and p.output[0] == x:
        return _gamma(graph, p, FUSED_NORMS[p.op_type], inits, cons, unshare)
    if p is not None and p.op_type == "LayerNormalization" and len(p.input) == 3:
        gamma = _gamma(graph, p, 1, inits, cons, unshare)
        beta = _gamma(graph, p, 2, inits, cons, unshare)
        return Fold("affine", gamma.names + beta.names) if gamma and beta else None
    if p is None or p.op_type != "Mul":
        return None
    for i, name in enumerate(p.input):
        if name in inits or (unshare and _identity_of_initializer(graph, name, inits)):
            return _gamma(graph, p, i, inits, cons, unshare)
        if len(cons.get(name, [])) != 1:
            continue
        lo, hi, product = 0, None, name
        part = g.producer(graph, name)
        if part is not None and part.op_type == "Split":  # one half of a packed [gate; up]
            columns = _split_columns(graph, part, name, inits)
            if columns is None or len(cons.get(part.input[0], [])) != 1:
                continue
            (lo, hi), product = columns, part.input[0]
        if product in mm_outputs:
            up = g.producer(graph, product)
            w = up.input[1] if up is not None else None
            if w in inits and len(cons.get(w, [])) == 1:
                return Fold("columns", (w,), lo, hi)
    return None


def _split_columns(graph: onnx.GraphProto, split: onnx.NodeProto, part: str,
                   inits: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """The columns [lo, hi) of the split product that output `part` holds: a Split along the
    last axis with constant sizes (convert/decoder.py's packed gate/up); else None."""
    if g.attr(split, "axis") != -1 or len(split.input) < 2:
        return None
    sizes = inits.get(split.input[1])
    const = g.producer(graph, split.input[1]) if sizes is None else None
    if const is not None and const.op_type == "Constant":
        sizes = next((a.t for a in const.attribute if a.name == "value"), None)
    if sizes is None:
        return None
    ends = np.cumsum(numpy_helper.to_array(sizes)).tolist()
    j = list(split.output).index(part)
    return (ends[j - 1] if j else 0), ends[j]


def _gamma(graph: onnx.GraphProto, p: onnx.NodeProto, i: int, inits: dict[str, onnx.TensorProto],
           cons: dict[str, list[onnx.NodeProto]], unshare: bool) -> Fold | None:
    """("vector", the 1-D initializer p.input[i]) if p alone reads it (or after unsharing;
    torch's exporter also hands out a merged initializer as Identity copies of it)."""
    t = inits.get(p.input[i])
    if t is None and unshare:
        t = _identity_of_initializer(graph, p.input[i], inits)
    if t is None or len(t.dims) != 1:
        return None
    if t.name != p.input[i] or len(cons.get(p.input[i], [])) != 1:
        if not unshare:
            return None
        p.input[i] = g.add_initializer(graph, numpy_helper.to_array(t).copy(),
                                       g.unique_name(graph, f"{t.name}_unshared"))
        inits[p.input[i]] = graph.initializer[-1]
    return Fold("vector", (p.input[i],))


def _identity_of_initializer(graph: onnx.GraphProto, name: str,
                             inits: dict[str, onnx.TensorProto]) -> onnx.TensorProto | None:
    src = g.producer(graph, name)
    return inits.get(src.input[0]) if src is not None and src.op_type == "Identity" else None


def divide(inits: dict[str, onnx.TensorProto], fold: Fold, s: np.ndarray) -> None:
    """Fold x / s into x's producer: gamma / s (and beta / s), or W_up[:, lo + j] / s_j."""
    for name in fold.names:
        t = _array(inits[name])
        if fold.kind == "columns":
            t = t.copy()
            t[:, fold.lo:fold.hi] /= s[None, :]
            _store(inits[name], t)
        else:
            _store(inits[name], t / s)


def _array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t).astype(np.float32)


def _store(t: onnx.TensorProto, value: np.ndarray) -> None:
    t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), t.name))
