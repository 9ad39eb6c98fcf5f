"""ONNX Runtime CPU formats.

  ort-matmulnbits     block-wise weight-only MatMulNBits (com.microsoft), block 32 along K,
                      accuracy_level 4 (ORT quantizes the activations to int8 per block inside
                      the kernel and runs int8 dot products: the fast path on x86 and arm64).
                      int4: the grid the gate settles on (symmetric, integer zero points, or
                      per-block offsets: their whole steps in the zero points, the rest carried
                      as extra rows, see OffsetRows below); the plain grids after AWQ
                      (quantize/awq.py), each block rounded by output error;
                      int8 (and the 8-bit layers of a mixed int4 step): an integer zero point
                      per block (`grid8`); the head keeps symmetric codes (see _head_block).
  ort-matmul-integer  dynamic int8: MatMulInteger with per-tensor activations quantized at run
                      time (DynamicQuantizeLinear) and per-channel weights
                      (onnxruntime.quantization.quantize_dynamic).

The tied LM head (our export stores it transposed, [C, V], and the embedding is a Gather on axis
1 of the same initializer) gets ONE quantized copy in MatMulNBits' layout [V, C/block, block·bits/8]
that both nodes read: MatMulNBits for the logits and GatherBlockQuantized (gather_axis 0, the same
bytes seen as [V, C/block, block]) for the embedding, so no float copy of the 49152 x 576 table
stays in memory. It is quantized at `head_bits` (8: the largest matrix and the last layer before
the logits, as llama.cpp's Q4_1 file keeps it at Q8_0). An untied head (Phi-3, Mistral) is
found by walking back from the logits (quantize/graph.lm_head) and gets the same bits.

    ids ──GatherBlockQuantized(Wq)──Reshape[-1, C]──Transpose──► [C, n]  (was Gather(W, axis=1))
    h ──MatMulNBits(Wq)──► logits                                         (was MatMul(h, W))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from quantize import graph as g
from quantize.blockwise import BlockWeights, quantize_offset, quantize_symmetric, quantize_zero_point
from targets.plan import EMBEDDING_MIN  # untied tables smaller than this stay float (the plan counts so)

MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class NBitsConfig:
    bits: int = 4
    block: int = 32
    # the bundle's grid: int4 layers "symmetric" | "zero-point" | "offsets"; in int8 bundles the
    # 8-bit layers' grid (= grid8) (formats.QuantOptions)
    grid: str = "offsets"
    accuracy_level: int = 4  # int8 compute inside MatMulNBits
    head_bits: int = 8  # the LM head (tied or not) and embedding tables
    # their block size along K beside the int4 plain grids (see _head_block): there a scale per
    # 64 cost nothing measurable (SmolLM2 int4: perplexity +12.34 -> +12.43 %), and an A/B gave
    # int4 decode 0.95x -> 1.03x genai int4 (the head's kernel alone saves ~1 % of a step,
    # 2026-12-05: that A/B was mostly this VM's noise)
    head_block: int = 64
    fuse: bool = True  # one MatMulNBits for the projections that share an input (q/k/v, gate/up)
    # int4 layers kept at 8 bits (a mixed step of the ladder: quantize/sensitivity.py), in the
    # grid8 grid and the same blocks; a fused group follows its first weight (the sensitivity
    # units are whole groups)
    eight_bit: frozenset[str] = frozenset()
    # the grid of every 8-bit layer but the head (formats.QuantOptions.int8_grid): "zero-point" or
    # "symmetric"
    grid8: str = "zero-point"

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block, "grid": self.grid,
                "symmetric": self.grid == "symmetric", "accuracy_level": self.accuracy_level,
                "int8_grid": self.grid8,
                "head_bits": self.head_bits, "head_block_size": _head_block(self, None),
                "fused_shared_input": self.fuse}


@dataclass
class CpuResult:
    model: onnx.ModelProto
    details: dict[str, Any] = field(default_factory=dict)


def pack_nbits(bw: BlockWeights) -> np.ndarray:
    """MatMulNBits' B: uint8 [N, k_blocks, block * bits / 8], each column's blocks in K order,
    4-bit values two per byte with the first in the low nibble."""
    kb, N = bw.scales.shape
    codes = bw.codes.reshape(kb, bw.block, N).transpose(2, 0, 1)  # [N, kb, block]
    if bw.bits == 8:
        return np.ascontiguousarray(codes)
    return np.ascontiguousarray(codes[..., 0::2] | (codes[..., 1::2] << 4))


def pack_zero_points(bw: BlockWeights) -> np.ndarray:
    """MatMulNBits' zero_points: uint8 [N * ceil(k_blocks * bits / 8)], each column's blocks in K
    order, 4-bit values two per byte (low nibble first, each column padded to a whole byte)."""
    assert bw.zero_points is not None
    zp = np.ascontiguousarray(bw.zero_points.T)  # [N, kb]
    if bw.bits == 8:
        return zp.reshape(-1)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
    return np.ascontiguousarray(zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1)


def matmul_nbits(model: onnx.ModelProto, cfg: NBitsConfig,
                 importance: dict[str, np.ndarray] | None = None) -> CpuResult:
    """importance: weight -> per-row weights [K] of the rounding error (AWQ's E[x^2]) for the
    plain int4 grids; rows count alike without it."""
    graph = model.graph
    importance = dict(importance or {})
    tied = tied_tables(graph)
    heads = head_weights(graph)
    head_weight = g.lm_head(graph)  # read before the rewrite replaces its MatMul
    rows = OffsetRows(graph, cfg.block)
    # (weight, bits, grid, block) -> ([B, scales, zp?], codes)
    packed: dict[tuple[str, int, str, int], tuple[list[str], BlockWeights]] = {}
    stats: dict[str, Any] = {"layers": 0, "weights": 0, "offset_rows": 0, "embeddings": []}
    mms = {m.node.output[0]: m for m in g.weight_matmuls(graph)}
    gathers = {e.node.output[0]: e for e in g.embedding_gathers(graph, min_elements=0)
               if e.table in tied or _elements(graph, e.table) >= EMBEDDING_MIN}

    def quantized(name: str, bits: int, grid: str, block: int) -> tuple[list[str], BlockWeights]:
        """The initializers MatMulNBits reads ([B, scales] or [B, scales, zero_points]) and the
        codes of one weight, made once. The offset grid's B, scales and zero points carry the offset
        rows and the offsets' whole steps."""
        key = (name, bits, grid, block)
        if key not in packed:
            w = g.to_array(graph, name).astype(np.float32)
            h = importance.get(name) if bits == 4 else None
            bw = (quantize_symmetric(w, bits, block, importance=h) if grid == "symmetric" else
                  quantize_zero_point(w, bits, block, importance=h) if grid == "zero-point" else
                  quantize_offset(w, bits, block))
            stored = with_offset_rows(bw) if grid == "offsets" else bw
            inputs = [g.add_initializer(graph, pack_nbits(stored), g.unique_name(graph, f"{name}_q{bits}")),
                      g.add_initializer(graph, np.ascontiguousarray(stored.scales.T),  # [N, kb]
                                        g.unique_name(graph, f"{name}_scales"))]
            if stored.zero_points is not None:
                inputs.append(g.add_initializer(graph, pack_zero_points(stored),
                                                g.unique_name(graph, f"{name}_zero_points")))
            packed[key] = (inputs, bw)
        return packed[key]

    groups = _groups(graph, [m for m in mms.values() if m.weight not in heads]) if cfg.fuse else {}

    def replace(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        out = node.output[0]
        if out in groups:  # first member: the fused layer; later members: nothing
            group = groups[out]
            return _fused(group) if group[0].node.output[0] == out else []
        if out in mms:
            return _matmul(mms[out])
        if out in gathers:
            return _gather(gathers[out])
        return None

    def _fused(group: list[g.WeightMatMul]) -> list[onnx.NodeProto]:
        """One MatMulNBits over the concatenated weights [K, N1+N2+..], Split back: the q/k/v
        (and gate/up) projections read the same x; one kernel call instead of three saves
        per-call overhead that dominates a decode step of a model this small."""
        first = group[0]
        name = g.unique_name(graph, f"{first.weight}_fused")
        g.add_initializer(graph, np.concatenate([g.to_array(graph, m.weight) for m in group], axis=1),
                          name)
        if first.weight in importance:  # the members read the same x: one importance
            importance[name] = importance[first.weight]
        fused = g.WeightMatMul(first.node, name, first.K, sum(m.N for m in group))
        joined = g.unique_name(graph, f"{first.node.output[0]}_fused")
        nodes = _matmul(fused, joined, wide=first.weight in cfg.eight_bit)
        sizes = g.add_initializer(graph, np.array([m.N for m in group], np.int64),
                                  g.unique_name(graph, f"{name}_split"))
        nodes.append(helper.make_node("Split", [joined, sizes], [m.node.output[0] for m in group],
                                      axis=-1, name=f"{name}_Split"))
        stats["fused_groups"] = stats.get("fused_groups", 0) + 1
        return nodes

    def _matmul(m: g.WeightMatMul, out: str | None = None, wide: bool = False) -> list[onnx.NodeProto]:
        head = m.weight in heads
        bits = cfg.head_bits if head else 8 if wide or m.weight in cfg.eight_bit else cfg.bits
        grid = "symmetric" if head else cfg.grid if bits == 4 else cfg.grid8
        # MatMulNBits pads K to whole blocks for the symmetric and zero-point grids alike (zero
        # points included); only the offset rows need whole blocks (with_offset_rows), so such
        # a weight falls back to symmetric codes, and the manifest names it
        if grid == "offsets" and m.K % cfg.block:
            grid = "symmetric"
            stats.setdefault("symmetric_not_offsets", []).append(m.weight)
        block = _head_block(cfg, m.K) if head else cfg.block
        inputs, bw = quantized(m.weight, bits, grid, block)
        stats["layers"] += 1
        stats["weights"] += m.K * m.N
        name = m.node.name or m.weight
        x, K = m.node.input[0], m.K
        nodes: list[onnx.NodeProto] = []
        if grid == "offsets":  # read [x | block sums | block sums] instead of x
            x, K, nodes = rows.augmented(x, m.K)
            stats["offset_rows"] += 1
        return nodes + [helper.make_node("MatMulNBits", [x, *inputs], [out or m.node.output[0]],
                                         domain=MS_DOMAIN, K=K, N=m.N, bits=bits, block_size=block,
                                         accuracy_level=cfg.accuracy_level, name=f"{name}_Q{bits}")]

    def _gather(e: g.EmbeddingGather) -> list[onnx.NodeProto] | None:
        return _quantized_gather(graph, e, cfg, quantized, stats)

    g.rewrite_nodes(graph, replace)
    g.drop_unused_initializers(graph)
    g.ensure_opset(model, MS_DOMAIN, 1)
    return CpuResult(model, {**cfg.to_json(), **stats, "tied_head": sorted(tied), "lm_head": head_weight,
                             "kernel": "com.microsoft.MatMulNBits"})


# --- the offset grid inside one MatMulNBits ---------------------------------------------------
#
# The offset form W[k, n] = s[b, n] (q[k, n] - 8) + c[b, n] (quantize/blockwise.py; exact on the
# packaged Q4_1 weights) needs x @ W = x @ (s (q - 8)) + bs(x) @ C, with bs(x)[b] the sum of x
# over block b. Run as a separate MatMul + Add per weight, the second term cost a third of a
# SmolLM2 decode step (three small nodes per weight: per-node overhead, and C in fp32). Instead
# the block sums ride along as extra input features of the same MatMulNBits, and the whole part
# of each offset (in steps) rides in its integer zero point:
#
#     z = clip(round(8 - c / s), 0, 15)    r = c - s (8 - z)    so  W = s (q - z) + r,  |r| <= s / 2
#
#     x_aug = [x | bs(x) 0.. | bs(x) 0..]           [.., K + 2P]   P = kb rounded up to a block
#     W_aug = [ s (q - z)  ]  K rows                 (the int4 codes as before, zero points z)
#             [ R1         ]  P rows: R rounded to 4 bits (symmetric, per block of P rows)
#             [ R - R1     ]  P rows: the remainder, rounded to 4 bits again
#
# so x_aug @ W_aug = x @ W up to the two-digit rounding of R (about 8 bits: |error| <= max|R| / 240
# per block of residuals). Why the zero points: with accuracy_level 4 the kernel rounds x to int8
# per block of 32, and that rounding error e meets the integer part of the weight, sum_k e_k
# s (q_k - z). With z = 8 that part is the weight shifted by the block's offset c (up to 7 steps,
# a median 1 on SmolLM2), so the block adds a coherent -c sum_k e_k; with the zero points it is
# the weight itself within half a step, as in llama.cpp's Q4_1 x Q8_1 dot product (its offset
# term reads the sum of the rounded activations). On SmolLM2's default int4 (2026-12-05): mean KL
# divergence from fp32 over 9,517 tokens 0.00498 -> 0.00402, top-1 0.953 -> 0.959, held-out
# perplexity 26.720 -> 26.573 (fp32 26.640, llama.cpp Q4_1 26.676). Computing the offset term
# exactly in fp32 instead (block sums unrounded) left the KL at 0.00497: the block sums' own
# rounding was not the loss. The cost: ONNX Runtime's one-row (decode) kernel for symmetric
# blocks of 32 does not take zero points, so a one-token step runs ~10 % slower (one in-process
# A/B of 10 rounds: 0.90x); through the daemon, whose drafted steps run the multi-row kernel
# either way, 1.07x (6 rounds; the output, and so what drafting accepts, changed too). x_aug
# costs one small MatMul (the block sums, padded) and a Concat, shared by every weight that reads
# the same x; the zero rows under the padding keep the padded entries out of the result. (A
# Reshape + ReduceSum + Pad variant measured ~0.2 ms a step slower on SmolLM2: four nodes
# instead of two.)

OFFSET_DIGITS = 2


def with_offset_rows(bw: BlockWeights) -> BlockWeights:
    """bw (offset form) as the codes, scales and zero points of the augmented weight [K + 2P, N]:
    the offsets' whole steps in the zero points, the residuals in the rows (see above)."""
    assert bw.offsets is not None and bw.K % bw.block == 0
    kb, N = bw.offsets.shape
    P = -(-kb // bw.block) * bw.block
    top = (1 << bw.bits) - 1
    zero = np.clip(np.round(bw.mid - bw.offsets / bw.scales), 0, top)  # [kb, N]
    R = np.zeros((P, N), np.float32)
    R[:kb] = bw.offsets - bw.scales * (bw.mid - zero)
    codes, scales, zps = [bw.codes[:bw.K]], [bw.scales], [zero.astype(np.uint8)]
    for _ in range(OFFSET_DIGITS):
        digit = quantize_symmetric(R, bw.bits, bw.block, search=False)
        codes.append(digit.codes)
        scales.append(digit.scales)
        zps.append(np.full(digit.scales.shape, bw.mid, np.uint8))  # symmetric: the mid code
        R = R - digit.dequantize()
    return BlockWeights(np.concatenate(codes), np.concatenate(scales), None, bw.bits, bw.block,
                        bw.K + OFFSET_DIGITS * P, np.concatenate(zps))


class OffsetRows:
    """Builds x_aug = Concat(x, bs, bs) once per input tensor x, where bs = x @ E and E [K, P]
    is the block indicator (E[k, k // block] = 1, zero columns up to P): one MatMul gives the
    block sums already padded to whole blocks, for any rank of x. E is shared by every weight
    with the same K (one [576, 32] table for most of a small decoder: it stays in cache)."""

    def __init__(self, graph: onnx.GraphProto, block: int) -> None:
        self.graph, self.block = graph, block
        self.made: dict[str, tuple[str, int]] = {}  # x -> (x_aug, K_aug)
        self.indicators: dict[int, str] = {}  # K -> E

    def augmented(self, x: str, K: int) -> tuple[str, int, list[onnx.NodeProto]]:
        if x in self.made:
            return (*self.made[x], [])
        sums, out = g.unique_name(self.graph, f"{x}_block_sums"), g.unique_name(self.graph, f"{x}_aug")
        nodes = [helper.make_node("MatMul", [x, self._indicator(K)], [sums], name=f"{sums}_MatMul"),
                 helper.make_node("Concat", [x] + [sums] * OFFSET_DIGITS, [out], axis=-1,
                                  name=f"{out}_Concat")]
        P = self._padded(K)
        self.made[x] = (out, K + OFFSET_DIGITS * P)
        return out, K + OFFSET_DIGITS * P, nodes

    def _padded(self, K: int) -> int:
        kb = K // self.block
        return -(-kb // self.block) * self.block

    def _indicator(self, K: int) -> str:
        if K not in self.indicators:
            e = np.zeros((K, self._padded(K)), np.float32)
            e[np.arange(K), np.arange(K) // self.block] = 1.0
            name = g.unique_name(self.graph, f"block_sums_{K}")
            self.indicators[K] = g.add_initializer(self.graph, e, name)
        return self.indicators[K]


def _groups(graph: onnx.GraphProto, mms: list[g.WeightMatMul]) -> dict[str, list[g.WeightMatMul]]:
    """Weight MatMuls that read the same input, each weight used once: output -> its group."""
    uses: dict[str, int] = {}
    for m in g.weight_matmuls(graph):
        uses[m.weight] = uses.get(m.weight, 0) + 1
    by_x: dict[str, list[g.WeightMatMul]] = {}
    for m in mms:
        if uses[m.weight] == 1:
            by_x.setdefault(m.node.input[0], []).append(m)
    order = {n.output[0]: i for i, n in enumerate(graph.node)}
    out: dict[str, list[g.WeightMatMul]] = {}
    for group in by_x.values():
        if len(group) > 1:
            group.sort(key=lambda m: order[m.node.output[0]])
            for m in group:
                out[m.node.output[0]] = group
    return out


def head_weights(graph: onnx.GraphProto) -> set[str]:
    """The weights kept at head_bits, never at 4 bits: the tied tables and the LM head, tied or
    not (an untied head, Phi-3's or Mistral's, was quantized like any layer, 4 bits, while the
    manifest's head_bits said 8)."""
    head = g.lm_head(graph)
    return tied_tables(graph) | ({head} if head else set())


def tied_tables(graph: onnx.GraphProto) -> set[str]:
    """Initializers that are both a MatMul weight and an embedding table (a tied LM head)."""
    weights = {m.weight for m in g.weight_matmuls(graph)}
    return {e.table for e in g.embedding_gathers(graph, min_elements=0) if e.table in weights}


def _elements(graph: onnx.GraphProto, name: str) -> int:
    return int(np.prod(g.initializers(graph)[name].dims))


def _quantized_gather(graph: onnx.GraphProto, e: g.EmbeddingGather, cfg: NBitsConfig, quantized: Any,
                      stats: dict[str, Any]) -> list[onnx.NodeProto] | None:
    """GatherBlockQuantized over the MatMulNBits layout of the table, or None (kept float)."""
    bits = cfg.head_bits
    data = g.to_array(graph, e.table)
    C = data.shape[0] if e.axis == 1 else data.shape[1]
    block = _head_block(cfg, C)
    if e.axis not in (0, 1) or (e.axis == 1 and not e.indices_rank1) or C % block:
        stats["embeddings"].append({"table": e.table, "kept": "float (layout not supported)"})
        return None
    # Quantize as a [C, V] matrix (blocks along C): for axis 1 that is the table itself and the
    # bytes are shared with the tied MatMulNBits; for axis 0 ([V, C]) its transpose.
    src = e.table if e.axis == 1 else _transposed(graph, e.table)
    (b, *_), bw = quantized(src, bits, "symmetric", block)
    V, kb = bw.scales.shape[1], bw.scales.shape[0]
    s3 = g.add_initializer(graph, np.ascontiguousarray(bw.scales.T)[:, :, None],  # [V, kb, 1]
                           g.unique_name(graph, f"{e.table}_gather_scales"))
    out = e.node.output[0]
    rows = g.unique_name(graph, f"{out}_rows")  # [*idx, kb, block]
    nodes = [helper.make_node("GatherBlockQuantized", [b, e.node.input[1], s3], [rows], domain=MS_DOMAIN,
                              bits=bits, block_size=block, gather_axis=0, quantize_axis=2,
                              name=f"{e.node.name or out}_GBQ")]
    if e.axis == 1:  # [n, kb, block] -> [n, C] -> [C, n], what Gather(axis=1) gave
        flat = g.unique_name(graph, f"{out}_flat")
        shape = g.add_initializer(graph, np.array([-1, C], np.int64), g.unique_name(graph, f"{out}_shape"))
        nodes += [helper.make_node("Reshape", [rows, shape], [flat]),
                  helper.make_node("Transpose", [flat], [out], perm=[1, 0])]
    else:  # [*idx, kb, block] -> [*idx, C]: merge the last two axes
        nodes += _merge_last_two(graph, rows, out, C)
    stats["embeddings"].append({"table": e.table, "bits": bits, "shared_with_lm_head": e.axis == 1,
                                "rows": V, "blocks": kb})
    return nodes


def _head_block(cfg: NBitsConfig, K: int | None) -> int:
    """The head's block size: head_block where it divides K (None: any K), except beside the
    exact offset grid and in int8 bundles, whose head keeps the layers' blocks. Blocks of 64
    save about 0.1 ms a step (MatMulNBits 8-bit, 576 x 49152, one row: 0.87 against 0.95 ms on
    the 2-core VM, about 1 % of a SmolLM2 int8 step) and nearly double the head's error
    (relative RMS error 4.2e-3 -> 7.0e-3 on SmolLM2's head; the offset grid's head in blocks of
    64 cost +1.1 % perplexity); an int4 ladder step's plain grids keep 64."""
    if cfg.grid == "offsets" or cfg.bits == 8 or not cfg.head_block or (K and K % cfg.head_block):
        return cfg.block
    return cfg.head_block


def _merge_last_two(graph: onnx.GraphProto, x: str, out: str, C: int) -> list[onnx.NodeProto]:
    """Reshape [*lead, kb, block] to [*lead, C] for any rank: Shape -> Slice(:-2) -> Concat."""
    shp, lead = g.unique_name(graph, f"{out}_shp"), g.unique_name(graph, f"{out}_lead")
    tail = g.add_initializer(graph, np.array([C], np.int64), g.unique_name(graph, f"{out}_C"))
    start = g.add_initializer(graph, np.array([0], np.int64), g.unique_name(graph, f"{out}_s0"))
    end = g.add_initializer(graph, np.array([-2], np.int64), g.unique_name(graph, f"{out}_e2"))
    full = g.unique_name(graph, f"{out}_newshape")
    return [helper.make_node("Shape", [x], [shp]),
            helper.make_node("Slice", [shp, start, end], [lead]),
            helper.make_node("Concat", [lead, tail], [full], axis=0),
            helper.make_node("Reshape", [x, full], [out])]


def _transposed(graph: onnx.GraphProto, table: str) -> str:
    """A [C, V] copy of a [V, C] table, used only as quantization input (then dropped)."""
    name = f"{table}__cv"
    if name not in g.initializers(graph):
        g.add_initializer(graph, np.ascontiguousarray(g.to_array(graph, table).T), name)
    return name


def matmul_integer(model_path: Path, out_path: Path) -> CpuResult:
    """Dynamic int8 through onnxruntime.quantization (MatMulInteger + DynamicQuantizeLinear)."""
    g.pin_project_packages()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model_path), str(out_path), per_channel=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    model = onnx.load(str(out_path))
    return CpuResult(model, {"kernel": "MatMulInteger", "activations": "dynamic per-tensor uint8",
                             "weights": "int8 per-channel", "embedding": "float (unchanged)"})
