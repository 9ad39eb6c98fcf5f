"""TensorRT formats: explicit quantization, i.e. QuantizeLinear/DequantizeLinear in the ONNX graph
(tensorrt_jetson.md §2: symmetric only, zero points 0, positive constant scales; implicit
calibrators are deprecated since 10.1). Each format returns a graph that is typed end to end, so
the device can build it STRONGLY_TYPED (§8.3).

  trt-fp16                    every float tensor fp16 except the logits output (fp32) and the
                              RMSNorm/LayerNorm statistics (fp32: see to_fp16)
  qdq-int8-symmetric          W8A8 on every weight MatMul: activations per tensor (calibrated,
                              after SmoothQuant: quantize/smooth.py), weights per output
                              channel, int8 zero points 0; the rest as trt-fp16
  qdq-int4-block-weight-only  W4A16: INT4 weights, DequantizeLinear(block_size) along K on 2-D
                              constant weights (the only block form TensorRT 10.3 takes, §2.2),
                              zero points 0, plus the per-block offset term (quantize/offsets.py:
                              one small fp16 MatMul + Add per layer); activations stay fp16
  qdq-fp8                     W8A8 in FLOAT8E4M3FN (Thor only): per-tensor activations,
                              per-channel weights

A tied LM head stays fp16 in all of them: its table must stay float for the embedding Gather
(TensorRT 10.3 block-dequantizes only into GEMMs), so quantizing the MatMul would add a second
copy, and on SmolLM2 it was the layer that cost the most accuracy (int4: +8 % perplexity with
it, +0.5 % without; int8 W8A8: top-1 0.80 with it, 0.84 without).

Q/DQ placement for one linear layer, x [.., K] @ W [K, N]:

    x ──Q(s_x, 0)──DQ(s_x, 0)──┐
                               MatMul ── y            (int8 / fp8: TensorRT fuses to an int8 GEMM)
    W_q [K,N] ──DQ(s_w[N], 0, axis=1)──┘

    x ─────────────────────────┐
                               MatMul ── y            (int4: a weight-only GEMM)
    W_q INT4 [K,N] ──DQ(s_w[K/b, N], block_size=b, axis=0)──┘

Opsets: fp16 keeps the export's 17; int8 and fp8 need 19 (fp16 scales, FLOAT8); int4 needs 21
(INT4 and block_size). TensorRT 10.3's operator table lists opsets 9-20, but that range is
documented, not enforced: onnx-tensorrt's ModelImporter only warns below opset 7, and its
DequantizeLinear importer infers the blocks from the scale's shape without reading block_size
(file and line in convert/trt_rules/tensorrt-10.3.toml), so opset 21 parses; convert/trt_check.py
checks every bundle against that table. Whether 10.3 builds the engine is unverified on a board.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from quantize import graph as g
from quantize.activations import Range
from quantize.blockwise import per_channel_int8, quantize_offset, quantize_symmetric
from quantize.offsets import OffsetTerms

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN
INT8_MAX = 127.0
OPSET_FP16, OPSET_QDQ, OPSET_INT4 = 17, 19, 21


@dataclass
class TrtResult:
    model: onnx.ModelProto
    details: dict[str, Any] = field(default_factory=dict)


# --- fp16 -------------------------------------------------------------------------------------
def to_fp16(model: onnx.ModelProto, keep_fp32_outputs: tuple[str, ...] = ("logits",)) -> onnx.ModelProto:
    """All float tensors to fp16 except `keep_fp32_outputs` and the norm statistics.

    Why the norms stay fp32: SmolLM2's residual stream carries "massive activations" of ~25,000
    in a few channels; RMSNorm squares them (6e8) and fp16 tops out at 65,504, so an fp16
    x.pow(2) is inf and the layer's output collapses to 0. The chain Pow -> ReduceMean -> Add ->
    Sqrt -> Div/Reciprocal -> Mul(x, .) runs in fp32 between two Casts; the residual itself
    (25,000 < 65,504) is fine in fp16.
    """
    g.pin_project_packages()
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    _name_nodes(model.graph)
    chain = _norm_nodes(model.graph)
    _infer_types(model)  # the converter decides where to cast from value_info: it must be complete
    out = convert_float_to_float16(
        model, keep_io_types=list(keep_fp32_outputs), disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, "LayerNormalization"],
        node_block_list=_norm_node_names(model.graph, chain))
    _fold_cast_round_trips(out.graph)
    return out


def _infer_types(model: onnx.ModelProto, big: int = 1 << 20) -> None:
    """onnx shape inference into model.graph.value_info, run with the large initializers' bytes
    set aside (weights are not needed to infer types, and the protobuf limit is 2 GB)."""
    stash = {}
    for t in model.graph.initializer:
        if len(t.raw_data) > big:
            stash[t.name] = t.raw_data
            t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    finally:
        for t in model.graph.initializer:
            if t.name in stash:
                t.raw_data = stash[t.name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def _fold_cast_round_trips(graph: onnx.GraphProto) -> None:
    """The converter casts every blocked node's output to fp16 and back to fp32 for the next
    blocked node; inside the norm chain that round trip is the very overflow we keep out. Wire
    each such fp32 consumer to the fp32 value directly and drop the casts left unused."""
    made_by = {o: n for n in graph.node for o in n.output}
    to16 = {n.output[0]: n for n in graph.node if n.op_type == "Cast" and g.attr(n, "to") == 10}
    direct: dict[str, str] = {}
    for n in graph.node:
        if n.op_type != "Cast" or g.attr(n, "to") != TensorProto.FLOAT or n.input[0] not in to16:
            continue
        src = to16[n.input[0]].input[0]
        maker = made_by.get(src)
        if maker is not None and maker.op_type != "Cast":  # a blocked node's own fp32 output
            direct[n.output[0]] = src
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in direct:
                n.input[i] = direct[name]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    g.rewrite_nodes(graph, lambda n: [] if n.op_type == "Cast" and not any(o in used for o in n.output)
                    else None)


def _name_nodes(graph: onnx.GraphProto) -> None:
    """float16's node_block_list matches by name: give unnamed nodes one."""
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_q{i}"


def _norm_nodes(graph: onnx.GraphProto) -> set[str]:
    """Output names of the RMSNorm statistic chains: from each Pow(x, 2) through its single
    consumers until the Mul that multiplies x by the result."""
    cons = g.consumers(graph)
    inits = g.initializers(graph)
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}
    chains: set[str] = set()
    for node in graph.node:
        if node.op_type != "Pow" or not _is_two(node.input[1], inits, consts):
            continue
        x, cur, chain = node.input[0], node, [node.output[0]]
        for _ in range(6):  # ReduceMean, Add, Sqrt, Div|Reciprocal, Mul at most
            nxt = cons.get(cur.output[0], [])
            if len(nxt) != 1:
                break
            cur = nxt[0]
            chain.append(cur.output[0])
            if cur.op_type == "Mul" and x in cur.input:
                chains.update(chain)
                break
    return chains


def _norm_node_names(graph: onnx.GraphProto, outputs: set[str]) -> list[str]:
    return [n.name for n in graph.node if n.output and n.output[0] in outputs]


def _is_two(name: str, inits: dict[str, onnx.TensorProto], consts: dict[str, onnx.NodeProto]) -> bool:
    if name in inits:
        value = numpy_helper.to_array(inits[name])
    elif name in consts:
        value = numpy_helper.to_array(consts[name].attribute[0].t)
    else:
        return False
    return value.size == 1 and float(value.reshape(-1)[0]) == 2.0


def fp16(model: onnx.ModelProto) -> TrtResult:
    blocked = len(_norm_nodes(model.graph))
    out = to_fp16(model)
    return TrtResult(out, {"compute_dtype": "float16", "fp32_nodes": blocked,
                           "fp32_why": "RMSNorm/LayerNorm statistics (x^2 overflows fp16)",
                           "opset": g.opset(out)})


# --- int8 / fp8 W8A8 ------------------------------------------------------------------------
def activation_inputs(model: onnx.ModelProto) -> list[str]:
    """The activation tensors that feed weight MatMuls (what calibration must measure)."""
    return sorted({m.node.input[0] for m in g.weight_matmuls(model.graph)})


def tied_head_weights(model: onnx.ModelProto) -> tuple[str, ...]:
    """Weights that are also an embedding table (a tied LM head): TensorRT formats leave them in
    the compute dtype, since the Gather needs the float table anyway."""
    tables = {e.table for e in g.embedding_gathers(model.graph, min_elements=0)}
    return tuple(sorted(m.weight for m in g.weight_matmuls(model.graph) if m.weight in tables))


def tied_head_inputs(model: onnx.ModelProto) -> frozenset[str]:
    tied = set(tied_head_weights(model))
    return frozenset(m.node.input[0] for m in g.weight_matmuls(model.graph) if m.weight in tied)


def w8a8(model: onnx.ModelProto, ranges: dict[str, Range], kind: str = "int8",
         exclude_inputs: frozenset[str] = frozenset(), fp16: bool = True) -> TrtResult:
    """Insert Q/DQ for every weight MatMul (see the module diagram), then fp16 the rest.
    MatMuls whose activation input is in `exclude_inputs` stay fp16."""
    model = g.upgrade_opset(model, OPSET_QDQ)
    graph = model.graph
    qmax = INT8_MAX if kind == "int8" else FP8_MAX
    mms = {m.node.output[0]: m for m in g.weight_matmuls(graph) if m.node.input[0] not in exclude_inputs}
    act_scales: dict[str, str] = {}
    stats = {"layers": 0, "weights": 0, "activation_tensors": 0}

    def act_scale(x: str) -> str:
        if x not in act_scales:
            amax = max(ranges[x].amax, 1e-8)
            act_scales[x] = g.add_initializer(graph, np.array(amax / qmax, np.float32), f"{x}_qscale")
            stats["activation_tensors"] += 1
        return act_scales[x]

    def replace(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        m = mms.get(node.output[0])
        if m is None:
            return None
        w = g.to_array(graph, m.weight).astype(np.float32)
        wq, ws = _quantize_weight(w, kind, qmax)
        qname = g.add_initializer(graph, wq, f"{m.weight}_{kind}")
        sname = g.add_initializer(graph, ws, f"{m.weight}_{kind}_scale")
        zero = _zero(graph, kind, [w.shape[1]], f"{m.weight}_{kind}_zp")
        x, s_x = node.input[0], act_scale(node.input[0])
        zx = _zero(graph, kind, [], f"{node.name or m.weight}_{kind}_xzp")
        base = node.name or m.weight
        stats["layers"] += 1
        stats["weights"] += w.size
        return [
            helper.make_node("QuantizeLinear", [x, s_x, zx], [f"{base}_xq"], name=f"{base}_Qx"),
            helper.make_node("DequantizeLinear", [f"{base}_xq", s_x, zx], [f"{base}_xdq"],
                             name=f"{base}_DQx"),
            helper.make_node("DequantizeLinear", [qname, sname, zero], [f"{base}_wdq"], axis=1,
                             name=f"{base}_DQw"),
            helper.make_node("MatMul", [f"{base}_xdq", f"{base}_wdq"], list(node.output),
                             name=node.name),
        ]

    g.rewrite_nodes(graph, replace)
    g.drop_unused_initializers(graph)
    out = to_fp16(model) if fp16 else model
    return TrtResult(out, {**stats, "weights_per_channel": True, "activations_per_tensor": True,
                           "zero_points": 0, "qtype": "INT8" if kind == "int8" else "FLOAT8E4M3FN",
                           "opset": g.opset(out), "compute_dtype": _dtype(fp16)})


def _dtype(fp16: bool) -> str:
    return "float16" if fp16 else "float32"


def _quantize_weight(w: np.ndarray, kind: str, qmax: float) -> tuple[np.ndarray, np.ndarray]:
    if kind == "int8":
        return per_channel_int8(w)
    import ml_dtypes

    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    return (w / scale).astype(ml_dtypes.float8_e4m3fn), scale


def _zero(graph: onnx.GraphProto, kind: str, shape: list[int], name: str) -> str:
    name = g.unique_name(graph, name)
    dtype = TensorProto.INT8 if kind == "int8" else TensorProto.FLOAT8E4M3FN
    n = int(np.prod(shape)) if shape else 1
    graph.initializer.append(helper.make_tensor(name, dtype, shape, [0] * n))
    return name


def pack_int4(values: np.ndarray) -> bytes:
    """ONNX INT4 raw data: two values per byte, the first in the low nibble (row-major)."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    low, high = flat[0::2] & 0x0F, flat[1::2] & 0x0F
    return (low | (high << 4)).astype(np.uint8).tobytes()


# --- int4 weight-only -----------------------------------------------------------------------
def int4_weight_only(model: onnx.ModelProto, block: int = 32, offsets: bool = True,
                     skip: tuple[str, ...] = (), fp16: bool = True,
                     importance: dict[str, np.ndarray] | None = None,
                     int8: frozenset[str] = frozenset()) -> TrtResult:
    """INT4 [K, N] weights with DequantizeLinear(axis=0, block_size=block), zero points omitted
    (0); with `offsets`, each block's [min, max] is fitted and the per-block offset is added by
    a small separate MatMul (quantize/offsets.py), otherwise the grid is symmetric (its blocks
    rounded by `importance`, weight -> row weights [K], where AWQ gave them). The weights in
    `int8` (a mixed step: quantize/sensitivity.py) are INT8 weight-only instead: per-channel
    DequantizeLinear(axis=1), zero point 0, the form W8A8 already gives TensorRT."""
    importance = importance or {}
    model = g.upgrade_opset(model, OPSET_INT4)
    graph = model.graph
    mms = {m.node.output[0]: m for m in g.weight_matmuls(graph) if m.weight not in skip}
    terms = OffsetTerms(graph, block)
    done: dict[str, tuple[str, np.ndarray | None]] = {}  # weight -> (DQ output, offsets)
    stats: dict[str, Any] = {"layers": 0, "weights": 0, "offset_terms": 0, "int8_weights": 0,
                             "skipped": list(skip)}

    def replace(node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        m = mms.get(node.output[0])
        if m is None:
            return None
        new: list[onnx.NodeProto] = []
        if m.weight in int8 and m.weight not in done:
            done[m.weight] = (_int8_weight(graph, m.weight, new), None)
            stats["int8_weights"] += 1
        if m.K % block and m.weight not in done:
            # TensorRT's INT4 block DQ takes whole blocks along K only (convert/trt_rules
            # block_axes: an intermediate of 200 is 6.25 blocks of 32), so such a weight is INT8
            # weight-only per channel, the form of a mixed step's 8-bit units; the manifest names it
            done[m.weight] = (_int8_weight(graph, m.weight, new), None)
            stats["int8_weights"] += 1
            stats.setdefault("int8_not_whole_blocks", []).append(m.weight)
        if m.weight not in done:
            w = g.to_array(graph, m.weight).astype(np.float32)
            bw = (quantize_offset(w, 4, block) if offsets else
                  quantize_symmetric(w, 4, block, importance=importance.get(m.weight)))
            q = helper.make_tensor(g.unique_name(graph, f"{m.weight}_int4"), TensorProto.INT4,
                                   [m.K, m.N], pack_int4(bw.signed()), raw=True)
            graph.initializer.append(q)
            s = g.add_initializer(graph, bw.scales, g.unique_name(graph, f"{m.weight}_int4_scale"))
            dq = g.unique_name(graph, f"{m.weight}_int4_dq")
            new.append(helper.make_node("DequantizeLinear", [q.name, s], [dq], axis=0,
                                        block_size=block, name=f"{dq}_node"))
            done[m.weight] = (dq, bw.offsets)
            stats["weights"] += w.size
        dq, offs = done[m.weight]
        name = m.node.name or m.weight
        out = m.node.output[0]
        main = g.unique_name(graph, f"{out}_w4") if offs is not None else out
        new.append(helper.make_node("MatMul", [m.node.input[0], dq], [main], name=name))
        if offs is not None:
            new += terms.nodes(m.node.input[0], m.K, offs, main, out, name)
            stats["offset_terms"] += 1
        stats["layers"] += 1
        return new

    g.rewrite_nodes(graph, replace)
    g.drop_unused_initializers(graph)
    out = to_fp16(model) if fp16 else model
    return TrtResult(out, {**stats, "block_size": block, "axis": 0, "zero_points": "omitted (0)",
                           "offsets": offsets, "qtype": "INT4", "opset": g.opset(out),
                           "compute_dtype": _dtype(fp16)})


def _int8_weight(graph: onnx.GraphProto, weight: str, new: list[onnx.NodeProto]) -> str:
    """INT8 [K, N] codes -> DequantizeLinear(scale [N], zero point 0 [N], axis=1): appends the
    node to `new`, returns its output."""
    q, scale = per_channel_int8(g.to_array(graph, weight).astype(np.float32))
    qname = g.add_initializer(graph, q, g.unique_name(graph, f"{weight}_int8"))
    sname = g.add_initializer(graph, scale, g.unique_name(graph, f"{weight}_int8_scale"))
    zero = _zero(graph, "int8", [q.shape[1]], f"{weight}_int8_zp")
    dq = g.unique_name(graph, f"{weight}_int8_dq")
    new.append(helper.make_node("DequantizeLinear", [qname, sname, zero], [dq], axis=1,
                                name=f"{dq}_node"))
    return dq
