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
real token takes the kernel's one-query path, which rounds otherwise, so the daemon gives such
a row a spare token of its own. Fed the full T for every row, the graph computes what the plain
graph computes (tests/convert/test_ragged.py).

Why a second file and not the input in model.onnx: ONNX Runtime 1.23, the last with wheels for
Python 3.10 (JetPack 6), refuses a GroupQueryAttention input it does not know, so model.onnx
stays loadable there and this graph is tried first only where several slots serve
(device/runtime/ort_backend.py). It holds no weights where model.onnx keeps them in its data
file (every graph over export.INLINE_LIMIT, 64 MiB: SmolLM2 and up): its initializers point at
that file. A smaller graph keeps its weights inline, and its twin is a whole copy.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

from bundle.contract import QUERY_SEQLENS, RAGGED_MODEL_FILE
from convert.spare_token import PREFIX as SPARE
from convert.spare_token import is_attention

QUERY_SEQLENS_INDEX = 16  # its place among GroupQueryAttention's inputs (ONNX Runtime 1.32)
SPARE_P = f"{SPARE}/p"  # the spare pass's count of spare tokens, an int64 scalar


def add_query_seqlens(model: onnx.ModelProto) -> bool:
    """Wire query_seqlens into every GroupQueryAttention node (in place); False where the graph
    has none or already takes it."""
    graph = model.graph
    nodes = [n for n in graph.node if is_attention(n)]
    if not nodes or QUERY_SEQLENS in {i.name for i in graph.input}:
        return False
    graph.input.append(helper.make_tensor_value_info(QUERY_SEQLENS, TensorProto.INT32, ["batch"]))
    lengths = QUERY_SEQLENS
    if any(SPARE_P in n.output for n in graph.node):  # a batch-1 step's spare is a real token
        wide = helper.make_node("Cast", [QUERY_SEQLENS], [f"{QUERY_SEQLENS}/i64"], to=TensorProto.INT64)
        add = helper.make_node("Add", [wide.output[0], SPARE_P], [f"{QUERY_SEQLENS}/with_spare"])
        lengths = f"{QUERY_SEQLENS}/i32"
        back = helper.make_node("Cast", [add.output[0]], [lengths], to=TensorProto.INT32)
        at = max(i for i, n in enumerate(graph.node) if SPARE_P in n.output) + 1
        for i, node in enumerate((wide, add, back)):
            graph.node.insert(at + i, node)
    for node in nodes:
        inputs = list(node.input) + [""] * (QUERY_SEQLENS_INDEX - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:QUERY_SEQLENS_INDEX] + [lengths])
    return True


def write_ragged_graph(model_path: Path) -> Path | None:
    """RAGGED_MODEL_FILE beside model_path, from it (its weights stay in the one data file both
    name); None where the graph is not an in-place decoder."""
    model = onnx.load(str(model_path), load_external_data=False)
    if not add_query_seqlens(model):
        return None
    out = Path(model_path).parent / RAGGED_MODEL_FILE
    onnx.save(model, str(out))
    return out
