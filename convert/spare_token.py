"""A spare token for steps of batch 1, so that a one-token step computes what a several-token
step computes for the same token, bit for bit.

Why. ONNX Runtime's CPU kernels send a one-row product to their own code paths: MLAS's one-row
SGEMM (alpha 1: multiply then add, where the general kernel fuses them), which
GroupQueryAttention uses for probabilities x V, and MatMulNBits' 4-bit one-row kernel (another
summation order; its 8-bit kernel has none). So the same token's logits differ in the last bits
between a decode step (T = 1) and a step of several tokens (a prefill chunk, a drafted run being
verified): in fp32 |logits| ~5e-5 on SmolLM2-135M. In the int8/int4 bundles it is worse:
MatMulNBits rounds activations to int8 (accuracy_level 4), a last-bit difference now and then
moves one across a rounding edge, and 30 layers later the logits differ by up to ~0.8, so a
verified draft could change greedy output and the daemon refused to draft there. Steps of two
or more rows take the general kernels, and their common rows agree exactly (measured on ORT
1.32 for every op of these graphs: tests/convert/test_spare_token.py).

What. A step of batch 1 gets p = 0 or 1 spare tokens after its last one, at the next position,
in one of two forms, chosen by the value of `spare_token` (bundle/contract.py):

    p = max(0, min(spare_token, B == 1, max_seq - 1 - max(position_ids)))

  SPARE_WHOLE (1): through the whole graph. Every node reads T+p tokens:
    input_ids    [1, T] ──Pad(p zeros at the end)──────────────► [1, T+p]  ─► the graph as before
    position_ids [1, T] ──Concat(its last p columns + 1)───────► [1, T+p]
  SPARE_AT_ATTENTION (2): at the attention nodes only. Each GroupQueryAttention reads its
  query (and key, value) padded with p zero rows, and lengths (seqlens_k, total) one longer;
  its output is cut back to T rows, so every other node reads T tokens:
    qkv [1, T, .] ──Pad(p zero rows)──► GroupQueryAttention(seqlens_k + p, total + p) ──Slice(:T)──►

The attention form costs a one-token step about nothing, where the whole form does the work of
two (SmolLM2 on ONNX Runtime 1.32, 2 threads, 7 interleaved rounds, same-round medians over no
spare: whole +8 % fp32, +26 % int8, +28 % int4; attention 1.02x, 0.96x, 0.99x: README,
"Prompt-lookup drafting"), and it is exact wherever the only one-row kernel of the graph is the
attention's: the fp32 graphs, and MatMulNBits with blocks of 32 at 8 and 4 bits (every CPU
precision this toolkit writes by default), measured. 4-bit MatMulNBits with blocks of 64 keeps a
one-row path of its own (|logits diff| up to 1.0 in the attention form on SmolLM2), and a later
ONNX Runtime may add others, so the form is not fixed here: the daemon feeds SPARE_AT_ATTENTION
where its start-up probes find a one-token step equal to a longer one in that form, bit for bit
(and, stepping jointly, the ragged rows equal to lone ones), and SPARE_WHOLE otherwise
(device/serve/scheduler.py: spare_form, probe_ragged). A graph written before
the attention form existed reads 2 as 1 (the min above): the whole graph.

In both forms GroupQueryAttention takes its lengths from the padded positions, and
`logits_index` (positions < T) never selects the spare. The spare token's key and value land
one position past the step (inside the cache: the last term), where no query of this step
looks (causal) and the next step writes before anything reads. `spare_token` (bundle/contract.py:
SPARE_TOKEN) is an int32 scalar graph input: 0 leaves the graph computing what it computed
before (calibration feeds 0). The ORT backend feeds a form when its engine has one
slot, and when several slots step jointly through the ragged graph (convert/ragged.py), which
gives each of its rows of one real token a spare at the attention nodes (row spares; or the
host sends one: token 0 at the next position, one more real token in query_seqlens). Batched
steps of the plain graph (B > 1, one token each) cannot take one (the attention kernel refuses
several tokens per row over a cache for B > 1), and a row decoded alone must stay equal to the
same row in a batch, so there it feeds 0; `B == 1` in the graph keeps a wrong feed harmless.
Only in-place (GroupQueryAttention) graphs get it: in the others the host writes the step's new
keys itself, one per token it asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bundle.contract import SPARE_AT_ATTENTION, SPARE_FORMS_KEY, SPARE_TOKEN, SPARE_WHOLE

MS_DOMAIN = "com.microsoft"
PREFIX = "spare_token"  # names of the nodes and constants this pass adds


def is_attention(node: onnx.NodeProto) -> bool:
    """ONNX Runtime's GroupQueryAttention: the node of in-place graphs the spare and the ragged
    lengths (convert/ragged.py) are wired into."""
    return node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN


def add_spare_token(model: onnx.ModelProto) -> bool:
    """Rewrite an in-place decoder graph as above (in place); False where it does not apply."""
    graph = model.graph
    names = {i.name for i in graph.input}
    gqa = [n for n in graph.node if is_attention(n)]
    if not gqa or SPARE_TOKEN in names or not {"input_ids", "position_ids"} <= names:
        return False
    max_seq = _cache_length(graph, gqa[0].input[3])
    new: list[onnx.NodeProto] = []

    def const(key: str, value: np.ndarray) -> str:
        name = f"{PREFIX}/{key}"
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def add(op: str, inputs: list[str], key: str, **attrs: object) -> str:
        out = f"{PREFIX}/{key}"
        new.append(helper.make_node(op, inputs, [out], name=f"{out}/{op}", **attrs))
        return out

    zero, one, two = (const(k, np.array([v], np.int64)) for k, v in (("zero", 0), ("one", 1), ("two", 2)))
    last_room = const("last_position", np.array(max_seq - 1, np.int64))
    graph.input.append(helper.make_tensor_value_info(SPARE_TOKEN, TensorProto.INT32, []))
    # p: wanted, batch 1, and room for one more position
    shape = add("Shape", ["input_ids"], "shape")  # [B, T]
    batch_is_one = add("Cast", [add("Equal", [add("Gather", [shape, zero], "batch", axis=0), one],
                                    "is_one")], "is_one_i64", to=TensorProto.INT64)
    room = add("Sub", [last_room, add("ReduceMax", ["position_ids"], "last", keepdims=0)], "room")
    wanted = add("Cast", [SPARE_TOKEN], "wanted", to=TensorProto.INT64)
    p = add("Max", [add("Min", [wanted, add("Squeeze", [batch_is_one, zero], "one_row"), room],
                        "p_wanted"), const("zero_scalar", np.array(0, np.int64))], "p")
    # the form: p_attention = p where spare_token is SPARE_AT_ATTENTION, p_whole = p - p_attention
    at_attention = add("Cast", [add("Equal", [wanted, const("attention_form", np.array(SPARE_AT_ATTENTION,
                                                                                        np.int64))],
                                    "at_attention_b")], "at_attention", to=TensorProto.INT64)
    p_attention = add("Mul", [p, at_attention], "p_attention")
    p_whole = add("Sub", [p, p_attention], "p_whole")
    p1 = add("Unsqueeze", [p_whole, zero], "p1")  # [1]
    pads = add("Concat", [zero, zero, zero, p1], "pads", axis=0)  # begins [0, 0], ends [0, p]
    ids = add("Pad", ["input_ids", pads], "input_ids")  # the spare is token 0
    steps = add("Slice", [shape, one, two], "steps")  # [T]
    tail = add("Slice", ["position_ids", add("Sub", [steps, p1], "tail_start"), steps, one], "tail")
    pos = add("Concat", ["position_ids", add("Add", [tail, one], "next")], "position_ids", axis=1)
    renamed = {"input_ids": ids, "position_ids": pos}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    # the attention form: rows the spare's query adds, and the lengths it makes one longer
    rows = add("Slice", [add("Shape", [ids], "rows_shape"), one, two], "rows")  # [T + p_whole]
    qkv_pads = add("Concat", [zero, zero, zero, zero, add("Unsqueeze", [p_attention, zero], "pa1"), zero],
                   "qkv_pads", axis=0)  # [B, T, C]: p_attention rows at the end of T
    pa_i32 = add("Cast", [p_attention], "p_attention_i32", to=TensorProto.INT32)
    nodes = new + _attention_form(list(graph.node), graph.value_info, qkv_pads, pa_i32, rows)
    del graph.node[:]
    graph.node.extend(nodes)
    # the runtime reads which forms the graph takes (an older graph reads 2 as 1, silently)
    model.metadata_props.add(key=SPARE_FORMS_KEY, value=f"{SPARE_WHOLE},{SPARE_AT_ATTENTION}")
    return True


def _attention_form(nodes: list[onnx.NodeProto], value_info: Any, qkv_pads: str, pa_i32: str,
                    rows: str) -> list[onnx.NodeProto]:
    """`nodes` with each GroupQueryAttention wrapped for the attention form: its query, key and
    value padded with p_attention zero rows, seqlens_k and total_sequence_length plus
    p_attention (one Add per length tensor, which the layers share, before its first reader),
    its output cut back to `rows`, under its old name (the uncut output typed in value_info
    as the cut one is, but for its rows)."""
    out: list[onnx.NodeProto] = []
    longer: dict[str, str] = {}  # a length tensor -> the same plus p_attention
    for node in nodes:
        if not is_attention(node):
            out.append(node)
            continue
        at = f"{PREFIX}/{node.name or node.output[0]}"
        for i in (0, 1, 2):  # query (packed or not), key, value; "" where packed
            if i < len(node.input) and node.input[i]:
                padded = f"{at}/input{i}"
                out.append(helper.make_node("Pad", [node.input[i], qkv_pads], [padded], name=f"{padded}/Pad"))
                node.input[i] = padded
        for i in (5, 6):  # seqlens_k [B], total_sequence_length []: int32
            length = node.input[i]
            if length not in longer:
                longer[length] = f"{PREFIX}/length{len(longer)}"
                out.append(helper.make_node("Add", [length, pa_i32], [longer[length]],
                                            name=f"{longer[length]}/Add"))
            node.input[i] = longer[length]
        cut, full = node.output[0], f"{at}/output"
        node.output[0] = full
        for info in [v for v in value_info if v.name == cut]:  # its type, rows unknown (T + p)
            typed = value_info.add()
            typed.CopyFrom(info)
            typed.name = full
            if len(typed.type.tensor_type.shape.dim) > 1:
                typed.type.tensor_type.shape.dim[1].Clear()
        out.append(node)
        out.append(helper.make_node("Slice", [full, f"{PREFIX}/zero", rows, f"{PREFIX}/one"], [cut],
                                    name=f"{at}/output/Slice"))
    return out


def _cache_length(graph: onnx.GraphProto, past: str) -> int:
    """max_seq: the static third dimension of a past_key input [B, Hkv, S, D]."""
    for v in graph.input:
        if v.name == past:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_value > 0:
                return dims[2].dim_value
    raise ValueError(f"GroupQueryAttention's past key {past!r} is not a graph input with a static "
                     "cache length")
