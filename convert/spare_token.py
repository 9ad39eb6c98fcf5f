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

What. A step of batch 1 gets p = 0 or 1 spare tokens after its last one, at the next position:

    input_ids    [1, T] ──Pad(p zeros at the end)──────────────► [1, T+p]  ─► the graph as before
    position_ids [1, T] ──Concat(its last p columns + 1)───────► [1, T+p]
    p = max(0, min(spare_token, B == 1, max_seq - 1 - max(position_ids)))

Every node then reads T+p tokens; GroupQueryAttention takes its lengths from the padded
positions, and `logits_index` (positions < T) never selects the spare. The spare token's key and
value land one position past the step (inside the cache: the last term), where no query of this
step looks (causal) and the next step writes before anything reads. `spare_token`
(bundle/contract.py: SPARE_TOKEN) is an int32 scalar graph input: 0 leaves the graph computing
what it computed before (calibration feeds 0). The ORT backend feeds 1 when its engine has one
slot, and when several slots step jointly through the ragged graph (convert/ragged.py), whose
rows of B > 1 carry their spare from the host (token 0 at the next position, one more real
token in query_seqlens). Batched steps of the plain graph (B > 1, one token each) cannot take
one (the attention kernel refuses several tokens per row over a cache for B > 1), and a row
decoded alone must stay equal to the same row in a batch, so there it feeds 0; `B == 1` in the
graph keeps a wrong feed harmless. Only in-place (GroupQueryAttention) graphs get it: in the others the host
writes the step's new keys itself, one per token it asked for.
Cost: a one-token step does the work of two (SmolLM2: +4 % fp32, +21 % int8, +24 % int4;
README, "Prompt-lookup drafting").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bundle.contract import SPARE_TOKEN

MS_DOMAIN = "com.microsoft"
PREFIX = "spare_token"  # names of the nodes and constants this pass adds


def add_spare_token(model: onnx.ModelProto) -> bool:
    """Rewrite an in-place decoder graph as above (in place); False where it does not apply."""
    graph = model.graph
    names = {i.name for i in graph.input}
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]
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
    p1 = add("Unsqueeze", [p, zero], "p1")  # [1]
    pads = add("Concat", [zero, zero, zero, p1], "pads", axis=0)  # begins [0, 0], ends [0, p]
    ids = add("Pad", ["input_ids", pads], "input_ids")  # the spare is token 0
    steps = add("Slice", [shape, one, two], "steps")  # [T]
    tail = add("Slice", ["position_ids", add("Sub", [steps, p1], "tail_start"), steps, one], "tail")
    pos = add("Concat", ["position_ids", add("Add", [tail, one], "next")], "position_ids", axis=1)
    renamed = {"input_ids": ids, "position_ids": pos}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    nodes = new + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _cache_length(graph: onnx.GraphProto, past: str) -> int:
    """max_seq: the static third dimension of a past_key input [B, Hkv, S, D]."""
    for v in graph.input:
        if v.name == past:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 4 and dims[2].dim_value > 0:
                return dims[2].dim_value
    raise ValueError(f"GroupQueryAttention's past key {past!r} is not a graph input with a static "
                     "cache length")
