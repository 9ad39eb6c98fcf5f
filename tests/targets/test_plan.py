"""`toolkit plan`: the fit arithmetic on known configs, the searches, the errors, the CLI.

No weights anywhere: configs are built with transformers' config classes or written as JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import LlamaConfig

from bundle.errors import ToolkitError
from models.dims import ModelDims, dims_from_config
from models.registry import get_spec
from targets import GIB, load_target
from targets.plan import (
    SEQ_STEP,
    components,
    matmul_params,
    plan_fit,
    plan_from_model,
    weight_bytes,
)

NANO = "jetson-orin-nano-8gb"

LLAMA3_8B = dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                 tie_word_embeddings=False, model_type="llama")
SMOLLM2_135M = dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                    vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, model_type="llama")


def dims_of(fields: dict) -> ModelDims:
    cfg = LlamaConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    return dims_from_config(get_spec("llama"), cfg)


def write_config(folder: Path, fields: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(fields), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def llama3() -> ModelDims:
    return dims_of(LLAMA3_8B)


@pytest.fixture(scope="module")
def smollm2() -> ModelDims:
    return dims_of(SMOLLM2_135M)


# --- arithmetic ----------------------------------------------------------------------------
def test_llama3_8b_int4_weights_by_hand(llama3):
    # per layer: attention 4096*128*(2*32 + 2*8) = 41,943,040; MLP 3*4096*14336 = 176,160,768
    # 32 layers = 6,979,321,856; + LM head 128256*4096 = 525,336,576 -> 7,504,658,432 matmul
    # params (+ the 525,336,576 input table = 8,029,995,008, the "8B").
    assert matmul_params(llama3) == 7_504_658_432
    assert llama3.params == 8_029_995_008
    w = weight_bytes(llama3, load_target(NANO), "int4")
    # int4 block-32 with fp16 scales: 0.5 + 2/32 = 0.5625 B/param -> 4,221,370,368 B;
    # the Gather table stays fp16: 525,336,576 * 2 = 1,050,673,152 B.
    assert w.bytes_per_param == 0.5625
    assert w.matmul_bytes == 4_221_370_368
    assert w.embedding_bytes == 1_050_673_152
    assert w.total == 5_272_043_520  # 5.27 GB = 4.91 GiB
    assert 4.5 * GIB < w.total < 5.0 * GIB


def test_llama3_8b_int4_on_orin_nano_8gb(llama3):
    """Verdict: does NOT fit at the default max_seq 2048 with whole-prompt prefill, fits with a
    shorter context or a chunked prefill.

    Fixed part, by hand: weights 5,272,043,520 + KV 2*32*8*128*2 B = 131,072 B/position * 2048
    = 268,435,456 + runtime 1 GiB (1,073,741,824) + OS reserve 1.6 GiB (1,717,986,918)
    = 8,332,207,718 B, leaving 257,726,874 B (246 MiB) of the 8 GiB for activations. A
    2048-token prefill's new K/V for every layer alone are 2*32*8*2048*128*2 = 268,435,456 B: no.
    (Logits are only [1, V] per prefill: the contract's logits_index asks for the last position.)
    """
    nano = load_target(NANO)
    r = plan_fit(llama3, nano, "int4", 2048, 1)
    c = r.chosen.components
    assert (c.weights, c.kv_cache, c.runtime, c.os_reserve) == (
        5_272_043_520, 268_435_456, 1_073_741_824, 1_717_986_918)
    assert c.activations > 268_435_456
    assert not r.fits and r.memory_total == 8 * GIB
    assert r.max_seq_fit == 768 and r.chunk_fit is not None and r.chunk_fit < 2048
    text = r.explain()
    assert text.startswith("does not fit at int4 with max_seq 2048")
    assert "max_seq <= 768" in text and f"--prefill-chunk {r.chunk_fit}" in text
    # Chunked prefill (256 tokens) at a 1024-token context fits; speed is memory-bound:
    # 68e9 / (4,221,370,368 + 4096*2 + 1024*131,072) ~ 15.6 tokens/s.
    ok = plan_fit(llama3, nano, "int4", 1024, 1, prefill_chunk=256)
    assert ok.fits and ok.chosen.speed.decode_bound == "memory"
    assert ok.chosen.speed.decode_tokens_s == pytest.approx(
        68e9 / (4_221_370_368 + 4096 * 2 + 1024 * 131_072))
    assert ok.explain().startswith("fits at int4 with max_seq 1024")


def test_llama3_8b_fp16_does_not_fit_the_nano(llama3):
    r = plan_fit(llama3, load_target(NANO), "fp16", 8192, 1)
    # fp16 weights alone: 8,029,995,008 * 2 B = 14.96 GiB > 8 GiB, at any context.
    assert r.chosen.weights.total == 2 * 8_029_995_008
    assert not r.fits and r.max_seq_fit is None and r.best_precision is None
    assert r.fallback == ("int4", 768)
    assert "does not fit at fp16 with max_seq 8192" in r.explain()
    assert "use int4 with max_seq <= 768" in r.explain()
    # On a 64 GB AGX Orin it fits, and precision None picks the most accurate that does.
    agx = plan_fit(llama3, load_target("jetson-agx-orin-64gb"), None, 4096, 1, prefill_chunk=512)
    assert agx.fits and agx.precision == agx.best_precision == "fp32"


def test_largest_context_and_batch_are_the_boundary(llama3):
    target = load_target("jetson-orin-nx-16gb")
    # memory chosen so the boundary lands mid-range (weights + runtime + reserve: int8 10.97 GiB,
    # int4 7.91 GiB; the fp16 cache grows 0.125 GiB per 1024 positions)
    for precision, memory_gib in (("int8", 11.5), ("int4", 8.5)):
        r = plan_fit(llama3, target, precision, 1024, 1, prefill_chunk=256,
                     memory_bytes=int(memory_gib * GIB))
        seq = r.max_seq_fit
        assert seq is not None and seq % SEQ_STEP == 0 and seq < llama3.max_positions

        def total(s: int, b: int = 1, p: str = precision) -> int:
            return components(llama3, target, p, s, b, 256).total

        assert total(seq) <= r.memory_total < total(seq + SEQ_STEP)
        b = r.batch_fit
        assert b is not None and total(1024, b) <= r.memory_total < total(1024, b + 1)
    # The search stops at the model's own limit.
    roomy = plan_fit(llama3, load_target("jetson-thor"), "fp16", 2048, 1, prefill_chunk=256)
    assert roomy.max_seq_fit == llama3.max_positions == 8192


def test_smollm2_135m_on_cpu_fits(smollm2):
    # 30 * (576*64*(18+6) + 3*576*1536) + 49152*576 (tied: one matrix) = 134,479,872 params
    assert smollm2.params == matmul_params(smollm2) == 134_479_872
    cpu = load_target("cpu")
    r = plan_fit(smollm2, cpu, None, 2048, 1)
    assert r.fits and r.precision == "fp32" and r.memory_source == "host MemTotal"
    rows = {row.precision: row for row in r.rows}
    # fp32: 538 MB, one tensor for the Gather and the tied head (static-kv-cost.md: 538 MB/token)
    assert rows["fp32"].weights.total == 134_479_872 * 4
    # int4 as quantize/ writes it for cpu (MatMulNBits, block 32): 0.5 B of weights + 4/32 B of
    # fp32 scale + 4/32 B of fp32 per-block offset = 0.75 B/param for the 106,168,320 layer
    # params; the tied head/embedding is ONE shared 8-bit copy (1.125 B/param, 28,311,552
    # params) read by both MatMulNBits and GatherBlockQuantized, so no float Gather table
    assert rows["int4"].weights.matmul_bytes == 106_168_320 * 0.75 + 28_311_552 * 1.125
    assert rows["int4"].weights.embedding_bytes == 0
    # int8: 1 B of weights + 4/32 B of scale + 1/32 B of uint8 zero point = 1.15625 B/param for
    # the layers; the shared head keeps symmetric codes, no zero points (1.125 B/param)
    assert rows["int8"].weights.matmul_bytes == 106_168_320 * 1.15625 + 28_311_552 * 1.125
    # KV: 30 layers * 2 * 3 heads * 64 * 4 B = 46,080 B per position (the note's 46 kB)
    assert rows["fp32"].components.kv_cache == 46_080 * 2048
    # decode at fp32: 30 GB/s over weights + the whole 2048-position cache ~ 47 tokens/s
    per_step = 134_479_872 * 4 + 576 * 4 + 46_080 * 2048
    assert rows["fp32"].speed.decode_tokens_s == pytest.approx(30e9 / per_step)
    assert rows["int4"].speed.decode_tokens_s > rows["fp32"].speed.decode_tokens_s
    # Deterministic on any host: 4 GiB of memory still fits it.
    small = plan_fit(smollm2, cpu, "int4", 2048, 1, memory_bytes=4 * GIB)
    assert small.fits and small.memory_source == "target"
    b = small.batch_fit  # slots: each adds 94 MB of cache and its share of the activations
    assert b is not None and 1 < b < 1024

    def total(batch: int) -> int:
        return components(smollm2, cpu, "int4", 2048, batch, None).total

    assert total(b) <= 4 * GIB < total(b + 1)


def test_tied_head_stays_fp16_on_tensorrt(smollm2):
    """quantize/trt_qdq.py keeps a tied LM head fp16 at int8, int4 and fp8: the one fp16 table
    serves the Gather and the head. The plan counted the head a second time, quantized, and had
    each decode step read that small copy instead of the fp16 table (SmolLM2 int4 on the Nano:
    132.3 MB and 553.6 tokens/s where the bundle holds 116.3 MB and reads it at 415.8)."""
    nano = load_target(NANO)
    head = 49_152 * 576  # 28,311,552 params, fp16 either way
    layers = 106_168_320
    for precision, bpp in (("int4", 0.5 + 2 / 32), ("int8", 1 + 2 / 576)):
        w = weight_bytes(smollm2, nano, precision)
        assert w.total == pytest.approx(layers * bpp + head * 2, abs=1), precision
        assert w.embedding_bytes == 0
        assert w.read_per_token == pytest.approx(layers * bpp + head * 2 + 576 * 2, abs=1)
    row = plan_fit(smollm2, nano, "int4", 2048, 1).chosen
    assert row.components.weights == 116_342_784
    step = 116_342_784 + 576 * 2 + 30 * 2 * 3 * 64 * 2 * 2048
    assert row.speed.decode_tokens_s == pytest.approx(68e9 / step)  # ~415.8, not 553.6
    fp8 = weight_bytes(smollm2, load_target("jetson-thor"), "fp8")
    assert fp8.total == layers * 1 + head * 2  # per-tensor scales: ~0 bytes


def test_untied_head_and_table_are_8_bit_on_cpu(llama3):
    """quantize/cpu.py keeps an untied LM head at head_bits (8, symmetric) and quantizes the
    untied Gather table to 8 bits too (GatherBlockQuantized). The plan counted the head at the
    int4 layers' 0.75 B/param and the table as fp32 (Llama-3-8B int4: 7.73 GB for 6.42 GB)."""
    cpu = load_target("cpu")
    layers, table = 6_979_321_856, 525_336_576
    w = weight_bytes(llama3, cpu, "int4")
    assert w.matmul_bytes == math.ceil(layers * 0.75 + table * 1.125)
    assert w.embedding_bytes == math.ceil(table * 1.125)
    assert w.read_per_token == w.matmul_bytes + math.ceil(4096 * 1.125)
    w8 = weight_bytes(llama3, cpu, "int8")
    assert w8.matmul_bytes == math.ceil(layers * 1.15625 + table * 1.125)
    assert w8.embedding_bytes == math.ceil(table * 1.125)
    # a table under quantize/cpu.py's EMBEDDING_MIN (65,536 elements) stays fp32
    tiny = dims_of({**LLAMA3_8B, "vocab_size": 64, "hidden_size": 512, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "intermediate_size": 1024})
    assert weight_bytes(tiny, cpu, "int4").embedding_bytes == 64 * 512 * 4


def test_prefill_time_is_flops_over_peak(smollm2):
    cpu = load_target("cpu")
    row = plan_fit(smollm2, cpu, "fp32", 512, 1, prefill_chunk=512).chosen
    # one 512-token step: 2*params*512 + 4*L*H*D*512*(512+512), compute-bound at 0.15 TFLOPS
    flops = 2 * 134_479_872 * 512 + 4 * 30 * 9 * 64 * 512 * 1024
    assert row.speed.prefill_s == pytest.approx(flops / 0.15e12)


def test_fp8_is_thor_only(smollm2):
    thor = plan_fit(smollm2, load_target("jetson-thor"), "fp8", 2048, 1)
    assert thor.fits and thor.chosen.format == "qdq-fp8"
    with pytest.raises(ToolkitError, match="cannot run fp8"):
        plan_fit(smollm2, load_target(NANO), "fp8", 2048, 1)


def test_bad_numbers_are_errors(smollm2):
    cpu = load_target("cpu")
    with pytest.raises(ToolkitError, match="beyond the model's 8192 positions"):
        plan_fit(smollm2, cpu, None, 16384, 1)
    with pytest.raises(ToolkitError, match="batch must be at least 1"):
        plan_fit(smollm2, cpu, None, 2048, 0)


# --- from a model argument -----------------------------------------------------------------
def test_plan_from_a_config_only_folder(tmp_path):
    folder = write_config(tmp_path / "Meta-Llama-3-8B", LLAMA3_8B)
    r = plan_from_model(str(folder), NANO, "int4")
    assert r.model == "Meta-Llama-3-8B" and r.max_seq == 2048 and not r.fits
    assert plan_from_model(str(folder / "config.json"), NANO, "int4").max_seq_fit == 768


def test_plan_refuses_the_caches_convert_refuses(tmp_path):
    """Plan and convert read --max-seq through the same Target.max_seq_for: no plan is made for
    a cache convert would not build."""
    folder = write_config(tmp_path / "m", SMOLLM2_135M)
    for bad, why in ((4, "too small"), (0, "too small"), (-5, "too small"), (10**6, "beyond the model")):
        with pytest.raises(ToolkitError, match=why):
            plan_from_model(str(folder), "cpu", max_seq=bad)
    assert plan_from_model(str(folder), "cpu", max_seq=16).max_seq == 16


def test_unknown_target_error(tmp_path):
    folder = write_config(tmp_path / "m", SMOLLM2_135M)
    with pytest.raises(ToolkitError) as e:
        plan_from_model(str(folder), "raspberry-pi")
    assert "unknown target 'raspberry-pi'" in e.value.message and "jetson-thor" in e.value.message


def test_config_missing_fields_names_them(tmp_path):
    fields = {k: v for k, v in LLAMA3_8B.items() if k not in ("hidden_size", "vocab_size")}
    folder = write_config(tmp_path / "broken", fields)
    with pytest.raises(ToolkitError) as e:
        plan_from_model(str(folder), NANO)
    assert "'hidden_size'" in e.value.message and "'vocab_size'" in e.value.message
    # And a config without model_type says which architectures are supported.
    write_config(tmp_path / "anon", {"hidden_size": 8})
    with pytest.raises(ToolkitError, match="not supported; supported: "):
        plan_from_model(str(tmp_path / "anon"), "cpu")


def test_encoder_is_refused(tmp_path):
    bert = dict(model_type="bert", num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                intermediate_size=128, vocab_size=100, max_position_embeddings=64)
    with pytest.raises(ToolkitError, match="encoder"):
        plan_from_model(str(write_config(tmp_path / "b", bert)), "cpu")


# --- CLI -----------------------------------------------------------------------------------
def run(*args: str):
    from toolkit.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_plan_table_and_verdict(tmp_path):
    folder = write_config(tmp_path / "llama3", LLAMA3_8B)
    res = run("plan", str(folder), "--target", NANO)
    assert res.exit_code == 0, res.output
    out = res.output
    for column in ("weights", "KV cache", "activations", "runtime", "OS reserve", "total GiB"):
        assert column in out
    assert "int4 *" in out  # none fits at 2048: judged at the smallest, int4
    assert "DOES NOT FIT: does not fit at int4 with max_seq 2048" in out
    assert "max_seq <= 768" in out
    res = run("plan", str(folder), "-t", NANO, "--max-seq", "1024", "--prefill-chunk", "256")
    assert res.exit_code == 0 and "FITS: fits at int4 with max_seq 1024" in res.output


def test_cli_plan_json_and_check(tmp_path):
    folder = write_config(tmp_path / "llama3", LLAMA3_8B)
    res = run("plan", str(folder), "-t", NANO, "-p", "fp16", "--max-seq", "8192", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["fits"] is False and data["precision"] == "fp16"
    assert [row["precision"] for row in data["rows"]] == ["fp32", "fp16", "int8", "int4"]
    assert data["rows"][3]["components"]["weights"] == 5_272_043_520
    assert "use int4" in data["explanation"]
    assert run("plan", str(folder), "-t", NANO, "--check").exit_code == 2
    small = write_config(tmp_path / "smol", SMOLLM2_135M)
    assert run("plan", str(small), "-t", NANO, "--check").exit_code == 0


def test_cli_plan_errors(tmp_path):
    folder = write_config(tmp_path / "llama3", LLAMA3_8B)
    res = run("plan", str(folder), "-t", "nope")
    assert res.exit_code == 1 and "unknown target 'nope'" in res.output
    res = run("plan", str(folder), "-t", NANO, "-p", "fp8")
    assert res.exit_code == 1 and "cannot run fp8" in res.output
    broken = write_config(tmp_path / "broken",
                          {k: v for k, v in LLAMA3_8B.items() if k != "num_hidden_layers"})
    res = run("plan", str(broken), "-t", NANO)
    assert res.exit_code == 1 and "'num_hidden_layers'" in res.output


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_the_jetson_plan_counts_the_tensorrt_staging_rows(llama3, batch):
    """The TensorRT backend holds batch - 1 staging rows beside the cache (BufferPlan); the plan
    counted the cache alone, so a batch-4 plan said fits for 3 rows' worth of KV it did not have."""
    from device.runtime.trt_backend import BufferPlan

    nano = load_target(NANO)
    c = plan_fit(llama3, nano, "int4", 1024, batch).chosen.components
    layout = llama3.kv_layout(1024, nano.kv_dtype)
    buffers = BufferPlan(layout.num_layers, layout.kv_heads, 1024, layout.head_dim, batch,
                         llama3.vocab_size, max_tokens=1, kv_itemsize=2)
    assert c.kv_cache == buffers.kv_cache_bytes + buffers.staging_bytes == layout.bytes_for(2 * batch - 1)
    cpu = plan_fit(llama3, load_target("cpu"), "int4", 1024, batch).chosen.components
    assert cpu.kv_cache == llama3.kv_layout(1024, "float32").bytes_for(batch)  # ORT: no staging
