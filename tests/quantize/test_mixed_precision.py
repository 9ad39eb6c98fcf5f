"""Mixed 4/8-bit int4: sensitivity ranking (quantize/sensitivity.py), the mixed steps of the int4
ladder on CPU (MatMulNBits bits=8) and Jetson (INT8 weight-only DQ), and the int4 defaults."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_fixtures import LOOSE, q_fp32_bundle  # noqa: F401  (fixtures)

from bundle.manifest import load_verified


def _attr(node: onnx.NodeProto, name: str) -> Any:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def _tiny_decoder(fp32: Any) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """The tiny Llama's fp32 graph and two prefill feeds of random token ids."""
    from quantize.activations import decoder_feeds
    from quantize.graph import load_model

    bundle = fp32("llama", "cpu")
    model = load_model(bundle / load_verified(bundle).model_file)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 100, 16).tolist() for _ in range(2)]  # vocab 110
    return model, list(decoder_feeds(model, windows))


def test_sensitivity_ranks_the_unit_whose_rounding_hurts_the_model_first(q_fp32_bundle, tmp_path):  # noqa: F811
    """A 'quantizer' that leaves every weight alone but wipes one: that unit alone moves the
    next-token distributions, so it ranks first and the others measure ~0 (the override
    really replaces one unit's weights, and only them)."""
    from quantize import graph as g
    from quantize.cpu import tied_tables
    from quantize.sensitivity import measure, units_of

    model, feeds = _tiny_decoder(q_fp32_bundle)
    before = onnx.helper.printable_graph(model.graph)
    down = next(m.weight for m in g.weight_matmuls(model.graph) if "down_proj" in m.node.name)
    shapes = {m.weight: (m.K, m.N) for m in g.weight_matmuls(model.graph)}  # down's is its own

    def quantizer(w: np.ndarray, h: np.ndarray) -> np.ndarray:
        return w * 0.0 if w.shape == shapes[down] else w

    tied = tied_tables(model.graph)
    sens = measure(model, feeds, quantizer, {}, tied, "decoder", "symmetric", 32, tmp_path)
    assert sens.tokens == 32 and len(sens.units) == len(units_of(model, tied))
    first = [u for u in sens.units if any(shapes[w] == shapes[down] for w in u.weights)]
    assert {u.weights for u in sens.units[:len(first)]} == {u.weights for u in first}
    assert sens.units[0].divergence > 1e-3
    assert all(abs(u.divergence) < 1e-6 for u in sens.units[len(first):])
    assert "down_proj" in sens.units[0].layers[0]
    assert onnx.helper.printable_graph(model.graph) == before  # the caller's graph is untouched
    # excluded weights (the tied head) are never candidates
    assert down not in {w for u in measure(model, feeds, quantizer, {}, {down}, "decoder",
                                           "symmetric", 32, tmp_path).units for w in u.weights}


def test_sensitivity_of_real_rounding_is_positive_and_recorded(q_fp32_bundle, tmp_path):  # noqa: F811
    from quantize.blockwise import quantize_symmetric
    from quantize.sensitivity import TOP, measure

    model, feeds = _tiny_decoder(q_fp32_bundle)

    def quantizer(w: np.ndarray, h: np.ndarray) -> np.ndarray:
        return quantize_symmetric(w, 4, 32, importance=h).dequantize()

    sens = measure(model, feeds, quantizer, {}, set(), "decoder", "symmetric", 32, tmp_path)
    kls = [u.divergence for u in sens.units]
    assert kls == sorted(kls, reverse=True) and kls[-1] > 0
    record = sens.to_json()
    assert record["tokens"] == 32 and "KL" in record["proxy"]
    assert len(record["top"]) == min(TOP, len(kls)) and record["top"][0]["divergence"] > 0
    assert [u.weights for u in sens.widest(0.25)] == [u.weights for u in sens.units[:math.ceil(
        len(kls) / 4)]] and sens.widest(0.0) == ()


def _fail_without_8bit(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The real gate, failed on purpose for every step with no 8-bit unit (the tiny random
    model's figures mean little); returns the list of 8-bit unit counts the gate saw."""
    from quantize import pipeline

    real = pipeline._gate
    seen: list[int] = []

    def gate(bundle: Path, src: Any, model_path: Path, manifest: Any, *args: Any) -> Any:
        result = real(bundle, src, model_path, manifest, *args)
        units = manifest.quantization.details.get("int8_weights", {}).get("units", 0)
        seen.append(units)
        if not units:
            result.failures.append("failed by the test: no 8-bit unit")
        return result

    monkeypatch.setattr(pipeline, "_gate", gate)
    return seen


def _awq_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from quantize import formats

    real = formats._run_awq
    runs: list[str] = []

    def run(job: Any, grid: str, exclude: set[str]) -> Any:
        runs.append(grid)
        return real(job, grid, exclude)

    monkeypatch.setattr(formats, "_run_awq", run)
    return runs


def test_cpu_mixed_step_kept_when_the_pure_grid_fails(q_fp32_bundle, tmp_path, monkeypatch):  # noqa: F811
    from quantize import quantize_bundle
    from quantize.report import summary

    seen = _fail_without_8bit(monkeypatch)
    runs = _awq_runs(monkeypatch)
    out = tmp_path / "mixed"
    result = quantize_bundle(q_fp32_bundle("llama", "cpu"), "int4", out=out, thresholds=LOOSE,
                             samples=4, seq_len=32)
    q = load_verified(out).quantization
    assert result.passed and seen == [0, 1]  # the ladder stopped at the first step that passed
    assert [(t["grid"], t["block_size"], t["int8_fraction"], t["passed"])
            for t in q.grid_choice["tried"]] == [("zero-point", 64, 0.0, False),
                                                 ("zero-point", 64, 0.125, True)]
    assert runs == ["zero-point"]  # AWQ and the sensitivity made once for both steps
    wide, sens = q.details["int8_weights"], q.details["sensitivity"]
    assert wide["units"] == 1 and wide["of"] == sens["units"] == 8  # 2 layers x 4 inputs
    assert wide["weights"] == sens["top"][0]["weights"]  # the most sensitive unit
    assert wide["layers"] == sens["top"][0]["layers"] and all(
        name.startswith("layers.") and name.endswith(("_proj", "_packed")) for name in wide["layers"])
    errors = [u["divergence"] for u in sens["top"]]
    assert errors == sorted(errors, reverse=True)
    # exactly those weights have 8-bit codes (the tied head is 8-bit anyway: 64-wide blocks)
    m = onnx.load(str(out / "model.onnx"))
    head = set(q.details["tied_head"])
    eight = [n for n in m.graph.node if n.op_type == "MatMulNBits" and _attr(n, "bits") == 8
             and not any(n.input[1].startswith(h) for h in head)]
    assert len(eight) == 1 and eight[0].input[1].startswith(wide["weights"][0])
    # in the int8 bundles' grid (QuantOptions.int8_grid): an integer zero point per block
    assert _attr(eight[0], "block_size") == 64 and len(eight[0].input) == 4
    four = [n for n in m.graph.node if n.op_type == "MatMulNBits" and _attr(n, "bits") == 4]
    assert four and not any(n.input[1].startswith(w) for n in four for w in wide["weights"])
    tried = q.grid_choice["tried"]
    assert tried[1]["model_bytes"] > tried[0]["model_bytes"]
    report = (out / "report.md").read_text()
    assert "at 8 bits: the 1 of 8 most sensitive weight units" in report
    printed = summary(result)
    assert "over the all-4-bit graph" in printed and wide["layers"][0] in printed


def test_a_shared_memo_makes_awq_and_the_ranking_once_across_calls(q_fp32_bundle, tmp_path,  # noqa: F811
                                                                   monkeypatch):
    """bench/quantize.py writes each ladder step alone: with one memo, AWQ and the sensitivity
    ranking of a grid are made by the first call and reused by the next."""
    from quantize import quantize_bundle
    from quantize.formats import QuantOptions

    runs = _awq_runs(monkeypatch)
    memo: dict = {}
    for i, fraction in enumerate((0.0, 0.25)):
        q = quantize_bundle(q_fp32_bundle("llama", "cpu"), "int4", out=tmp_path / f"s{i}",
                            thresholds=LOOSE, samples=4, seq_len=32, force=True, memo=memo,
                            options=QuantOptions(int4_grid="zero-point", block_size=64,
                                                 int8_fraction=fraction))
        assert q.manifest.quantization is not None
    assert runs == ["zero-point"]
    assert q.manifest.quantization.details["int8_weights"]["units"] == 2  # ceil(0.25 x 8)


def test_jetson_mixed_step_writes_int8_weight_only_dq(q_fp32_bundle, tmp_path, monkeypatch):  # noqa: F811
    from quantize import quantize_bundle

    seen = _fail_without_8bit(monkeypatch)
    out = tmp_path / "mixed"
    quantize_bundle(q_fp32_bundle("llama", "jetson"), "int4", out=out, thresholds=LOOSE,
                    samples=4, seq_len=32)
    q = load_verified(out).quantization
    assert seen == [0, 1] and q.gate.passed
    assert [(t["grid"], t["int8_fraction"]) for t in q.grid_choice["tried"]] == [
        ("symmetric", 0.0), ("symmetric", 0.125)]
    wide = q.details["int8_weights"]["weights"]
    assert wide and q.details["int8_weights"]["units"] == 1
    m = onnx.load(str(out / "model.onnx"))
    t = {i.name: i for i in m.graph.initializer}
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in t]
    int8 = [n for n in dq if t[n.input[0]].data_type == TensorProto.INT8]
    int4 = [n for n in dq if t[n.input[0]].data_type == TensorProto.INT4]
    assert sorted(n.input[0].removesuffix("_int8") for n in int8) == sorted(wide)
    for n in int8:  # per-channel along N, zero point 0
        K, N = t[n.input[0]].dims
        assert _attr(n, "axis") == 1 and _attr(n, "block_size") in (None, 0)
        assert list(t[n.input[1]].dims) == [N] and not numpy_helper.to_array(t[n.input[2]]).any()
    assert int4 and not any(n.input[0].startswith(w) for n in int4 for w in wide)
    # INT4 blocked DQ and INT8 per-channel DQ side by side pass the offline parser check
    check = load_verified(out).trt_check
    assert check is not None and check.passed, check


def test_int4_default_budget():
    from quantize.gate import thresholds_for

    t = thresholds_for("int4")
    assert (t.max_ppl_increase, t.min_top1) == (0.05, 0.90)
    assert thresholds_for("int4", max_ppl_increase=0.2).max_ppl_increase == 0.2
    assert (thresholds_for("int8").max_ppl_increase, thresholds_for("int8").min_top1) == (0.10, 0.80)


def test_weight_only_int8_is_held_to_one_percent():
    """int8's +10 % is for formats that quantize the activations too (Jetson's W8A8, dynamic
    MatMulInteger); the CPU's default weight-only MatMulNBits int8 has its own +1 %."""
    from quantize.formats import FORMATS, format_for
    from quantize.pipeline import gate_limits
    from targets import load_target

    cpu, jetson = (format_for(load_target(t), "int8") for t in ("cpu", "jetson-orin-nano-8gb"))
    assert (cpu.name, jetson.name) == ("ort-matmulnbits", "qdq-int8-symmetric")
    assert gate_limits(cpu, "int8", None).max_ppl_increase == 0.01
    assert gate_limits(cpu, "int8", {"max_ppl_increase": None, "min_top1": 0.9}).max_ppl_increase == 0.01
    assert gate_limits(cpu, "int8", {"max_ppl_increase": 0.05}).max_ppl_increase == 0.05  # the flag wins
    assert gate_limits(cpu, "int4", None).max_ppl_increase == 0.05
    assert gate_limits(jetson, "int8", None).max_ppl_increase == 0.10
    assert gate_limits(FORMATS["ort-matmul-integer"], "int8", None).max_ppl_increase == 0.10
