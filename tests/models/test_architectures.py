"""Every architecture family: a tiny random model of each converted for CPU and for a Jetson
target with parity passed, the records behind them, the README's table, and `toolkit plan`
on the real shapes of each family's smallest public model.
"""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import onnx
import pytest
from paths import REPO
from tiny_models import DECODER_CONFIGS, make_decoder

from bundle.errors import ToolkitError
from bundle.manifest import load_verified
from convert.pipeline import convert_model
from models.arch import DECODER
from models.dims import dims_from_config
from models.registry import REGISTRY, supported_markdown
from targets.plan import plan_from_model

ROOT = REPO
TARGETS = ["cpu", "jetson-orin-nano-8gb"]
WINDOW = 20  # tiny_models: shorter than parity's 33-token prompt plus 32 greedy tokens


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(DECODER_CONFIGS))
def test_family_converts_with_parity_on_both_targets(case, target, tiny_bundle):
    m = load_verified(tiny_bundle(case, target))
    p = m.parity
    assert p is not None and p.passed and p.max_abs_logits_diff < 2e-3
    assert p.greedy_match and p.greedy_tokens == 32
    checks = [c.name for c in p.checks]
    assert "logits prompt=33 (+3 decode)" in checks and "batched decode, 2 slots" in checks
    graph = onnx.load(str(tiny_bundle(case, target) / "model.onnx"), load_external_data=False)
    domains = {n.domain for n in graph.graph.node}
    if target == "cpu":  # the fused attention wherever its kernel takes the head size
        gqa = any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
        assert gqa == (m.dims.head_dim % 16 == 0)
    else:  # plain ONNX that TensorRT 10.3's parser reads (convert/trt_check.py, run by convert)
        assert domains <= {"", "ai.onnx"}, domains
        assert m.trt_check is not None and m.trt_check.passed and "10.3" in m.trt_check.tensorrt
    attention = m.architecture.attention or ""
    settings = DECODER_CONFIGS[case][1]
    if settings.get("sliding_window"):  # the prompt and the greedy run go past the window
        assert m.dims.sliding_window == WINDOW < 33
        assert f"sliding window {WINDOW}" in attention


def test_what_the_manifest_says_about_attention(tiny_bundle):
    """Where the fused operator could not express the family, the manifest says so."""
    phi4 = load_verified(tiny_bundle("phi4", "cpu")).architecture.attention or ""
    assert "partial RoPE (12 of 16 dims) applied in plain ops" in phi4
    gemma3 = load_verified(tiny_bundle("gemma3_text", "cpu")).architecture.attention or ""
    assert "local and global RoPE tables" in gemma3 and "1 of 2 layers" in gemma3
    gemma2 = load_verified(tiny_bundle("gemma2", "jetson-orin-nano-8gb")).architecture.attention
    assert "attention soft-cap 50 (Tanh)" in (gemma2 or "")
    smollm3 = load_verified(tiny_bundle("smollm3", "cpu")).architecture.attention or ""
    assert "no RoPE on layers 3" in smollm3


def test_every_registered_decoder_has_a_tiny_case():
    decoders = {s.model_type for s in REGISTRY.values() if s.task == DECODER}
    assert decoders == {model_type for model_type, _ in DECODER_CONFIGS.values()}


def test_readme_table_is_the_registry():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- architectures:begin -->\n(.*?)\n<!-- architectures:end -->", text, re.S)
    assert block is not None, "README.md lost its architectures block"
    assert block.group(1) == supported_markdown(), \
        "README's architecture table is stale: paste models.registry.supported_markdown()"


def test_an_option_no_record_covers_is_refused_before_any_work(tiny_dir, tmp_path):
    folder = tmp_path / "phi-qk"
    shutil.copytree(tiny_dir("phi"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["qk_layernorm"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"not read")  # refused before the weights
    with pytest.raises(ToolkitError, match="qk_layernorm=true is not supported"):
        convert_model(str(folder), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["llama", "mistral", "smollm3", "granite", "qwen2", "qwen3",
                                  "olmo2", "gemma", "gemma2", "gemma3_text"])
def test_partial_rotary_is_refused_where_transformers_rotates_whole_heads(case, tiny_dir, tmp_path):
    """transformers' own forward fails on these with partial_rotary_factor < 1 (RoPE tables
    narrower than the heads): refused by name before the weights are read, not a traceback
    from the parity run. phi, phi3 and stablelm take it (their tiny cases set it)."""
    folder = tmp_path / case
    shutil.copytree(tiny_dir(case), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["partial_rotary_factor"] = 0.5
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(ToolkitError, match=r"partial_rotary_factor=0\.5 is not supported"):
        convert_model(str(folder), out=tmp_path / "out")
    cfg["partial_rotary_factor"] = 1.0  # the neutral value is no partial rotary: still allowed
    spec = REGISTRY[cfg["model_type"]]
    dims_from_config(spec, SimpleNamespace(**cfg))


def test_longrope_default_max_seq_stays_where_the_tables_are_static(tiny_dir, tmp_path):
    """phi3's tiny case: 128 positions, longrope switching at 64; the CPU target's default
    max_seq (2048, capped by the model's 128) is capped again at 64."""
    r = convert_model(str(tiny_dir("phi3")), "cpu", tmp_path / "b")
    assert r.manifest.max_seq == 64


# --- legal but unusual configs: parity with transformers, or an up-front refusal ----------------
# name -> (tiny case, config overrides). Each converts for the CPU target with max_seq 64 and
# passes parity. gpt2's head_dim is 8 (static attention on CPU); n_embd 64 makes it 16 (the fused op).
UNUSUAL = {
    "gpt2 scale_attn_weights=false": ("gpt2", dict(scale_attn_weights=False)),
    "gpt2 scale_attn_by_inverse_layer_idx": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt2 scale_attn_by_inverse_layer_idx, fused attention": (
        "gpt2", dict(n_embd=64, scale_attn_by_inverse_layer_idx=True)),
    "gemma3_text attn_logit_softcapping set": ("gemma3_text", dict(attn_logit_softcapping=30.0)),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_config_converts_with_parity(name, tmp_path):
    case, overrides = UNUSUAL[name]
    folder = make_decoder(tmp_path / "hf", case, **overrides)
    p = convert_model(str(folder), "cpu", tmp_path / "b", max_seq=64).parity
    assert p.passed and p.max_abs_logits_diff < 2e-3 and p.greedy_match


# --- toolkit plan on real shapes -----------------------------------------------------------
# Each family's smallest public model, its config.json fields as published. The parameter
# count is worked by hand in the comment: per layer attention C*D*(2H + 2Hkv) + MLP m*C*I
# (m = 3 gated, 2 plain), times layers, plus the embedding (twice when untied).
REAL = {
    # 28 * (1024*128*48 + 3*1024*3072) = 28 * 15,728,640 = 440,401,920; + 151936*1024
    # = 155,582,464 (tied) -> 595,984,384 ("0.6B", 0.44B without embeddings)
    "Qwen3-0.6B": (dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                        intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960,
                        tie_word_embeddings=True), 595_984_384),
    # 26 * (1152*256*10 + 3*1152*6912) = 26 * 26,836,992 = 697,761,792; + 262144*1152
    # = 301,989,888 -> 999,751,680 ("1B")
    "gemma-3-1b": (dict(model_type="gemma3_text", hidden_size=1152, num_hidden_layers=26,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                        intermediate_size=6912, vocab_size=262144, max_position_embeddings=32768,
                        sliding_window=512, query_pre_attn_scalar=256), 999_751_680),
    # 26 * (2304*256*24 + 3*2304*9216) = 26 * 77,856,768 = 2,024,275,968; + 256000*2304
    # = 589,824,000 -> 2,614,099,968 ("2.6B")
    "gemma-2-2b": (dict(model_type="gemma2", hidden_size=2304, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        intermediate_size=9216, vocab_size=256000, max_position_embeddings=8192,
                        sliding_window=4096), 2_614_099_968),
    # 18 * (2048*256*18 + 3*2048*16384) = 18 * 110,100,480 = 1,981,808,640; + 256000*2048
    # = 524,288,000 -> 2,506,096,640 ("2B" without embeddings)
    "gemma-2b": (dict(model_type="gemma", hidden_size=2048, num_hidden_layers=18,
                      num_attention_heads=8, num_key_value_heads=1, head_dim=256,
                      intermediate_size=16384, vocab_size=256000, max_position_embeddings=8192),
                 2_506_096_640),
    # 32 * (3072*128*64 + 3*3072*8192) = 32 * 100,663,296 = 3,221,225,472; + 200064*3072
    # = 614,596,608 -> 3,835,822,080 ("3.8B")
    "Phi-4-mini": (dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32,
                        num_attention_heads=24, num_key_value_heads=8, intermediate_size=8192,
                        vocab_size=200064, max_position_embeddings=131072,
                        original_max_position_embeddings=4096, partial_rotary_factor=0.75,
                        rope_scaling=dict(type="longrope", short_factor=[1.0] * 48,
                                          long_factor=[1.0] * 48),  # 96 rotary dims / 2
                        tie_word_embeddings=True), 3_835_822_080),
    # 32 * (3072*96*128 + 3*3072*8192) = 32 * 113,246,208 = 3,623,878,656; + 2 * 32064*3072
    # = 197,001,216 -> 3,820,879,872 ("3.8B")
    "Phi-3.5-mini": (dict(model_type="phi3", hidden_size=3072, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
                          vocab_size=32064, max_position_embeddings=131072,
                          original_max_position_embeddings=4096, tie_word_embeddings=False,
                          rope_scaling=dict(type="longrope", short_factor=[1.0] * 48,
                                            long_factor=[1.0] * 48)),
                     3_820_879_872),
    # plain MLP: 32 * (2560*80*128 + 2*2560*10240) = 32 * 78,643,200 = 2,516,582,400;
    # + 2 * 51200*2560 = 262,144,000 -> 2,778,726,400 ("2.7B")
    "phi-2": (dict(model_type="phi", hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                   intermediate_size=10240, vocab_size=51200, max_position_embeddings=2048,
                   partial_rotary_factor=0.4, tie_word_embeddings=False), 2_778_726_400),
    # 36 * (2048*128*40 + 3*2048*11008) = 36 * 78,118,912 = 2,812,280,832; + 128256*2048
    # = 262,668,288 -> 3,074,949,120 ("3B")
    "SmolLM3-3B": (dict(model_type="smollm3", hidden_size=2048, num_hidden_layers=36,
                        num_attention_heads=16, num_key_value_heads=4, intermediate_size=11008,
                        vocab_size=128256, max_position_embeddings=65536,
                        tie_word_embeddings=True), 3_074_949_120),
    # 40 * (2048*64*80 + 3*2048*8192) = 40 * 60,817,408 = 2,432,696,320; + 49155*2048
    # = 100,669,440 -> 2,533,365,760 ("2B" class: 2.5B)
    "granite-3.1-2b": (dict(model_type="granite", hidden_size=2048, num_hidden_layers=40,
                            num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192,
                            vocab_size=49155, max_position_embeddings=131072,
                            embedding_multiplier=12.0, residual_multiplier=0.22,
                            attention_multiplier=0.015625, logits_scaling=8.0,
                            tie_word_embeddings=True), 2_533_365_760),
    # 16 * (2048*128*64 + 3*2048*8192) = 16 * 67,108,864 = 1,073,741,824; + 2 * 100352*2048
    # = 411,041,792 -> 1,484,783,616 ("1B": 1.48B)
    "OLMo-2-1B": (dict(model_type="olmo2", hidden_size=2048, num_hidden_layers=16,
                       num_attention_heads=16, num_key_value_heads=16, intermediate_size=8192,
                       vocab_size=100352, max_position_embeddings=4096,
                       tie_word_embeddings=False), 1_484_783_616),
    # 24 * (2048*64*128 + 3*2048*5632) = 24 * 51,380,224 = 1,233,125,376; + 2 * 100352*2048
    # = 411,041,792 -> 1,644,167,168 ("1.6B")
    "stablelm-2-1_6b": (dict(model_type="stablelm", hidden_size=2048, num_hidden_layers=24,
                             num_attention_heads=32, num_key_value_heads=32,
                             intermediate_size=5632, vocab_size=100352,
                             max_position_embeddings=4096, partial_rotary_factor=0.25,
                             use_qkv_bias=True, tie_word_embeddings=False), 1_644_167_168),
    # 16 * (2048*64*80 + 3*2048*8192) = 16 * 60,817,408 = 973,078,528; + 128256*2048
    # = 262,668,288 -> 1,235,746,816 ("1B": 1.24B)
    "Llama-3.2-1B": (dict(model_type="llama", hidden_size=2048, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                          intermediate_size=8192, vocab_size=128256,
                          max_position_embeddings=131072, rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0,
                                            original_max_position_embeddings=8192),
                          tie_word_embeddings=True), 1_235_746_816),
    # 24 * (896*64*32 + 3*896*4864) = 24 * 14,909,440 = 357,826,560; + 151936*896
    # = 136,134,656 -> 493,961,216 ("0.5B")
    "Qwen2.5-0.5B": (dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                          vocab_size=151936, max_position_embeddings=32768,
                          tie_word_embeddings=True), 493_961_216),
}


def test_every_decoder_family_has_a_real_shape_in_the_plan_test():
    families = {fields["model_type"] for fields, _ in REAL.values()}
    decoders = {s.model_type for s in REGISTRY.values() if s.task == DECODER}
    assert decoders - families <= {"mistral", "gpt2"}  # sized by tests/targets/test_plan.py's llama/gpt2


@pytest.mark.parametrize("name", sorted(REAL))
def test_plan_knows_each_family_from_its_record(name, tmp_path):
    fields, params = REAL[name]
    (tmp_path / "config.json").write_text(json.dumps(fields), encoding="utf-8")
    plan = plan_from_model(str(tmp_path / "config.json"), "jetson-orin-nano-8gb", "int4")
    d = plan.dims
    assert d.params == params
    # KV on the Nano (fp16): 2 * layers * kv_heads * head_dim * 2 B per position and slot
    kv_per_token = 2 * d.num_layers * d.kv_heads * d.head_dim * 2
    assert plan.chosen.components.kv_cache == kv_per_token * plan.max_seq * plan.batch


def test_plan_figures_checked_by_hand_for_three_families(tmp_path):
    """Qwen3-0.6B: KV 2*28*8*128*2 = 114,688 B per position; at the Nano's default 2048 that is
    234,881,024 B = 224 MiB. Phi-4-mini: 2*32*8*128*2 = 131,072 B -> 256 MiB at 2048, and its
    longrope keeps max_seq <= 4096. Gemma 3 1B: one kv head of 256: 2*26*1*256*2 = 26,624 B
    -> 52 MiB at 2048 (every layer holds max_seq rows, the 512-window ones too)."""
    expect = {"Qwen3-0.6B": 234_881_024, "Phi-4-mini": 268_435_456, "gemma-3-1b": 54_525_952}
    for name, kv in expect.items():
        fields, _ = REAL[name]
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(fields), encoding="utf-8")
        plan = plan_from_model(str(folder), "jetson-orin-nano-8gb", "int4")
        assert plan.max_seq == 2048 and plan.chosen.components.kv_cache == kv, name
    fields, _ = REAL["Phi-4-mini"]
    (tmp_path / "phi4.json").write_text(json.dumps(fields), encoding="utf-8")
    plan = plan_from_model(str(tmp_path / "phi4.json"), "jetson-agx-orin-64gb", "int4")
    assert plan.max_seq == 4096  # the AGX default, at the longrope limit
    short = dict(fields, original_max_position_embeddings=1024)
    (tmp_path / "short.json").write_text(json.dumps(short), encoding="utf-8")
    plan = plan_from_model(str(tmp_path / "short.json"), "jetson-orin-nano-8gb", "int4")
    assert plan.max_seq == 1024  # the limit binds below the Nano's default 2048


# --- quantization: every family through the same gate ----------------------------------------
LOOSE = {"max_ppl_increase": 10.0, "min_top1": 0.0, "min_greedy": 0.0, "min_cosine": -1.0}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", sorted(DECODER_CONFIGS))
def test_family_quantizes_to_int4_with_awq_saying_what_it_folded(case, target, tiny_bundle,
                                                                 tmp_path):
    """Random weights: the gate's figures mean little, so its limits are loose here; what is
    checked is that each family's graph goes through the quantizer, the gate measures it, and
    AWQ accounts for every matmul input (rescaled, kept, or not rescaled with a reason)."""
    from quantize.pipeline import quantize_bundle

    r = quantize_bundle(tiny_bundle(case, target), "int4", out=tmp_path / "q", thresholds=LOOSE,
                        samples=8, seq_len=32)
    q = r.manifest.quantization
    assert q is not None and q.gate is not None and r.gate.passed
    awq = q.details.get("awq")
    if awq:  # the plain grids; the offset grid (exact for Q4_1 sources) takes no AWQ
        assert sum(awq["not_rescaled"].values()) == awq["skipped_inputs"]
        assert awq["scaled_inputs"] + awq["plain_inputs"] > 0, awq  # every family folds somewhere
    m = load_verified(r.bundle)
    if target != "cpu":  # the int4 Q/DQ graph of every family passes the offline parser check
        assert m.trt_check is not None and m.trt_check.passed, m.trt_check
