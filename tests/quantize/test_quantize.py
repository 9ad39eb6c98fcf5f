"""quantize/: formats per target family, the accuracy gate, calibration input errors, the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, numpy_helper
from quantize_fixtures import LOOSE, q_bundle, q_fp32_bundle  # noqa: F401  (fixtures)

from bundle.errors import ToolkitError
from bundle.manifest import load_verified

JETSON = "jetson"  # the Orin family target: fp16, int8, int4
THOR = "jetson-thor"  # the only target with fp8


def graph(bundle: Path) -> onnx.ModelProto:
    return onnx.load(str(bundle / "model.onnx"))


def nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op]


def inits(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def attr(node: onnx.NodeProto, name: str) -> int | None:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


def opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def logits(bundle: Path, ids: list[int]) -> np.ndarray:
    """One prefill through device.runtime.ort_backend (ONNX Runtime CPU) -> [T, V] float32."""
    from device.runtime.ort_backend import OrtDecoderBackend
    m = load_verified(bundle)
    be = OrtDecoderBackend(bundle / m.model_file, m.kv_layout(), m.dims.vocab_size, threads=1)
    T = len(ids)
    out = be.step(np.asarray([ids]), np.arange(T)[None], [0], np.arange(T)).copy()
    be.close()
    return out[0]


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean cosine of logit rows, top-1 agreement)."""
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return float(cos.mean()), float((a.argmax(-1) == b.argmax(-1)).mean())


IDS = [1, 5, 9, 14, 22, 7, 31, 40, 8, 12, 60, 3 + 2, 17, 29, 44, 50]


# --- CPU (ONNX Runtime) --------------------------------------------------------------------
NBITS = "ort-matmulnbits"


@pytest.mark.parametrize("precision,bits", [("int4", 4), ("int8", 8)])
def test_cpu_matmulnbits_structure(q_bundle, precision, bits):  # noqa: F811
    bundle = q_bundle("llama", "cpu", precision, NBITS, "offsets" if bits == 4 else None)
    m = graph(bundle)
    mm = nodes(m, "MatMulNBits")
    # no float weights left: the only float MatMuls are the 0/1 block-sum tables of int4 offsets
    float_mm = [n for n in nodes(m, "MatMul") if n.input[1] in inits(m)]
    assert bool(float_mm) is (bits == 4)
    for n in float_mm:
        e = numpy_helper.to_array(inits(m)[n.input[1]])
        assert set(np.unique(e)) <= {0.0, 1.0} and (e.sum(0)[e.sum(0) > 0] == 32).all()
    # int4 offsets ride as extra rows: the layers read [x | block sums | block sums], K + 2P wide
    augmented = [n for n in mm if n.input[0].endswith("_aug")]
    assert bool(augmented) is (bits == 4)
    for n in augmented:
        (cat,) = [c for c in nodes(m, "Concat") if c.output[0] == n.input[0]]
        assert len(cat.input) == 3 and cat.input[1] == cat.input[2]
        assert attr(n, "K") % 32 == 0 and attr(n, "bits") == 4
    layer_bits = {attr(n, "bits") for n in mm}
    assert layer_bits == ({4, 8} if bits == 4 else {8})  # int4 layers, int8 tied head
    assert {attr(n, "accuracy_level") for n in mm} == {4}
    # the tied table: one quantized copy read by both the LM head and the embedding, in the
    # layers' blocks of 32 beside the exact offset grid and in int8 bundles (64 only beside the
    # int4 plain grids: test_cpu_int4_first_ladder_step_when_it_passes), symmetric codes
    (gbq,) = nodes(m, "GatherBlockQuantized")
    head = [n for n in mm if n.input[1] == gbq.input[0]]
    assert len(head) == 1 and attr(head[0], "bits") == 8 and len(head[0].input) == 3
    assert attr(head[0], "block_size") == attr(gbq, "block_size") == 32
    assert {attr(n, "block_size") for n in mm if n is not head[0]} == {32}
    # every layer carries an integer zero point per block (MatMulNBits' fourth input, uint8, one
    # a block of each column, two a byte at 4 bits): int8's grid; the int4 offset grid's whole
    # steps of each offset (the residuals ride as rows)
    for n in mm:
        if n is not head[0]:
            assert len(n.input) == 4, n.name
            zp = numpy_helper.to_array(inits(m)[n.input[3]])
            blocks = attr(n, "K") // 32
            per_column = blocks if bits == 8 else -(-blocks // 2)
            assert zp.dtype == np.uint8 and zp.size == attr(n, "N") * per_column
    assert not [t for t in m.graph.initializer if t.data_type == TensorProto.FLOAT
                and np.prod(t.dims) >= 8 * 128 and not t.name.endswith("_scales")
                and not t.name.startswith("block_sums")]  # no float copy of the table
    manifest = load_verified(bundle)
    q = manifest.quantization
    assert manifest.precision == precision and q.format == "ort-matmulnbits"
    assert q.details["grid"] == ("offsets" if bits == 4 else "zero-point")
    assert q.details["int8_grid"] == "zero-point" and q.options["int8_grid"] == "zero-point"
    assert None not in (q.gate.ppl_fp32, q.gate.ppl_quantized, q.gate.top1_agreement, q.gate.greedy)
    # projections that read the same input (gate/up, q/k/v if not fused at export) are fused
    layer_inputs = [n.input[0] for n in mm if n.input[1] != gbq.input[0]]
    assert len(layer_inputs) == len(set(layer_inputs)) and nodes(m, "Split")


def test_cpu_int8_symmetric_grid_on_request(q_fp32_bundle, tmp_path):  # noqa: F811
    """QuantOptions.int8_grid="symmetric": the int8 layers without zero points (MatMulNBits' three
    inputs), the head in blocks of 32 as with the default grid; the manifest says which."""
    from quantize import quantize_bundle
    from quantize.formats import QuantOptions
    from quantize.report import summary

    out = tmp_path / "int8-symmetric"
    result = quantize_bundle(q_fp32_bundle("llama", "cpu"), "int8", out=out, thresholds=LOOSE,
                             samples=4, seq_len=32, options=QuantOptions(int8_grid="symmetric"))
    assert "int8 grid  symmetric in blocks of 32, the tied head symmetric in blocks of 32" in summary(result)
    mm = nodes(graph(out), "MatMulNBits")
    assert mm and all(len(n.input) == 3 and attr(n, "block_size") == 32 for n in mm)
    q = load_verified(out).quantization
    assert q.details["grid"] == q.details["int8_grid"] == q.options["int8_grid"] == "symmetric"


def test_cpu_int4_first_ladder_step_when_it_passes(q_bundle):  # noqa: F811
    """With limits the first step of the ladder meets, the gate keeps it: zero points in blocks of
    64 after AWQ (no offset rows), the head at 8 bits in 64s too."""
    m = graph(q_bundle("llama", "cpu", "int4"))
    assert not [n for n in nodes(m, "MatMul") if n.input[1] in inits(m)]
    layers = [n for n in nodes(m, "MatMulNBits") if attr(n, "bits") == 4]
    assert layers and all(len(n.input) == 4 and attr(n, "block_size") == 64 for n in layers)
    q = load_verified(q_bundle("llama", "cpu", "int4")).quantization
    assert [(t["grid"], t["block_size"]) for t in q.grid_choice["tried"]] == [("zero-point", 64)]
    assert q.details["awq"]["grid"] == "zero-point"  # AWQ is on by default for the plain grids
    head = [n for n in nodes(m, "MatMulNBits") if attr(n, "bits") == 8]
    assert [attr(n, "block_size") for n in head] == [64]  # beside a plain grid, the head in 64s
    assert q.calibration["samples"] == 4


def test_cpu_int4_numerics_and_generation(q_bundle, q_fp32_bundle):  # noqa: F811
    from device.runtime.generate import generate
    from device.runtime.runner import load_bundle

    bundle = q_bundle("llama", "cpu", "int4")
    cos, _ = agreement(logits(q_fp32_bundle("llama", "cpu"), IDS), logits(bundle, IDS))
    # random Gaussian weights in blocks of 64: 4 bits lose ~10 % per layer (SmolLM2: see bench)
    assert cos > 0.85
    runner = load_bundle(bundle, threads=1)
    prompt = runner.tokenizer.encode("the capital of france is")
    tokens = list(generate(runner.backend, prompt, 8))
    runner.close()
    assert len(tokens) == 8
    report = (bundle / "report.md").read_text()
    assert "## Quantization" in report and "perplexity" in report


@pytest.mark.parametrize("grid", ["zero-point", "offsets"])
def test_cpu_int4_grids_run_close_to_fp32(q_bundle, q_fp32_bundle, grid):  # noqa: F811
    bundle = q_bundle("llama", "cpu", "int4", NBITS, grid)
    m = graph(bundle)
    layers = [n for n in nodes(m, "MatMulNBits") if attr(n, "bits") == 4]
    if grid == "zero-point":  # B, scales, zero_points
        assert layers and all(len(n.input) == 4 for n in layers)
    cos, _ = agreement(logits(q_fp32_bundle("llama", "cpu"), IDS), logits(bundle, IDS))
    assert cos > 0.9
    assert load_verified(bundle).quantization.details["grid"] == grid


@pytest.mark.parametrize("K,N", [(64, 24), (96, 40)])
def test_offset_rows_reproduce_the_offset_form(K, N):
    """x_aug @ W_aug (one MatMulNBits) equals x @ W of the offset form, up to the two-digit
    rounding of the offsets' residuals (fp32 compute); Q4_1-style weights come back near-exactly.
    With int8 compute (accuracy_level 4, what bundles run) the kernel rounds x, and that error
    meets the integer part of the weights: the offsets' whole steps ride in the zero points, so
    that part is the weight itself within half a step (quantize/cpu.py)."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from quantize.blockwise import quantize_offset
    from quantize.cpu import OffsetRows, pack_nbits, pack_zero_points, with_offset_rows

    rng = np.random.default_rng(K)
    kb = K // 32
    step = rng.uniform(0.001, 0.02, (kb, N))
    # blocks 6.5-7.5 steps off centre (Q4_1's SmolLM2 blocks: a median 1, up to 7.4)
    low = -rng.choice([0.5, 14.5], (kb, N)) * step
    low[:, 0] = 0.2  # and a column of blocks far from zero (whole steps past the zero points')
    w = (np.repeat(step, 32, 0) * rng.integers(0, 16, (K, N)) + np.repeat(low, 32, 0)).astype(np.float32)
    bw = quantize_offset(w, 4, 32)
    aug = with_offset_rows(bw)
    assert aug.zero_points is not None and aug.offsets is None
    assert bw.offsets is not None
    residual = bw.offsets - bw.scales * (8 - aug.zero_points[:kb].astype(np.float32))
    ratio = bw.offsets / bw.scales
    near = (ratio > -7.5) & (ratio <= 8.5)  # the zero points reach: 8 - round(c / s) in 0..15
    assert near[:, 1:].mean() > 0.75 and not near[:, 0].any()
    assert (np.abs(residual[near]) <= 0.5 * bw.scales[near] + 1e-7).all()
    assert (np.abs(residual) <= np.abs(bw.offsets) + 1e-7).all()  # clamped: still nearer
    assert np.abs(aug.zero_points[:kb].astype(int) - 8).max() > 2  # the test's offsets need them
    assert (aug.zero_points[kb:] == 8).all()  # the residual digits are symmetric

    def run(level: int, x: np.ndarray) -> np.ndarray:
        g = helper.make_graph([], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        xa, Ka, extra = OffsetRows(g, 32).augmented("x", K)
        assert Ka == K + 2 * 32
        g.initializer.extend([numpy_helper.from_array(pack_nbits(aug), "B"),
                              numpy_helper.from_array(np.ascontiguousarray(aug.scales.T), "S"),
                              numpy_helper.from_array(pack_zero_points(aug), "Z")])
        g.node.extend(extra + [helper.make_node("MatMulNBits", [xa, "B", "S", "Z"], ["y"],
                                                domain="com.microsoft", K=Ka, N=N, bits=4,
                                                block_size=32, accuracy_level=level)])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
        return ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    x = rng.standard_normal((2, 3, K)).astype(np.float32) + 3.0  # block sums ~100
    ref = x @ bw.dequantize()
    assert np.abs(run(0, x) - ref).max() < 2e-3 * np.abs(ref).max()
    assert np.abs(ref - x @ w).max() < 0.03 * np.abs(x @ w).max()
    # int8 compute: the int8 rounding of x times the weights (as on the plain grids), not times
    # weights shifted by whole offsets (relative RMS error 0.8e-3 here; 1.9e-3 and 2.4e-3 when
    # the zero points were all 8 and the rows carried the offsets whole)
    err = run(4, x)[..., 1:] - ref[..., 1:]
    assert np.sqrt((err ** 2).mean() / (ref[..., 1:] ** 2).mean()) < 1.2e-3


def test_zero_point_grid_matches_the_kernel():
    """pack_zero_points' layout is the one MatMulNBits reads (odd block counts padded per column)."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from quantize.blockwise import quantize_symmetric, quantize_zero_point, relative_error
    from quantize.cpu import pack_nbits, pack_zero_points

    rng = np.random.default_rng(3)
    K, N = 96, 10  # 3 blocks per column: the packed zero points pad each column to 2 bytes
    w = (rng.standard_normal((K, N)) * 0.05 + 0.03).astype(np.float32)
    bw = quantize_zero_point(w, 4, 32)
    assert bw.zero_points is not None and pack_zero_points(bw).shape == (N * 2,)
    inits_ = [numpy_helper.from_array(pack_nbits(bw), "B"),
              numpy_helper.from_array(np.ascontiguousarray(bw.scales.T), "S"),
              numpy_helper.from_array(pack_zero_points(bw), "Z")]
    node = helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], ["y"], domain="com.microsoft",
                            K=K, N=N, bits=4, block_size=32, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits_)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17),
                                                helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, K)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ bw.dequantize(), rtol=1e-4, atol=1e-4)
    # a block off-centre (mean 0.03, sd 0.05) is coded closer with a zero point than without
    assert relative_error(w, bw.dequantize()) < relative_error(w, quantize_symmetric(w, 4, 32).dequantize())


@pytest.mark.parametrize("grid,bits", [("zero-point", 4), ("offsets", 4), ("zero-point", 8)])
def test_cpu_grid_on_a_width_that_is_not_whole_blocks(grid, bits):
    """K = 200 is 6.25 blocks of 32: the zero-point grid (4 and 8 bits) was silently written
    symmetric while the manifest said zero-point; MatMulNBits pads K, so the zero points stay.
    The offset grid needs whole blocks: it falls back to symmetric, and the details say so."""
    import onnxruntime as ort
    from onnx import helper

    from quantize.cpu import NBitsConfig, matmul_nbits

    K, N = 200, 48  # x [1, K] @ W [K, N]
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((K, N)) * 0.05 + 0.02).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N])],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    cfg = NBitsConfig(bits=bits, block=32, grid=grid if bits == 4 else "zero-point", accuracy_level=0)
    r = matmul_nbits(model, cfg)
    (node,) = nodes(r.model, "MatMulNBits")
    assert attr(node, "bits") == bits and attr(node, "K") == K
    if grid == "offsets":  # no zero points, no offset rows, and recorded
        assert len(node.input) == 3 and r.details["symmetric_not_offsets"] == ["W"]
    else:
        assert len(node.input) == 4 and "symmetric_not_offsets" not in r.details
    x = rng.standard_normal((1, K)).astype(np.float32)
    y = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    assert np.abs(y - x @ w).max() < (0.02 if bits == 8 else 0.15) * np.abs(x @ w).max()


def test_an_untied_lm_head_is_quantized_at_head_bits_as_the_manifest_says() -> None:
    """Only a tied head (an embedding table too) was kept at head_bits: an untied one (Phi-3,
    Mistral) went to 4 bits like any layer while the details said head_bits 8. The head is
    found walking back from the logits through the ops after it (here a scale)."""
    from onnx import helper

    from quantize.cpu import NBitsConfig, matmul_nbits

    C, V = 64, 96
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(rng.standard_normal((C, C)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((C, V)).astype(np.float32), "Whead"),
             numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
                           helper.make_node("Relu", ["h"], ["r"], name="act"),
                           helper.make_node("MatMul", ["r", "Whead"], ["z"], name="head"),
                           helper.make_node("Mul", ["z", "scale"], ["logits"], name="scaled")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, V])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    r = matmul_nbits(model, NBitsConfig(bits=4, block=32, grid="symmetric", head_bits=8))
    bits = {n.output[0]: attr(n, "bits") for n in nodes(r.model, "MatMulNBits")}
    assert bits == {"h": 4, "z": 8}, bits
    assert r.details["lm_head"] == "Whead" and r.details["tied_head"] == []


def test_cpu_matmul_integer_structure(q_bundle):  # noqa: F811
    m = graph(q_bundle("llama", "cpu", "int8", "ort-matmul-integer"))
    assert nodes(m, "MatMulInteger") and nodes(m, "DynamicQuantizeLinear")


def test_cpu_int8_uses_the_targets_format(q_bundle):  # noqa: F811
    from targets import load_target

    q = load_verified(q_bundle("llama", "cpu", "int8")).quantization
    assert q.format == load_target("cpu").formats["int8"]


@pytest.mark.parametrize("fmt", [None, NBITS])
def test_cpu_encoder_int8(q_bundle, fmt):  # noqa: F811
    bundle = q_bundle("bert", "cpu", "int8", fmt)
    q = load_verified(bundle).quantization
    assert q.gate.cosine_min > 0.9 and q.gate.sentences > 5
    assert fmt is None or q.format == fmt


def test_blockwise_offsets_are_exact_on_min_max_grids():
    """A Q4_1-style block (16 evenly spaced levels from its min) comes back exactly."""
    from quantize.blockwise import quantize_offset, quantize_symmetric
    from quantize.cpu import pack_nbits

    rng = np.random.default_rng(0)
    lo = rng.normal(size=(2, 1, 6)).astype(np.float32)
    step = rng.uniform(0.01, 0.1, size=(2, 1, 6)).astype(np.float32)
    codes = rng.integers(0, 16, size=(2, 32, 6))
    codes[:, 0], codes[:, 1] = 0, 15  # each block spans its whole range
    w = (lo + step * codes).reshape(64, 6)
    bw = quantize_offset(w, 4, 32)
    np.testing.assert_allclose(bw.dequantize(), w, atol=1e-5)
    sym = quantize_symmetric(w, 4, 32)
    assert (sym.scales > 0).all() and sym.offsets is None
    assert pack_nbits(bw).shape == (6, 2, 16)  # [N, k_blocks, 32 * 4 / 8]


# --- Jetson (TensorRT Q/DQ) ----------------------------------------------------------------
def test_jetson_fp16_structure_and_numerics(q_bundle, q_fp32_bundle):  # noqa: F811
    bundle = q_bundle("llama", JETSON, "fp16")
    m = graph(bundle)
    io = {v.name: v.type.tensor_type.elem_type for v in [*m.graph.input, *m.graph.output]}
    assert io["input_ids"] == io["position_ids"] == TensorProto.INT64
    assert io["logits"] == TensorProto.FLOAT
    assert io["past_key.0"] == io["new_key.0"] == TensorProto.FLOAT16
    assert all(t.data_type != TensorProto.FLOAT or np.prod(t.dims) <= 1 for t in m.graph.initializer)
    # the RMSNorm statistics stay fp32: every Pow reads a Cast-to-fp32 output
    made = {o: n for n in m.graph.node for o in n.output}
    for p in nodes(m, "Pow"):
        assert made[p.input[0]].op_type == "Cast" and attr(made[p.input[0]], "to") == TensorProto.FLOAT
    assert opset(m) == 17
    manifest = load_verified(bundle)
    assert manifest.contract.kv_dtype == "float16"
    io = manifest.decoder_contract()
    assert {s.dtype for s in io.inputs if s.name.startswith("past_")} == {"float16"}
    cos, top1 = agreement(logits(q_fp32_bundle("llama", JETSON), IDS), logits(bundle, IDS))
    assert cos > 0.999 and top1 > 0.9


def test_jetson_int8_qdq_structure_and_numerics(q_bundle, q_fp32_bundle):  # noqa: F811
    bundle = q_bundle("llama", JETSON, "int8")
    m = graph(bundle)
    t = inits(m)
    q, dq = nodes(m, "QuantizeLinear"), nodes(m, "DequantizeLinear")
    assert q and dq and opset(m) == 19
    for n in q + dq:  # symmetric: every zero point is an int8 zero
        zp = numpy_helper.to_array(t[n.input[2]])
        assert t[n.input[2]].data_type == TensorProto.INT8 and not zp.any()
        assert (numpy_helper.to_array(t[n.input[1]]) > 0).all()
    weights = [n for n in dq if n.input[0] in t]
    acts = [n for n in dq if n.input[0] not in t]
    for n in weights:  # per output channel: scale [N] on axis 1 of a [K, N] int8 weight
        w = t[n.input[0]]
        assert w.data_type == TensorProto.INT8 and attr(n, "axis") == 1
        assert list(t[n.input[1]].dims) == [w.dims[1]]
    assert all(len(t[n.input[1]].dims) == 0 for n in acts + q)  # per-tensor activations
    assert len(weights) == 2 * 7  # every linear layer; the tied LM head stays fp16
    details = load_verified(bundle).quantization.details
    assert details["smoothquant"]["smoothed_tensors"] > 0
    cos, _ = agreement(logits(q_fp32_bundle("llama", JETSON), IDS), logits(bundle, IDS))
    assert cos > 0.95


def test_jetson_int4_block_structure_and_numerics(q_bundle, q_fp32_bundle):  # noqa: F811
    bundle = q_bundle("llama", JETSON, "int4")
    m = graph(bundle)
    t = inits(m)
    dq = nodes(m, "DequantizeLinear")
    assert dq and opset(m) == 21 and not nodes(m, "QuantizeLinear")  # weight-only
    for n in dq:
        w = t[n.input[0]]
        assert w.data_type == TensorProto.INT4 and len(w.dims) == 2  # 2-D constant weights
        assert attr(n, "block_size") == 32 and attr(n, "axis") == 0
        assert len(n.input) == 2 or not numpy_helper.to_array(t[n.input[2]]).any()  # zero point 0
        K, N = w.dims
        assert list(t[n.input[1]].dims) == [K // 32, N]
        assert (numpy_helper.to_array(t[n.input[1]]) > 0).all()
    cos, _ = agreement(logits(q_fp32_bundle("llama", JETSON), IDS), logits(bundle, IDS))
    assert cos > 0.9


@pytest.mark.parametrize("offsets", [False, True])
def test_jetson_int4_weight_that_is_not_whole_blocks_is_int8_and_parses(offsets):
    """K = 200 (an intermediate of 200) is 6.25 blocks of 32: the INT4 block DQ written for it
    was refused by TensorRT's parser rules (block_axes), so int4 failed on such a model after the
    gate had run; it is INT8 per-channel weight-only instead, named in the details."""
    from onnx import helper

    from convert.trt_check import check_model, load_rules
    from quantize.trt_qdq import int4_weight_only

    rng = np.random.default_rng(6)
    ws = {"W1": rng.standard_normal((64, 200)).astype(np.float32) * 0.05,  # K 64: INT4
          "W2": rng.standard_normal((200, 64)).astype(np.float32) * 0.05}  # K 200: INT8
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["h"], name="up"),
                           helper.make_node("MatMul", ["h", "W2"], ["y"], name="down")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                          [numpy_helper.from_array(w, k) for k, w in ws.items()])
    r = int4_weight_only(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                         offsets=offsets, fp16=False)
    assert check_model(r.model, load_rules("10.3")) == []
    dq = {n.input[0]: n for n in nodes(r.model, "DequantizeLinear")}
    types = {k: inits(r.model)[k].data_type for k in dq}
    assert sorted(types.values()) == sorted([TensorProto.INT4, TensorProto.INT8])
    assert r.details["int8_not_whole_blocks"] == ["W2"] and r.details["int8_weights"] == 1
    assert r.details["offset_terms"] == (1 if offsets else 0)  # only W1 takes the offset term


def test_thor_fp8_structure_and_numerics(q_bundle, q_fp32_bundle):  # noqa: F811
    bundle = q_bundle("llama", THOR, "fp8")
    m = graph(bundle)
    t = inits(m)
    weights = [n for n in nodes(m, "DequantizeLinear") if n.input[0] in t]
    assert weights and all(t[n.input[0]].data_type == TensorProto.FLOAT8E4M3FN for n in weights)
    assert opset(m) == 19
    cos, _ = agreement(logits(q_fp32_bundle("llama", THOR), IDS), logits(bundle, IDS))
    assert cos > 0.95


# --- precision and input errors ------------------------------------------------------------
@pytest.mark.parametrize("target", ["cpu", "jetson-orin-nano-8gb"])
def test_fp8_refused_where_the_target_cannot_run_it(q_fp32_bundle, tmp_path, target):  # noqa: F811
    from quantize import quantize_bundle

    with pytest.raises(ToolkitError, match="cannot run fp8"):
        quantize_bundle(q_fp32_bundle("llama", target), "fp8", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_fp16_refused_on_cpu(q_fp32_bundle, tmp_path):  # noqa: F811
    from quantize import quantize_bundle

    with pytest.raises(ToolkitError, match="cannot run fp16"):
        quantize_bundle(q_fp32_bundle("llama", "cpu"), "fp16", out=tmp_path / "x")


@pytest.mark.parametrize("content,match", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"  \n\t\n", "is empty"),
    ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade".encode("latin-1"), "not UTF-8"),
])
def test_calibration_file_errors(q_fp32_bundle, tmp_path, content, match):  # noqa: F811
    from quantize import quantize_bundle

    path = tmp_path / "cal.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ToolkitError, match=match) as e:
        quantize_bundle(q_fp32_bundle("llama", JETSON), "int8", calibration=path, out=tmp_path / "o")
    assert e.value.hint  # says what to do
    assert not (tmp_path / "o").exists()


def test_calibration_windows_from_a_user_file(q_fp32_bundle, tmp_path):  # noqa: F811
    from device.runtime.tokenizer import BundleTokenizer
    from quantize.calibration import read_text, token_windows

    bundle = q_fp32_bundle("llama", "cpu")
    m = load_verified(bundle)
    tok = BundleTokenizer(bundle / "tokenizer", m.tokenizer)
    path = tmp_path / "cal.txt"
    path.write_text("the capital of france is paris and the water is blue " * 30, encoding="utf-8")
    cal = token_windows(read_text(path), tok, samples=5, seq_len=16)
    assert len(cal.windows) == 5 and {len(w) for w in cal.windows} == {16}
    assert cal.to_json()["source"] == str(path)


def test_encoder_calibration_windows_stop_at_its_position_limit(q_fp32_bundle, tmp_path):  # noqa: F811
    """--seq-len past the encoder's learned positions (128 here) was an ONNX Runtime broadcast
    traceback in calibration; the windows are capped at the position table instead."""
    from quantize import quantize_bundle

    path = tmp_path / "cal.txt"
    path.write_text("the capital of france is paris and the water is blue " * 60, encoding="utf-8")
    r = quantize_bundle(q_fp32_bundle("bert", JETSON), "int8", calibration=path, samples=2, seq_len=300,
                        out=tmp_path / "o", thresholds=LOOSE)
    assert r.manifest.quantization.calibration["seq_len"] == 128


def test_quantizing_a_quantized_bundle_is_refused(q_bundle, tmp_path):  # noqa: F811
    from quantize import quantize_bundle

    with pytest.raises(ToolkitError, match="already int4"):
        quantize_bundle(q_bundle("llama", "cpu", "int4"), "int8", out=tmp_path / "x")


# --- the gate through the CLI --------------------------------------------------------------
def test_gate_failure_exits_non_zero_and_writes_nothing(q_fp32_bundle, tmp_path):  # noqa: F811
    from toolkit.cli import main

    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["quantize", str(q_fp32_bundle("llama", "cpu")), "-p", "int4",
                                       "-o", str(out), "--min-top1", "1"])
    assert result.exit_code != 0
    assert "failed the accuracy gate" in result.output and "top-1" in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no staging left


def test_encoder_gate_fails_a_graph_whose_embeddings_are_nan(q_fp32_bundle, tmp_path):  # noqa: F811
    """A quantized encoder whose output is NaN (fp16 overflow, say) gave cosine NaN, and
    `NaN < min_cosine` is False: the gate passed it."""
    from quantize.gate import encoder_gate, thresholds_for

    bundle = q_fp32_bundle("bert", "cpu")
    m = load_verified(bundle)
    model = graph(bundle)
    out = model.graph.output[0]  # last_hidden_state [B, T, H] -> itself x NaN
    model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan_c"))
    for n in model.graph.node:
        n.output[:] = [f"{o}_pre" if o == out.name else o for o in n.output]
    model.graph.node.append(onnx.helper.make_node("Mul", [f"{out.name}_pre", "nan_c"], [out.name]))
    broken = tmp_path / "nan.onnx"
    onnx.save(model, str(broken))
    from device.runtime.tokenizer import BundleTokenizer
    tok = BundleTokenizer(bundle / m.tokenizer.path, m.tokenizer)
    r = encoder_gate(bundle / m.model_file, broken, tok, m.pooling, thresholds_for("int8"))
    assert not r.passed and "cosine" in r.failures[0]


def test_gate_failure_with_force_records_it(q_fp32_bundle, tmp_path):  # noqa: F811
    from toolkit.cli import main

    out = tmp_path / "forced"
    result = CliRunner().invoke(main, ["quantize", str(q_fp32_bundle("llama", "cpu")), "-p", "int4",
                                       "-o", str(out), "--min-top1", "1", "--force"])
    assert result.exit_code == 0, result.output
    q = load_verified(out).quantization
    assert q.gate.passed is False and q.forced is True
    assert any("top-1" in f for f in q.gate.failures)
    # int4: the first step of the ladder failed, so the others were tried (and failed too): its
    # grid with the most sensitive 1/8, 1/4, 1/2 of the weight units at 8 bits, then the others
    mixed = [("zero-point", 64, f, False) for f in (0.0, 0.125, 0.25, 0.5)]
    assert [(t["grid"], t["block_size"], t["int8_fraction"], t["passed"])
            for t in q.grid_choice["tried"]] == [*mixed, ("symmetric", 32, 0.0, False),
                                                 ("zero-point", 32, 0.0, False),
                                                 ("offsets", 32, 0.0, False)]
    assert [t["int8_units"] for t in q.grid_choice["tried"]] == [0, 1, 2, 4, 0, 0, 0]  # of 8
    assert q.grid_choice["ladder"] == [*[list(t[:3]) for t in mixed], ["symmetric", 32, 0.0],
                                       ["zero-point", 32, 0.0], ["offsets", 32, 0.0]]
    assert "int4 grid tried: zero-point in blocks of 64" in (out / "report.md").read_text()
    # the exact grid kept has no ranking of its own: the last one measured is kept, that of the
    # mixed steps (zero-point/64); the grids with no mixed step are never ranked
    assert "sensitivity" not in q.details
    assert (q.grid_choice["sensitivity"]["grid"], q.grid_choice["sensitivity"]["block_size"]) == (
        "zero-point", 64)
    assert "sensitivity on the zero-point grid in blocks of 64" in (out / "report.md").read_text()
    assert "FAILED (written with --force)" in (out / "report.md").read_text()


def test_cli_default_output_is_a_sibling(q_fp32_bundle, tmp_path):  # noqa: F811
    from quantize.pipeline import default_output

    assert default_output(Path("b/smollm2-135m-cpu-fp32"), "int4").name == "smollm2-135m-cpu-int4"
    assert default_output(Path("b/dev"), "int8").name == "dev-int8"


def test_int4_grid_the_format_lacks_is_a_clear_error(q_fp32_bundle, tmp_path):  # noqa: F811
    from toolkit.cli import main

    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["quantize", str(q_fp32_bundle("llama", JETSON)), "-p", "int4",
                                       "--int4-grid", "zero-point", "-o", str(out)])
    assert result.exit_code != 0 and "no 'zero-point' int4 grid" in result.output
    assert "Traceback" not in result.output and not out.exists()


# --- AWQ (quantize/awq.py) -----------------------------------------------------------------


def _prefill_logits(model: onnx.ModelProto, ids: list[int], work: Path) -> np.ndarray:
    from quantize import activations

    feed = next(activations.decoder_feeds(model, [ids]))
    return next(activations._run(model, ["logits"], [feed], work, 1))[0]


def test_awq_rescales_where_it_helps_and_folds_exactly(q_fp32_bundle, tmp_path):  # noqa: F811
    """AWQ changes no fp32 output (1/s lands in the norms' gamma and up_proj's columns), rescales
    the inputs with outlier channels, and its rounding error on the calibration rows is below
    plain rounding's."""
    from quantize import activations
    from quantize import graph as g
    from quantize.awq import awq, awq_inputs
    from quantize.blockwise import quantize_zero_point
    from quantize.cpu import tied_tables

    bundle = q_fp32_bundle("llama", "cpu")
    model = g.load_model(bundle / load_verified(bundle).model_file)
    # a few outlier channels, as trained LLMs have: scale some entries of every norm's gamma
    for t in model.graph.initializer:
        if t.name.endswith("layernorm.weight"):
            v = numpy_helper.to_array(t).copy()
            v[[3, 17, 40]] *= 20.0
            t.CopyFrom(numpy_helper.from_array(v, t.name))
    rng = np.random.default_rng(1)
    windows = [rng.integers(3, 100, 24).tolist() for _ in range(6)]
    before = _prefill_logits(model, windows[0], tmp_path)
    exclude = tied_tables(model.graph)
    tensors = awq_inputs(model)
    rows = activations.collect_rows(model, tensors, activations.decoder_feeds(model, windows),
                                    tmp_path, 64, samples=len(windows), threads=1)
    assert all(len(r.sample) == 6 * 11 for r in rows.values())  # ceil(64 / 6) rows per window
    stats = awq(model, rows, lambda w, h: quantize_zero_point(w, 4, 32, importance=h).dequantize(),
                exclude)
    after = _prefill_logits(model, windows[0], tmp_path)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4)
    # searched: q/k/v, gate/up (norm gamma) and down (up_proj columns) per layer; skipped: o_proj
    # (its producer is the attention op, which cannot take 1/s) and the tied LM head
    assert stats.scaled + stats.plain == 2 * 3 and stats.skipped == 2 + 1
    assert stats.scaled >= 2 and stats.error_ratio < 1.0
    # every weight gets rounding weights, o_proj's and the head's too (they need no fold)
    assert set(stats.importance) == {m.weight for m in g.weight_matmuls(model.graph)}


def test_a_packed_gate_up_takes_the_down_proj_fold_in_its_up_columns(tiny_bundle, tmp_path):
    """Phi-3's gate and up are one matrix, split in two: 1/s of the down_proj input goes into
    the up half's columns (AWQ and SmoothQuant used to leave that input unscaled), and the
    fp32 outputs do not move."""
    from quantize import graph as g
    from quantize.smooth import divide, fold_target

    bundle = tiny_bundle("phi3", "cpu")
    model = g.load_model(bundle / load_verified(bundle).model_file)
    graph_ = model.graph
    inits, cons = g.initializers(graph_), g.consumers(graph_)
    mms = g.weight_matmuls(graph_)
    downs = [m for m in mms if "/mlp/" in m.node.name and m.node.name.endswith("down_proj/MatMul")]
    assert downs
    ids = list(range(3, 27))
    before = _prefill_logits(model, ids, tmp_path)
    rng = np.random.default_rng(0)
    for down in downs:
        fold = fold_target(graph_, down.node.input[0], inits, cons, {m.node.output[0] for m in mms})
        assert fold is not None and fold.kind == "columns"
        packed = numpy_helper.to_array(inits[fold.names[0]])
        assert (fold.lo, fold.hi) == (down.K, 2 * down.K) == (packed.shape[1] // 2, packed.shape[1])
        s = rng.uniform(0.5, 2.0, down.K).astype(np.float32)
        divide(inits, fold, s)
        w = numpy_helper.to_array(inits[down.weight])
        inits[down.weight].CopyFrom(numpy_helper.from_array(w * s[:, None], down.weight))
        gate = numpy_helper.to_array(inits[fold.names[0]])[:, :fold.lo]
        np.testing.assert_array_equal(gate, packed[:, :fold.lo])  # the gate half is untouched
    np.testing.assert_allclose(_prefill_logits(model, ids, tmp_path), before, rtol=1e-4, atol=1e-4)


def test_awq_bundles_cpu_and_jetson(q_fp32_bundle, tmp_path):  # noqa: F811
    from quantize import quantize_bundle
    from quantize.formats import QuantOptions

    for target, grid in (("cpu", "zero-point"), (JETSON, "symmetric")):
        out = tmp_path / target
        quantize_bundle(q_fp32_bundle("llama", target), "int4", out=out, thresholds=LOOSE,
                        samples=4, seq_len=32, options=QuantOptions(int4_grid=grid, awq=True))
        q = load_verified(out).quantization
        awq = q.details["awq"]
        assert awq["grid"] == q.details["grid"] == grid
        assert awq["scaled_inputs"] + awq["plain_inputs"] == 6
        assert q.calibration["samples"] == 4 and q.gate.passed
        m = graph(out)
        assert not [n for n in m.graph.node if "offset" in n.name or "block_sums" in n.name]
        if target == "cpu":  # B, scales, zero points
            assert all(len(n.input) == 4 for n in nodes(m, "MatMulNBits") if attr(n, "bits") == 4)
    cos, _ = agreement(logits(q_fp32_bundle("llama", "cpu"), IDS), logits(tmp_path / "cpu", IDS))
    assert cos > 0.9


@pytest.mark.parametrize("args,match", [
    (["-p", "int8", "--awq"], "--awq/--no-awq applies to int4 weights, not int8"),
    (["-p", "int4", "--awq", "--int4-grid", "offsets"], "AWQ applies to the plain int4 grids"),
])
def test_awq_where_it_does_not_apply_is_a_clear_error(q_fp32_bundle, tmp_path, args, match):  # noqa: F811
    from toolkit.cli import main

    out = tmp_path / "never"
    result = CliRunner().invoke(main, ["quantize", str(q_fp32_bundle("llama", "cpu")), *args,
                                       "-o", str(out)])
    assert result.exit_code != 0 and match in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_no_awq_flag_rounds_plainly(q_fp32_bundle, tmp_path):  # noqa: F811
    from toolkit.cli import main

    out = tmp_path / "plain"
    result = CliRunner().invoke(main, ["quantize", str(q_fp32_bundle("llama", "cpu")), "-p", "int4",
                                       "--int4-grid", "symmetric", "--no-awq", "--samples", "2",
                                       "--max-ppl-increase", "1000", "--min-top1", "0",
                                       "--min-greedy", "0", "-o", str(out)])
    assert result.exit_code == 0, result.output
    q = load_verified(out).quantization
    assert "awq" not in q.details and q.details["grid"] == "symmetric"


def test_importance_weighted_rounding_favours_the_rows_that_matter():
    """With row weights, the grid rounds for the weighted error: never worse on it than the
    unweighted choice (symmetric: same candidates, weighted pick), and better overall."""
    from quantize.blockwise import quantize_symmetric, quantize_zero_point

    rng = np.random.default_rng(3)
    w = rng.normal(size=(256, 48)).astype(np.float32)
    h = np.where(rng.random(256) < 0.1, 50.0, 1.0)  # a few rows meet large activations

    def werr(q):
        return ((q.dequantize() - w) ** 2 * h[:, None]).sum(0)  # per column

    plain, weighted = quantize_symmetric(w, 4, 32), quantize_symmetric(w, 4, 32, importance=h)
    assert (werr(weighted) <= werr(plain) + 1e-9).all() and werr(weighted).sum() < werr(plain).sum()
    zp_plain, zp_weighted = quantize_zero_point(w, 4, 32), quantize_zero_point(w, 4, 32, importance=h)
    assert werr(zp_weighted).sum() < 0.95 * werr(zp_plain).sum()


def test_convert_with_precision_in_one_go(tmp_path):
    """`toolkit convert --precision`: the fp32 reference lives in a temporary folder beside the
    output and is gone afterwards, whether the gate passes (int8) or fails (int4 on random
    weights: nothing written, non-zero exit)."""
    from quantize_fixtures import LLAMA
    from tiny_models import make_decoder

    from toolkit.cli import main

    hf = make_decoder(tmp_path / "hf", "llama", **LLAMA)
    out = tmp_path / "out"
    ok = CliRunner().invoke(main, ["convert", str(hf), "--target", "cpu", "--precision", "int8",
                                   "--max-seq", "64", "-o", str(out / "int8")])
    assert ok.exit_code == 0, ok.output
    assert "fp32 reference (deleted after quantizing)" in ok.output and "gate       passed" in ok.output
    assert load_verified(out / "int8").precision == "int8"
    bad = CliRunner().invoke(main, ["convert", str(hf), "--target", "cpu", "--precision", "int4",
                                    "--max-seq", "64", "-o", str(out / "int4")])
    assert bad.exit_code != 0 and "failed the accuracy gate" in bad.output
    assert "Traceback" not in bad.output
    assert sorted(p.name for p in out.iterdir()) == ["int8"]  # no int4, no temporary fp32 left


def test_head_block_falls_back_where_it_does_not_divide_the_width():
    from quantize.cpu import NBitsConfig, _head_block

    plain = NBitsConfig(grid="symmetric")
    assert _head_block(plain, 576) == 64 and _head_block(plain, 96) == 32
    assert _head_block(NBitsConfig(grid="symmetric", head_block=0), 576) == 32
    assert _head_block(NBitsConfig(grid="offsets"), 576) == 32  # the exact grid keeps Q8_0's 32s


def test_a_refusal_never_prints_figures_that_read_like_a_pass() -> None:
    """'perplexity rose 0.23 % (limit 0.2 %)' and 'falls to 1.00000 (minimum 0.999998)': the
    figure and the limit were rounded until a refusal read like a pass."""
    from quantize.gate import GateResult, Thresholds, _judge_decoder

    r = GateResult("decoder", Thresholds(0.0022, 0.953, 0.5, 0.9), "held-out", "cpu",
                   ppl_fp32=100.0, ppl_quant=100.23, ppl_increase=0.0023, top1=0.95292)
    _judge_decoder(r)
    assert r.failures[0] == "perplexity rose 0.23 % (limit 0.22 %)", r.failures
    assert r.failures[1] == "top-1 agreement 0.9529 is below 0.953", r.failures
