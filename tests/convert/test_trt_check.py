"""The offline TensorRT parser check (convert/trt_check.py, convert/trt_rules/*.toml): one hand-made
graph per rule that breaks only that rule, every rule of every table exercised, the Jetson bundles
the converter and quantizer write pass, a CPU bundle fails with one line per offending node, and
convert refuses (or with --force records) a failing Jetson graph."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from quantize_fixtures import LOOSE, q_bundle, q_fp32_bundle  # noqa: E402,F401  (fixtures)

from bundle.errors import ToolkitError  # noqa: E402
from bundle.manifest import read_manifest  # noqa: E402
from convert import trt_check  # noqa: E402
from convert.trt_check import check_model, known_versions, load_rules, major_minor  # noqa: E402
from models import REGISTRY  # noqa: E402

ORIN, THOR = "jetson-orin-nano-8gb", "jetson-thor"
F, I64 = TensorProto.FLOAT, TensorProto.INT64


# --- hand-made graphs, one violation each ------------------------------------------------------
def model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
          inits: tuple[onnx.TensorProto, ...] | list[onnx.TensorProto] = (), opset: int = 17,
          extra: tuple[str, ...] = ()) -> onnx.ModelProto:
    outs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outs, list(inits))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in extra)]
    return helper.make_model(graph, opset_imports=imports)


def x(name: str = "x", shape: tuple[Any, ...] | list[Any] = (2, 4), dtype: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))


def init(name: str, values: Any, dtype: int | None = None) -> onnx.TensorProto:
    arr = np.asarray(values)
    if dtype is None:
        return numpy_helper.from_array(arr, name)
    return helper.make_tensor(name, dtype, list(arr.shape), arr.flatten().tolist())


def dq(x_init: onnx.TensorProto, scale: Any, zp: onnx.TensorProto | None = None, opset: int = 19,
       **attrs: Any) -> onnx.ModelProto:
    inputs = ["w", "s"] + (["zp"] if zp is not None else [])
    inits = [x_init, init("s", np.asarray(scale, np.float32))] + ([zp] if zp is not None else [])
    node = helper.make_node("DequantizeLinear", inputs, ["y"], name="dq", **attrs)
    return model([node], [], ["y"], inits, opset=opset)


def int4(name: str, shape: list[int]) -> onnx.TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, shape, [1] * int(np.prod(shape)))


GRAPHS: dict[str, Callable[[], tuple[onnx.ModelProto, dict[str, Any]]]] = {
    "custom_domain": lambda: (model([helper.make_node("FusedMatMul", ["x", "w"], ["y"], name="fused",
                                                      domain="com.microsoft")],
                                    [x()], ["y"], [init("w", np.ones((4, 2), np.float32))],
                                    extra=("com.microsoft",)), {}),
    "unsupported_op": lambda: (model([helper.make_node("Det", ["x"], ["y"], name="det")],
                                     [x(shape=[2, 2])], ["y"]), {}),
    "opset_range": lambda: (model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x()], ["y"],
                                  opset=24), {}),
    "type": lambda: (model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                           [x(dtype=TensorProto.INT32)], ["y"],
                           [init("w", np.ones((4, 2), np.int32))]), {}),
    "quantized_type": lambda: (model([helper.make_node("Gather", ["x", "idx"], ["y"], name="gather")],
                                     [x()], ["y"], [init("idx", np.zeros(2, np.int8))]), {}),
    "zero_point": lambda: (dq(init("w", np.ones((2, 4), np.int8)), 0.1,
                              init("zp", np.int8(3))), {}),
    "scale_positive": lambda: (dq(init("w", np.ones((2, 4), np.int8)), -0.1,
                                  init("zp", np.int8(0))), {}),
    "block_axes": lambda: (dq(int4("w", [4, 8]), np.ones((2, 4)), opset=21, axis=0, block_size=2), {}),
    "block_form": lambda: (dq(int4("w", [2, 4, 8]), np.ones((2, 4, 2)), opset=21, axis=2,
                              block_size=4), {}),
    "int4_odd": lambda: (dq(int4("w", [3]), 0.5, opset=21), {}),
    "initializer_input": lambda: (model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")],
                                        [x(), x("axes", [1], I64)], ["y"], opset=18), {}),
    "int64_narrowed": lambda: (model([helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")],
                                     [x()], ["y"], [init("axes", np.array([2**40], np.int64))],
                                     opset=18), {}),
    "dynamic_shape": lambda: (model([helper.make_node("Identity", ["input_ids"], ["y"], name="id")],
                                    [x("input_ids", ["batch", "seq", 3], I64)], ["y"]),
                              {"max_seq": 64, "batch": 2}),
}


def clean() -> onnx.ModelProto:
    """A graph that breaks nothing: the same shapes of every Q/DQ form the formats write."""
    nodes = [helper.make_node("DequantizeLinear", ["w4", "s4"], ["w"], axis=0, block_size=2, name="dq4"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("QuantizeLinear", ["y", "sa", "za"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "sa", "za"], ["z"], name="dq8"),
             helper.make_node("ReduceSum", ["z", "axes"], ["out"], name="sum")]
    inits = [int4("w4", [4, 8]), init("s4", np.ones((2, 8), np.float32)), init("sa", np.float32(0.1)),
             init("za", np.int8(0)), init("axes", np.array([1], np.int64))]
    return model(nodes, [x()], ["out"], inits, opset=21)


@pytest.mark.parametrize("version", known_versions())
def test_a_clean_graph_passes(version: str) -> None:
    assert check_model(clean(), load_rules(version)) == []


@pytest.mark.parametrize("version", known_versions())
@pytest.mark.parametrize("rule", sorted(GRAPHS))
def test_each_hand_made_graph_breaks_exactly_its_rule(rule: str, version: str) -> None:
    graph, kwargs = GRAPHS[rule]()
    found = check_model(graph, load_rules(version), **kwargs)
    assert [v.rule for v in found] == [rule], [v.line() for v in found]
    assert found[0].line().endswith(f"[{rule}]")


@pytest.mark.parametrize("version", known_versions())
def test_every_rule_in_the_table_is_exercised_by_a_graph(version: str) -> None:
    assert set(load_rules(version).rules) == set(GRAPHS)


def test_tables_name_their_source_and_version() -> None:
    assert known_versions() == ["10.3", "10.13"]  # the targets' TensorRT versions
    for v in known_versions():
        r = load_rules(v)
        assert r.tensorrt == v and r.source == "https://github.com/onnx/onnx-tensorrt"
        assert "10.1-GA" in r.read_at and r.operators["DequantizeLinear"] == ("INT8", "FP8", "INT4")
    text = (trt_check.RULES_DIR / "tensorrt-10.3.toml").read_text(encoding="utf-8")
    assert "ModelImporter.cpp importModel (10.1-GA lines 599-612)" in text  # the opset-21 finding
    assert load_rules("10.3").opset_max == 21  # opset-21 int4 bundles are inside the range


def test_targets_name_a_version_with_a_table() -> None:
    from targets import list_targets

    for t in list_targets():
        if t.runtime == "tensorrt":
            assert t.tensorrt is not None
            load_rules(t.tensorrt)


def test_versions_and_unknown_tables() -> None:
    assert major_minor("10.3.0.30") == "10.3"
    with pytest.raises(ToolkitError, match="not a TensorRT version"):
        major_minor("ten")
    with pytest.raises(ToolkitError, match="no ONNX parser rule table for TensorRT 8.5"):
        load_rules("8.5.2")


def test_a_constant_input_may_be_a_constant_node() -> None:
    axes = helper.make_node("Constant", [], ["axes"], value=numpy_helper.from_array(np.array([1], np.int64)))
    graph = model([axes, helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")], [x()], ["y"],
                  opset=18)
    assert check_model(graph, load_rules("10.3")) == []


def test_parse_time_inputs_follow_the_version() -> None:
    """Squeeze axes: an initializer in 10.3, a tensor since 10.7 (Changelog 10.7)."""
    graph = model([helper.make_node("Squeeze", ["x", "axes"], ["y"], name="sq")],
                  [x(shape=[1, 4]), x("axes", [1], I64)], ["y"])
    assert [v.rule for v in check_model(graph, load_rules("10.3"))] == ["initializer_input"]
    assert check_model(graph, load_rules("10.13")) == []


# --- bundles -----------------------------------------------------------------------------------
def check_cli(bundle: Path, *args: str) -> Any:
    from toolkit.commands.check import check

    return CliRunner().invoke(check, [str(bundle), *args])


@pytest.mark.parametrize("arch", sorted(REGISTRY))  # every architecture the converter supports
def test_converted_jetson_bundles_pass(tiny_bundle: Any, arch: str) -> None:
    bundle = tiny_bundle(arch, ORIN)
    rec = read_manifest(bundle).trt_check
    assert rec is not None and rec.passed and rec.tensorrt == ["10.3"] and not rec.forced
    assert f"- {rec.summary()}" in (bundle / "report.md").read_text()
    result = check_cli(bundle)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: TensorRT 10.3's ONNX parser rules accept model.onnx")


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_quantized_jetson_bundles_pass(q_bundle: Any, precision: str) -> None:  # noqa: F811
    bundle = q_bundle("llama", ORIN, precision)
    rec = read_manifest(bundle).trt_check
    assert rec is not None and rec.passed, rec
    assert f"- {rec.summary()}" in (bundle / "report.md").read_text()
    for version in ("10.3", "10.13"):
        result = check_cli(bundle, "--tensorrt", version)
        assert result.exit_code == 0, result.output


def test_thor_fp8_bundle_passes_10_13(q_bundle: Any) -> None:  # noqa: F811
    rec = read_manifest(q_bundle("llama", THOR, "fp8")).trt_check
    assert rec is not None and rec.passed and rec.tensorrt == ["10.13"], rec


def test_cpu_bundle_fails_one_line_per_kind_of_offence_and_all_lines_on_asking(tiny_bundle: Any) -> None:
    bundle = tiny_bundle("llama", "cpu")
    m = read_manifest(bundle)
    assert m.trt_check is None  # only TensorRT targets are checked at convert time
    graph = onnx.load(str(bundle / m.model_file), load_external_data=False)
    microsoft = [n.name for n in graph.graph.node if n.domain == "com.microsoft"]
    assert microsoft
    result = check_cli(bundle, "--all")
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.startswith("TensorRT ")]
    for version in known_versions():
        mine = [ln for ln in lines if ln.startswith(f"TensorRT {version}: ")]
        named = [ln.split(": ", 1)[1].split(" (")[0] for ln in mine]
        assert len(named) == len(set(named))  # one line per node
        assert set(microsoft) <= set(named)
        assert all(ln.endswith(("[custom_domain]", "[unsupported_op]")) for ln in mine), mine
    counts = ", ".join(f"{sum(ln.startswith(f'TensorRT {v}: ') for ln in lines)} for TensorRT {v}"
                       for v in known_versions())
    assert f"failed: offending nodes: {counts}" in result.output
    assert "note: this bundle is for target cpu" in result.output
    # by default one line per (version, rule, operator, message), with its count
    short = check_cli(bundle)
    assert short.exit_code == 1 and f"failed: offending nodes: {counts}" in short.output
    grouped = [ln for ln in short.output.splitlines() if ln.startswith("TensorRT ")]
    assert len(grouped) < len(lines)
    kinds = {(ln.split(": ", 1)[0], ln.split(" (", 1)[1].split(")")[0], ln.rsplit("[", 1)[1])
             for ln in lines}
    assert len(grouped) == len(kinds)
    total = sum(int(ln.split(": ", 1)[1].split(" node")[0]) for ln in grouped)
    assert total == len(lines)


def test_convert_refuses_a_failing_jetson_graph_unless_forced(tiny_dir: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from convert.pipeline import convert_model

    real = trt_check.load_rules

    def without_matmul(version: str) -> trt_check.Rules:
        r = real(version)
        return dataclasses.replace(r, operators={k: v for k, v in r.operators.items() if k != "MatMul"})

    monkeypatch.setattr(trt_check, "load_rules", without_matmul)
    out = tmp_path / "b"
    with pytest.raises(ToolkitError, match=r"MatMul is not in TensorRT 10.3's ONNX operator matrix") as e:
        convert_model(str(tiny_dir("llama")), ORIN, out, max_seq=64)
    assert "--force writes the bundle" in (e.value.hint or "")
    assert not out.exists()
    convert_model(str(tiny_dir("llama")), ORIN, out, max_seq=64, force=True)
    rec = read_manifest(out).trt_check
    assert rec is not None and not rec.passed and rec.forced
    assert rec.violation_count == len(rec.violations) > 0
    assert all(v.endswith("[unsupported_op]") for v in rec.violations)
    forced = f"FAILED, {rec.violation_count} offending node line(s) (written with --force)"
    assert rec.summary().endswith(forced)
    assert rec.summary() in (out / "report.md").read_text()
