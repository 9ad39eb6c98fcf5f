"""Per-matrix sensitivity to the int4 grid: which weights to keep at 8 bits in a mixed graph.

A unit is the weights that read one input tensor x (q/k/v, gate/up: quantize/cpu.py fuses them
into one MatMulNBits, so they share one bit width; o_proj, down_proj and an untied head alone).
Its sensitivity is the relative output error when only its weights go to the 4-bit grid:

    err(x) = sum_W ||X W - X Q4(W)||^2 / sum_W ||X W||^2        X: [n, K] calibration rows of x

measured after AWQ (quantize/awq.py) with X / s and diag(s) W, so Q4 is the rounding the graph
really gets (the same grid, block and row importance). A proxy, cheap beside AWQ's search (one
rounding per weight instead of eleven); the accuracy gate on held-out text stays the judge of
whether a mix is good enough. The ratio, not the absolute error, so a unit whose outputs are
small anyway is not ranked above one whose outputs the rounding actually destroys.
Measured limit (SmolLM2, 30 of 120 units at 8 bits, README "Quantization"): this ranking did no
better than chance there (its top 30 +10.1 % perplexity, a random 30 +10.5 %, its bottom 30,
mostly q/k/v, +9.5 %): a per-matrix output error does not see how attention amplifies a q/k
error. An end-to-end proxy (next-token KL with one unit at 4 bits) would.

    sens = measure(model, rows, scales, quantizer, exclude={"lm_head"}, grid="zero-point", block=64)
    sens.widest(0.25)          # the most sensitive quarter of the units
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from quantize import graph as g
from quantize.activations import Rows
from quantize.awq import Quantizer

TOP = 10  # units listed in the manifest (most sensitive first)


@dataclass(frozen=True)
class Unit:
    input: str  # the activation tensor its weights read
    weights: tuple[str, ...]  # initializer names, in graph order
    layers: tuple[str, ...]  # their MatMul nodes, for people ("layers.3/mlp/down_proj")
    error: float  # relative output error at 4 bits (module docstring)
    elements: int  # weight elements: what 8 bits instead of 4 costs is elements / 2 bytes

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "weights": list(self.weights),
                "error": round(self.error, 6),
                "elements": self.elements}


@dataclass(frozen=True)
class Sensitivity:
    grid: str  # the 4-bit grid measured
    block: int
    rows: int  # calibration rows per input
    units: tuple[Unit, ...]  # most sensitive first

    def widest(self, fraction: float) -> tuple[Unit, ...]:
        """The ceil(fraction * units) most sensitive units (none for fraction 0)."""
        return self.units[:math.ceil(fraction * len(self.units))] if fraction > 0 else ()

    def to_json(self) -> dict[str, Any]:
        return {"proxy": "||X W - X Q4(W)||^2 / ||X W||^2 on the calibration rows of each input, "
                         "only that unit at 4 bits, after AWQ",
                "grid": self.grid, "block_size": self.block, "rows_per_input": self.rows,
                "units": len(self.units), "top": [u.to_json() for u in self.units[:TOP]]}


def measure(model: onnx.ModelProto, rows: dict[str, Rows], scales: dict[str, np.ndarray],
            quantizer: Quantizer, importance: dict[str, np.ndarray], exclude: set[str], grid: str,
            block: int) -> Sensitivity:
    """Rank the units of `model` (after AWQ: `scales` is input -> the s [K] its weights were
    multiplied by, absent where AWQ left an input alone). `importance`: weight -> row weights
    [K] the grid rounds with; `exclude`: weights that never go to 4 bits (the tied head)."""
    graph = model.graph
    by_x: dict[str, list[g.WeightMatMul]] = {}
    for m in g.weight_matmuls(graph):
        if m.weight not in exclude:
            by_x.setdefault(m.node.input[0], []).append(m)
    units = []
    n = 0
    for x, users in by_x.items():
        r = rows.get(x)
        if r is None:
            continue
        X = r.sample.astype(np.float32)  # [n, K]
        if x in scales:
            X = X / scales[x][None, :]
        n = max(n, len(X))
        num = den = 0.0
        distinct = list(dict((m.weight, m) for m in users).values())  # a weight read twice: once
        for m in distinct:
            w = g.to_array(graph, m.weight).astype(np.float32)  # [K, N]
            h = importance.get(m.weight, r.mean_sq.astype(np.float64))
            y = X @ w
            num += float(np.square(y - X @ quantizer(w, h)).sum())
            den += float(np.square(y).sum())
        units.append(Unit(x, tuple(m.weight for m in distinct), tuple(_label(m) for m in distinct),
                          num / den if den > 0 else 0.0, sum(m.K * m.N for m in distinct)))
    units.sort(key=lambda u: -u.error)
    return Sensitivity(grid, block, n, tuple(units))


def _label(m: g.WeightMatMul) -> str:
    """"/layers.3/mlp/down_proj/MatMul" -> "layers.3/mlp/down_proj"; the weight when unnamed."""
    return m.node.name.removesuffix("/MatMul").lstrip("/") or m.weight
