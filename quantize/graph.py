"""Small ONNX graph helpers the formats share: find weight MatMuls and the tied embedding, swap
nodes, upgrade the opset. Everything edits a ModelProto in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


def pin_project_packages() -> None:
    """Call before importing onnxruntime.quantization or onnxruntime.transformers: the latter
    appends its own folder to sys.path, and that folder has a `models/` directory, so any later
    `import models` would find that namespace folder instead of this project's package.
    Importing ours first pins it in sys.modules."""
    import models  # noqa: F401


def load_model(path: Path) -> onnx.ModelProto:
    """The graph with its weights (external data resolved relative to the file)."""
    return onnx.load(str(path), load_external_data=True)


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if name in n.output), None)


def attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


@dataclass(frozen=True)
class WeightMatMul:
    node: onnx.NodeProto
    weight: str  # initializer name, a 2-D float [K, N]
    K: int
    N: int


def weight_matmuls(graph: onnx.GraphProto) -> list[WeightMatMul]:
    """Every MatMul whose B input is a 2-D float initializer (the linear layers and the LM head);
    MatMuls of two activations (attention scores) are not weights and are left alone."""
    inits = initializers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        t = inits.get(node.input[1])
        if t is not None and len(t.dims) == 2 and t.data_type in FLOATS:
            found.append(WeightMatMul(node, t.name, int(t.dims[0]), int(t.dims[1])))
    return found


def lm_head(graph: onnx.GraphProto, output: str = "logits") -> str | None:
    """The weight of the MatMul that makes `output` (the LM head, tied or not), walking back
    through the one-activation nodes after it (Gemma 2's soft-cap: Div, Tanh, Mul; a Reshape or
    Cast); None where the walk meets no plain weight MatMul. Granite's logit scale is folded by
    ONNX Runtime's optimizer into a com.microsoft FusedMatMul, which weight_matmuls does not
    take: that head stays float (and is not found here)."""
    inits = initializers(graph)
    weights = {m.node.output[0]: m.weight for m in weight_matmuls(graph)}
    name = output
    for _ in range(8):
        if name in weights:
            return weights[name]
        node = producer(graph, name)
        acts = [i for i in node.input if i and i not in inits] if node is not None else []
        if len(acts) != 1:
            return None
        name = acts[0]
    return None


@dataclass(frozen=True)
class EmbeddingGather:
    node: onnx.NodeProto
    table: str  # initializer name
    axis: int  # 0: table [V, C]; 1: the tied LM head stored transposed, [C, V]
    indices_rank1: bool  # the indices are a 1-D tensor (our exporter flattens the ids)


def embedding_gathers(graph: onnx.GraphProto, min_elements: int = 1 << 16) -> list[EmbeddingGather]:
    """Gathers that read rows (axis 0) or columns (axis 1) of a large 2-D float initializer:
    token embeddings. Small tables (position or token-type embeddings) are not worth it."""
    inits = initializers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "Gather":
            continue
        t = inits.get(node.input[0])
        if t is None or len(t.dims) != 2 or t.data_type not in FLOATS:
            continue
        if int(np.prod(t.dims)) < min_elements:
            continue
        found.append(EmbeddingGather(node, t.name, attr(node, "axis"),
                                     _rank1(graph, node.input[1])))
    return found


def _rank1(graph: onnx.GraphProto, name: str) -> bool:
    """True when `name` is made by a Reshape to a constant 1-element shape (index_select's
    flattened ids in our export)."""
    node = producer(graph, name)
    if node is None or node.op_type != "Reshape":
        return False
    shape = initializers(graph).get(node.input[1])
    if shape is None:
        const = producer(graph, node.input[1])
        if const is None or const.op_type != "Constant":
            return False
        return int(np.prod(numpy_helper.to_array(const.attribute[0].t).shape)) == 1
    return int(np.prod(shape.dims)) == 1


def to_array(graph: onnx.GraphProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(initializers(graph)[name])


def add_initializer(graph: onnx.GraphProto, array: np.ndarray, name: str) -> str:
    graph.initializer.append(numpy_helper.from_array(array, name))
    return name


def rewrite_nodes(graph: onnx.GraphProto,
                  replace: Callable[[onnx.NodeProto], Iterable[onnx.NodeProto] | None]) -> None:
    """One pass over the nodes: `replace(node)` returns the nodes to put in its place (in
    order, so the graph stays topologically sorted), or None to keep it."""
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        new = replace(node)
        nodes.extend([_copy(node)] if new is None else new)
    del graph.node[:]
    graph.node.extend(nodes)


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    """A detached copy: a message removed from a repeated field must not be relied on."""
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for i in reversed(range(len(graph.initializer))):  # in place: no copies of big tensors
        if graph.initializer[i].name not in used:
            del graph.initializer[i]


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    for o in model.opset_import:
        if o.domain == domain:
            o.version = max(o.version, version)
            return
    model.opset_import.append(helper.make_opsetid(domain, version))


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The default-domain opset raised to `version` by onnx's version converter (it rewrites the
    ops whose signature changed, e.g. ReduceMean's axes becoming an input at 18)."""
    if opset(model) >= version:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, version)


def unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
