"""Compile step for ONNX Runtime targets: ORT's own offline graph optimisation, saved to disk.

ORT_ENABLE_EXTENDED applies the fusions that are exact (LayerNorm/SimplifiedLayerNorm, Gelu,
MatMul+Add, constant folding, ...) into com.microsoft operators for the CPU provider. The
result is CPU-specific, so only CPU bundles get it; Jetson bundles keep the portable graph
TensorRT's parser reads. Doing it once here saves that work at every daemon start.

The optimised graph keeps only non-default attributes on ORT's operators, so a board with an
older ONNX Runtime (JetPack 6's Python 3.10 gets 1.23 at most) loads it too
(strip_default_attributes).

One fusion ORT's runtime optimiser does not do (only its offline Python `transformers` tool
does) is done here by hand: the residual Add feeding an RMSNorm becomes one
SkipSimplifiedLayerNormalization, which also returns the sum for the next residual. That is two
nodes fewer per decoder layer, which matters where a decode step is ~400 small kernels.

    s = Add(a, b); y = SimplifiedLayerNormalization(s, gamma)
      ->  y, _, _, s = SkipSimplifiedLayerNormalization(a, b, gamma)

Last, in-place decoders get a spare token for steps of batch 1 (convert/spare_token.py), which
makes a one-token step compute exactly what a longer step computes for the same token.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
from onnx import helper

from convert.export import DATA_FILE, MODEL_FILE, save_model
from convert.spare_token import add_spare_token

MS_DOMAIN = "com.microsoft"


def optimize_for_cpu(model_dir: Path) -> Path:
    import onnxruntime as ort

    src = Path(model_dir) / MODEL_FILE
    with tempfile.TemporaryDirectory(dir=model_dir) as tmp:
        opt = Path(tmp) / "opt.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    "opt.onnx.data")
        so.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(opt))
        fuse_skip_rms_norm(model)
        strip_default_attributes(model)
        add_spare_token(model)  # after ORT's pass, which would only see a Pad to keep
        (Path(model_dir) / DATA_FILE).unlink(missing_ok=True)
        return save_model(model, model_dir)


def strip_default_attributes(model: onnx.ModelProto) -> int:
    """Drop every com.microsoft attribute that equals its schema's default; returns how many.

    ORT's saved optimised model spells out all of a contrib op's attributes, defaults included,
    and an older ORT refuses an attribute it does not know: ORT 1.23, the last release with
    wheels for Python 3.10 (JetPack 6), fails to load a 1.32-optimised GroupQueryAttention with
    "Unrecognized attribute: sliding_window_cache". A default-valued attribute means the same
    to every ORT that knows it, and nothing to one that does not, so leaving it out is exact."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    defaults: dict[tuple[str, str], dict[str, object]] = {}
    for schema in ort_c.get_all_operator_schema():
        if schema.domain != MS_DOMAIN:
            continue
        known = defaults.setdefault((schema.domain, schema.name), {})
        for name, attr in schema.attributes.items():
            if attr._default_value:  # a serialised AttributeProto, or b"" without a default
                value = helper.get_attribute_value(onnx.AttributeProto.FromString(attr._default_value))
                known.setdefault(name, value)
    dropped = 0
    for node in model.graph.node:
        known = defaults.get((node.domain, node.op_type))
        if not known:
            continue
        keep = [a for a in node.attribute
                if a.name not in known or helper.get_attribute_value(a) != known[a.name]]
        dropped += len(node.attribute) - len(keep)
        del node.attribute[:]
        node.attribute.extend(keep)
    return dropped


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """Add + SimplifiedLayerNormalization -> SkipSimplifiedLayerNormalization (in place), where
    both Add inputs are activations (the residual stream: same [batch, seq, hidden] shape, which
    the fused kernel requires). Returns the number of fusions."""
    graph = model.graph
    consts = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in graph.output}
    fused: dict[int, onnx.NodeProto] = {}  # index of the Add -> the fused node (placed there: every
    # reader of the sum comes after the Add, and the norm's only other input is a constant)
    dropped: set[int] = set()
    index = {id(n): i for i, n in enumerate(graph.node)}
    for i, norm in enumerate(graph.node):
        if norm.op_type != "SimplifiedLayerNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = producers.get(norm.input[0])
        axis = next((a.i for a in norm.attribute if a.name == "axis"), -1)
        if (add is None or add.op_type != "Add" or len(norm.input) < 2 or norm.input[1] not in consts
                or axis != -1 or any(x in consts or x == "" for x in add.input)
                or len(norm.output) > 1 and any(norm.output[1:])):
            continue
        s = add.output[0]
        keep_sum = uses.get(s, 0) > 1 or s in outputs
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        fused[index[id(add)]] = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", s] if keep_sum else [norm.output[0]], domain=MS_DOMAIN,
            epsilon=eps, name=f"{norm.name or s}_SkipRMSNorm")
        dropped.add(i)
    if not fused:
        return 0
    nodes = [fused.get(i, n) for i, n in enumerate(graph.node) if i not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(fused)
