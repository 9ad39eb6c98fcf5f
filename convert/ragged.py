"""The ragged graph: a copy of an in-place decoder graph in which rows of different lengths
run as one step, so the daemon verifies several rows' drafts at once.

Why. ONNX Runtime's GroupQueryAttention runs several tokens per row over a cache for batch 1
only, unless it is fed `query_seqlens` [B] (ONNX Runtime 1.32: row b's first query_seqlens[b]
tokens are real, the rest right padding). Without it a daemon with several slots verifies one
row's draft per step, and each such step reads all the weights again. With it one [B, T] step
takes every row's pending token and draft: SmolLM2-135M, 8 rows of 8 tokens, 2 threads: 80 ms
against 234 one row at a time at fp32, 101 against 170 at int8 (bench/verify_batch.py).

What. A new graph input, fed to every GroupQueryAttention node:

    query_seqlens [B] int32 ──(+ p: the spare token, convert/spare_token.py)──► the nodes

A row with n >= 2 real tokens computes, bit for bit, what the same n tokens compute as a step
of that row alone (with its spare); its padding (ids 0, positions repeating its last real one,
so that the graph's seqlens_k is the row's last real position) writes keys past the row's
end, which nothing reads before they are overwritten (device/serve/scheduler.py). A row with one
real token takes the kernel's one-query path, which rounds otherwise, so such a row needs a
spare: fed SPARE_AT_ATTENTION, the graph gives it one at the attention nodes (_row_spares:
row spares, marked ROW_SPARES_KEY; the row costs the step's MatMuls one token, not two), and
where the daemon's probe finds that inexact, or the graph predates it, the host sends a spare
token of its own. Fed the full T for every row, the graph computes what the plain graph
computes (tests/convert/test_ragged.py).

Why a second file and not the input in model.onnx: ONNX Runtime 1.23, the last with wheels for
Python 3.10 (JetPack 6), refuses a GroupQueryAttention input it does not know, so model.onnx
stays loadable there and this graph is tried first only where several slots serve
(device/runtime/ort_backend.py). It holds no weights where model.onnx keeps them in its data
file (every graph over export.INLINE_LIMIT, 64 MiB: SmolLM2 and up): its initializers point at
that file. A smaller graph keeps its weights inline, and its twin is a whole copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bundle.contract import QUERY_SEQLENS, RAGGED_MODEL_FILE, ROW_SPARES_KEY
from convert.spare_token import PREFIX as SPARE
from convert.spare_token import is_attention

QUERY_SEQLENS_INDEX = 16  # its place among GroupQueryAttention's inputs (ONNX Runtime 1.32)
SPARE_P = f"{SPARE}/p"  # the spare pass's count of spare tokens, an int64 scalar
SPARE_PA = f"{SPARE}/p_attention"  # ... of them at the attention nodes (an int64 scalar)
SPARE_AT = f"{SPARE}/at_attention"  # int64 1 where spare_token is SPARE_AT_ATTENTION
SPARE_QKV_PADS = f"{SPARE}/qkv_pads"  # the pads of each attention node's q/k/v


def add_query_seqlens(model: onnx.ModelProto) -> bool:
    """Wire query_seqlens into every GroupQueryAttention node (in place), with the spare's
    lengths where the graph takes one (row spares below); False where the graph has none or
    already takes it."""
    graph = model.graph
    nodes = [n for n in graph.node if is_attention(n)]
    if not nodes or QUERY_SEQLENS in {i.name for i in graph.input}:
        return False
    graph.input.append(helper.make_tensor_value_info(QUERY_SEQLENS, TensorProto.INT32, ["batch"]))
    lengths = QUERY_SEQLENS
    if any(SPARE_P in n.output for n in graph.node):  # a spare's token is a real one
        lengths = _row_spares(model, nodes)
    for node in nodes:
        inputs = list(node.input) + [""] * (QUERY_SEQLENS_INDEX - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:QUERY_SEQLENS_INDEX] + [lengths])
    return True


def _row_spares(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> str:
    """The spare pass's lengths, per row. A step of batch 1 keeps its spare p (either form):
    query_seqlens + p. A step of several rows fed SPARE_AT_ATTENTION gives each row of ONE real
    token a spare at the attention nodes, s[b] = 1 (none while any row is at the cache's last
    position, where the step could not grow):

        s [B]      = (query_seqlens == 1) * (spare_token == 2) * (B > 1) * (max position < max_seq - 1)
        q/k/v      [B, T, .] ──Pad(p_attention, or max(s) where T = 1, zero rows)──► [B, T + pad, .]
        seqlens_k  [B] + p_attention + s
        total_sequence_length = max(itself, max over rows of (last position + 1 + p + s))
        query_seqlens + p + s

    so that row takes GroupQueryAttention's several-query path, as the same token does stepped
    alone in the attention form, and the joint step's MatMuls read one token for it, not two
    (a spare from the host: SmolLM2, 8 rows of one token, +43 % int8, +49 % int4, +16 % fp32).
    Its second query is the row's first padding column (T >= 2: token 0's, finite) or, where
    T = 1, the one zero row padded in; only then, since every row's past plus the padded T
    must fit in the cache (ONNX Runtime checks it; the daemon caps T so, scheduler.py). The
    spare's key and value land one position past the row, where nothing reads before the next
    step writes. Returns the query lengths' name; marks the graph (ROW_SPARES_KEY)."""
    graph = model.graph
    new: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], key: str, **attrs: object) -> str:
        out = f"{QUERY_SEQLENS}/{key}"
        new.append(helper.make_node(op, inputs, [out], name=f"{out}/{op}", **attrs))
        return out

    one = f"{SPARE}/one"  # an int64 [1] constant of the spare pass
    wide = add("Cast", [QUERY_SEQLENS], "i64", to=TensorProto.INT64)
    single = add("Cast", [add("Equal", [wide, one], "single_b")], "single", to=TensorProto.INT64)
    several = add("Sub", [one, f"{SPARE}/one_row"], "several")  # [1]: 1 where B > 1
    last = _reduce_max(add, model, "position_ids", "last")  # [B]: padding repeats the last real one
    # the spare pass's room: max_seq - 1 - the step's last position, over every row
    room = add("Cast", [add("Greater", [f"{SPARE}/room", f"{SPARE}/zero_scalar"], "room_b")], "room",
               to=TensorProto.INT64)
    s = add("Mul", [add("Mul", [add("Mul", [single, several], "single_several"), room], "may"),
                    f"{SPARE}/at_attention"], "s")  # [B]
    with_p = add("Add", [wide, SPARE_P], "with_p")
    lengths = add("Cast", [add("Add", [with_p, s], "with_spare")], "i32", to=TensorProto.INT32)
    extra_k = add("Cast", [add("Add", [SPARE_PA, s], "extra")], "extra_i32", to=TensorProto.INT32)  # [B]
    ends = add("Add", [add("Add", [last, one], "ends_real"), add("Add", [SPARE_P, s], "p_s")], "ends")
    total = add("Cast", [add("ReduceMax", [ends], "total_i64", keepdims=0)], "total", to=TensorProto.INT32)
    t_is_one = add("Cast", [add("Equal", [f"{SPARE}/steps", one], "t_is_one_b")], "t_is_one",
                   to=TensorProto.INT64)  # [1]
    pad_rows = add("Add", [SPARE_PA, add("Mul", [add("ReduceMax", [s], "s_max", keepdims=0), t_is_one],
                                         "s_pad")], "pad_rows")  # [1]
    # the spare pass's attention form, fed these instead of its batch-1 counts
    seqlens = {node.input[5] for node in nodes}
    totals = {node.input[6] for node in nodes}
    for node in graph.node:
        if node.op_type == "Add" and node.output[0] in seqlens:  # seqlens_k + p_attention
            node.input[1] = extra_k
        elif node.op_type == "Add" and node.output[0] in totals:  # total + p_attention: the max
            node.op_type, node.name, node.input[1] = "Max", f"{node.output[0]}/Max", total
        elif node.output[0] == SPARE_QKV_PADS:  # the Concat of the q/k/v pads: [0, 0, 0, 0, pa, 0]
            node.input[4] = pad_rows
    at = max(i for i, n in enumerate(graph.node) if n.output[0] in (SPARE_PA, SPARE_AT, f"{SPARE}/steps")) + 1
    for i, node in enumerate(new):
        graph.node.insert(at + i, node)
    model.metadata_props.add(key=ROW_SPARES_KEY, value="1")
    return lengths


def _reduce_max(add: Any, model: onnx.ModelProto, x: str, key: str) -> str:
    """ReduceMax of [B, T] over its axis 1, as the graph's opset spells it (axes an input from 18)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    if opset >= 18:
        axes = f"{QUERY_SEQLENS}/axis1"
        model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), axes))
        return str(add("ReduceMax", [x, axes], key, keepdims=0))
    return str(add("ReduceMax", [x], key, axes=[1], keepdims=0))


def write_ragged_graph(model_path: Path) -> Path | None:
    """RAGGED_MODEL_FILE beside model_path, from it (its weights stay in the one data file both
    name); None where the graph is not an in-place decoder."""
    model = onnx.load(str(model_path), load_external_data=False)
    if not add_query_seqlens(model):
        return None
    out = Path(model_path).parent / RAGGED_MODEL_FILE
    onnx.save(model, str(out))
    return out
