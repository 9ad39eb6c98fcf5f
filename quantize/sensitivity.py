"""Per-matrix sensitivity to the int4 grid: which weights to keep at 8 bits in a mixed graph.

A unit is the weights that read one input tensor x (q/k/v, gate/up: quantize/cpu.py fuses them
into one MatMulNBits, so they share one bit width; o_proj, down_proj and an untied head alone).
Its sensitivity is what the whole model loses when only that unit goes to the 4-bit grid:

    decoder  KL(p_fp32 || p_m) of the next-token distributions, in nats per token
    encoder  ||y - y_m||^2 / ||y||^2 of the first output (last hidden state)

over KL_TOKENS calibration tokens (a few windows of quantize/calibration.py's set), measured after
AWQ (quantize/awq.py) on the rescaled graph with the rounding the graph really gets (the same
grid, block and row importance). One ONNX Runtime session serves every unit: the unit weights
are listed as graph inputs as well as initializers, so a run overrides one unit's weights with
their 4-bit rounding and leaves every other weight at fp32; the fp32 outputs are computed once.
Cost: one forward over KL_TOKENS tokens per unit (SmolLM2, 120 units: 240 prefills of 128
tokens, ~40 GFLOP each: minutes on 2 cores, more than AWQ's search on a busy machine).
The gate on held-out text stays the judge of whether a mix is good enough.

Why end to end: the former proxy, each unit's own output error ||XW - XQ4(W)||^2 / ||XW||^2,
ranked no better than chance on SmolLM2 (its top 30 of 120 units at 8 bits +10.1 % perplexity,
a random 30 +10.5 %, its bottom 30 +9.5 %): a per-matrix error does not see how attention
amplifies a q/k error, or how much of a unit's error the residual stream washes out.

    sens = measure(model, windows, quantizer, importance, exclude={"lm_head"}, kind="decoder",
                   grid="zero-point", block=64, work_dir=tmp)
    sens.widest(0.25)          # the most sensitive quarter of the units
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bundle.progress import QUIET, Steps
from quantize import graph as g
from quantize.awq import Quantizer

TOP = 10  # units listed in the manifest (most sensitive first)
KL_TOKENS = 256  # calibration tokens each unit is measured on (whole windows, at least one)

PROXIES = {
    "decoder": "KL(p_fp32 || p) of the next-token distributions, nats per token, with only that "
               "unit at 4 bits (after AWQ)",
    "encoder": "||y - y_q||^2 / ||y||^2 of the last hidden state, with only that unit at 4 bits "
               "(after AWQ)",
}


@dataclass(frozen=True)
class Unit:
    input: str  # the activation tensor its weights read
    weights: tuple[str, ...]  # initializer names, in graph order
    layers: tuple[str, ...]  # their MatMul nodes, for people ("layers.3/mlp/down_proj")
    divergence: float  # what the model loses with this unit at 4 bits (PROXIES)
    elements: int  # weight elements: what 8 bits instead of 4 costs is elements / 2 bytes

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "weights": list(self.weights),
                "divergence": float(f"{self.divergence:.4g}"), "elements": self.elements}


@dataclass(frozen=True)
class Sensitivity:
    kind: str  # "decoder" | "encoder": which proxy (PROXIES)
    grid: str  # the 4-bit grid measured
    block: int
    tokens: int  # calibration tokens each unit was measured on
    units: tuple[Unit, ...]  # most sensitive first

    def widest(self, fraction: float) -> tuple[Unit, ...]:
        """The ceil(fraction * units) most sensitive units (none for fraction 0)."""
        return self.units[:math.ceil(fraction * len(self.units))] if fraction > 0 else ()

    def to_json(self) -> dict[str, Any]:
        return {"proxy": PROXIES[self.kind], "grid": self.grid, "block_size": self.block,
                "tokens": self.tokens, "units": len(self.units),
                "top": [u.to_json() for u in self.units[:TOP]]}


def units_of(model: onnx.ModelProto, exclude: set[str]) -> dict[str, list[g.WeightMatMul]]:
    """input -> the distinct weight MatMuls reading it (a weight read twice counts once);
    `exclude`: weights that never go to 4 bits (the tied head)."""
    by_x: dict[str, dict[str, g.WeightMatMul]] = {}
    for m in g.weight_matmuls(model.graph):
        if m.weight not in exclude:
            by_x.setdefault(m.node.input[0], {}).setdefault(m.weight, m)
    return {x: list(ms.values()) for x, ms in by_x.items()}


def measure(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], quantizer: Quantizer,
            importance: dict[str, np.ndarray], exclude: set[str], kind: str, grid: str, block: int,
            work_dir: Path, threads: int | None = None, steps: Steps = QUIET) -> Sensitivity:
    """Rank the units of `model` (after AWQ) by the divergence of its outputs over `feeds` (a
    few calibration windows: quantize/activations.py decoder_feeds / encoder_feeds) when only
    that unit's weights are rounded by `quantizer(w, importance[w])`."""
    from quantize.activations import session_with_inputs

    units = units_of(model, exclude)
    names = [m.weight for users in units.values() for m in users]
    out = "logits" if kind == "decoder" else model.graph.output[0].name
    divergence = _kl if kind == "decoder" else _relative_error
    graph = model.graph
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        run = session_with_inputs(model, names, Path(tmp), threads)
        reference = [run(out, feed, {}) for feed in feeds]
        tokens = sum(int(np.prod(r.shape[:-1])) for r in reference)
        ranked = []
        for i, (x, users) in enumerate(units.items()):
            if i and i % max(1, len(units) // 4) == 0:
                steps.say(f"    sensitivity: {i}/{len(units)} weight units measured")
            swapped = {}
            for m in users:
                w = g.to_array(graph, m.weight).astype(np.float32)  # [K, N]
                h = importance.get(m.weight, np.ones(m.K))
                swapped[m.weight] = quantizer(w, h).astype(np.float32)
            d = sum(divergence(ref, run(out, feed, swapped)) for ref, feed in zip(reference, feeds))
            ranked.append(Unit(x, tuple(swapped), tuple(_label(m) for m in users), d / tokens,
                               sum(m.K * m.N for m in users)))
    ranked.sort(key=lambda u: -u.divergence)
    return Sensitivity(kind, grid, block, tokens, tuple(ranked))


def window_count(seq_len: int) -> int:
    """Calibration windows of `seq_len` tokens that make about KL_TOKENS tokens (at least one)."""
    return max(1, round(KL_TOKENS / max(seq_len, 1)))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    """sum over tokens of KL(softmax(ref) || softmax(got)); ref, got: logits [..., V]."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum())


def _relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """||ref - got||^2 / ||ref||^2 per token row, summed over the rows."""
    a, b = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    num = np.square(a - b, dtype=np.float64).sum(axis=-1)
    den = np.maximum(np.square(a, dtype=np.float64).sum(axis=-1), 1e-30)
    return float((num / den).sum())


def _label(m: g.WeightMatMul) -> str:
    """"/layers.3/mlp/down_proj/MatMul" -> "layers.3/mlp/down_proj"; the weight when unnamed."""
    return m.node.name.removesuffix("/MatMul").lstrip("/") or m.weight
