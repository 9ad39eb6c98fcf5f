"""GGUF sources: tiny GGUFs written the way llama.cpp's convert_hf_to_gguf writes them (names from
gguf-py's tensor map, q/k permuted for RoPE in llama-family files, weights quantized by
gguf.quants), loaded through ModelSource and checked against gguf.quants.dequantize; and the
files transformers' GGUF loader would misread, refused before any weight is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import SPECIALS, WORDS, make_decoder

from bundle.errors import ToolkitError
from models.sources import resolve

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: (heads*dim, in) rows regrouped from halves to pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(folder: Path, qtype: Any, extra_kv: dict[str, tuple[Any, Any]] | None = None,
                     extra_tensors: dict[str, np.ndarray] | None = None, arch: str = "llama",
                     family: str = "llama", **overrides: Any) -> tuple[Path, Any]:
    """A tiny decoder (tied) of tiny_models case `family` (llama, or phi3: its fused tensors map
    as they are) as `folder/model.gguf`, 2-D weights in `qtype`; returns (path, HF model)."""
    import torch
    import transformers

    make_decoder(folder / "hf", family, **overrides)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32)
    cfg = model.config
    path = folder / "model.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    vocab = SPECIALS + list(WORDS)  # SentencePiece-style: words carry the "▁" space marker
    w.add_tokenizer_model("llama")
    w.add_token_list([t if i < len(SPECIALS) else "▁" + t for i, t in enumerate(vocab)])
    w.add_token_scores([0.0] * len(SPECIALS) + [-float(i) for i in range(len(WORDS))])
    w.add_token_types([2, 3, 3, 3] + [1] * len(WORDS))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(3)  # make_decoder's; Phi-3's config class defaults to 32000, past this vocab
    for key, (value, vtype) in (extra_kv or {}).items():
        w.add_key_value(key, value, vtype)
    gguf_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "phi3": gguf.MODEL_ARCH.PHI3}[family]
    names = gguf.get_tensor_name_map(gguf_arch, cfg.num_hidden_layers)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied: llama.cpp writes no output.weight
            continue
        base, suffix = name.rsplit(".", 1)
        a = t.numpy()
        if family == "llama" and name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif family == "llama" and name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        gname = f"{names.get_name(base)}.{suffix}"
        if a.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(gname, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, model


@pytest.mark.parametrize("qname", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "BF16"])
def test_a_llama_gguf_loads_the_dequantized_weights_unpermuted(tmp_path, qname):
    import torch

    qtype = gguf.GGMLQuantizationType[qname]
    path, model = write_llama_gguf(tmp_path, qtype)
    cfg = model.config
    src = resolve(str(path))
    assert src.model_type() == "llama"
    got = src.load_torch("text-generation").state_dict()
    reader = gguf.GGUFReader(str(path))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for t in reader.tensors:  # each tensor: gguf-py's own dequantization, mapped back to HF's layout
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        hf = next(n for n in got if n.endswith((".weight", ".bias"))
                  and f"{names.get_name(n.rsplit('.', 1)[0])}.{n.rsplit('.', 1)[1]}" == t.name)
        if hf.endswith("q_proj.weight"):
            want = _unpermute(want, cfg.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            want = _unpermute(want, cfg.num_key_value_heads)
        np.testing.assert_array_equal(got[hf].numpy(), want, err_msg=hf)
    # the same weights in the model they came from: the logits agree to float rounding
    model.load_state_dict(got)
    loaded = src.load_torch("text-generation")
    ids = torch.tensor([[1, 5, 9, 30, 44, 7, 12, 60]])
    with torch.no_grad():
        assert float((model(ids).logits - loaded(ids).logits).abs().max()) < 1e-4


def test_a_gguf_with_rope_frequency_factors_is_refused(tmp_path):
    """Llama 3.1/3.2 GGUFs carry llama3 RoPE scaling as a rope_freqs tensor, which transformers'
    loader ignores: the model loaded with plain RoPE, and parity against it passed."""
    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.Q8_0, extra_tensors={
        "rope_freqs.weight": np.linspace(1.0, 8.0, 8, dtype=np.float32)})  # (head_dim/2,)
    with pytest.raises(ToolkitError, match="RoPE scaling \\(rope_freqs.weight\\)") as e:
        resolve(str(path)).load_config()
    assert "Hugging Face folder" in (e.value.hint or "")


def test_a_gguf_with_linear_rope_scaling_is_refused(tmp_path):
    t = gguf.GGUFValueType
    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.F32, extra_kv={
        "llama.rope.scaling.type": ("linear", t.STRING), "llama.rope.scaling.factor": (8.0, t.FLOAT32)})
    with pytest.raises(ToolkitError, match="llama.rope.scaling.type 'linear' \\(factor 8.0\\)"):
        resolve(str(path)).load_config()


def test_a_gguf_with_a_linear_factor_of_one_loads(tmp_path):
    t = gguf.GGUFValueType  # llama.cpp writes this for some models: plain RoPE
    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.F32, extra_kv={
        "llama.rope.scaling.type": ("linear", t.STRING), "llama.rope.scaling.factor": (1.0, t.FLOAT32)})
    assert resolve(str(path)).model_type() == "llama"


def test_a_gguf_architecture_transformers_cannot_read_is_named(tmp_path):
    """It read 'cannot read the model config ... check that the file is complete (a truncated
    download?)' for a complete Gemma 1 / Granite / OLMo 2 GGUF."""
    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.F32, arch="granite")
    with pytest.raises(ToolkitError, match="GGUF architecture 'granite' cannot be read") as e:
        resolve(str(path)).load_config()
    assert "truncated" not in str(e.value) + (e.value.hint or "")
    assert "Hugging Face folder" in (e.value.hint or "")


def test_a_gguf_missing_a_weight_is_refused(tmp_path):
    """A parameter the file lacks kept transformers' random init (its warning is silenced) and
    the bundle passed parity against that same model."""
    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.Q8_0)
    reader = gguf.GGUFReader(str(path))
    cut = tmp_path / "cut.gguf"
    w = gguf.GGUFWriter(str(cut), "llama")
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name != "blk.1.ffn_norm.weight":  # (hidden,) F32: dropped
            w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert resolve(str(path)).load_torch("text-generation") is not None
    with pytest.raises(ToolkitError, match="lacks 1 weight.*layers.1.post_attention_layernorm"):
        resolve(str(cut)).load_torch("text-generation")


def test_a_gguf_with_a_tensor_the_model_has_no_place_for_is_refused(tmp_path):
    """transformers' loader skipped it silently (a q bias in a llama file: the model's config has
    attention_bias false), so the bundle was a different model that still passed parity."""
    _, model = write_llama_gguf(tmp_path / "plain", gguf.GGMLQuantizationType.Q8_0)
    path, _ = write_llama_gguf(tmp_path / "biased", gguf.GGMLQuantizationType.Q8_0, extra_tensors={
        "blk.0.attn_q.bias": np.ones(model.config.hidden_size, np.float32)})
    with pytest.raises(ToolkitError, match="holds 1 tensor.*no place for: blk.0.attn_q.bias") as e:
        resolve(str(path)).load_torch("text-generation")
    assert "Hugging Face folder" in (e.value.hint or "")


def test_every_tensor_of_a_complete_gguf_has_its_place(tmp_path):
    from models.sources import unmapped_gguf_tensors

    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.F32)
    model = resolve(str(path)).load_torch("text-generation")
    assert unmapped_gguf_tensors(path, model) == []
    assert len(gguf.GGUFReader(str(path)).tensors) > 10


def test_a_phi3_gguf_keeps_its_sliding_window(tmp_path):
    """phi3.attention.sliding_window is not in transformers' GGUF key map: the model loaded with
    no window and attended past it (GGUF_CONFIG_KEYS carries it)."""
    t = gguf.GGUFValueType
    path, _ = write_llama_gguf(tmp_path, gguf.GGMLQuantizationType.F32, arch="phi3", family="phi3",
                               rope_scaling=None, extra_kv={"phi3.attention.sliding_window": (24, t.UINT32)})
    src = resolve(str(path))
    assert src.load_config().sliding_window == 24
    assert src.load_torch("text-generation").config.sliding_window == 24


@pytest.mark.parametrize("blocks, scalar", [(46, 48 // 4), (2, 8)])
def test_gemma2s_attention_scale_follows_llama_cpp(blocks, scalar, monkeypatch):
    """A GGUF stores no query_pre_attn_scalar; llama.cpp scales Gemma 2 27B (46 blocks) by
    (hidden / heads)^-0.5 and the others by head_dim^-0.5. transformers kept the class default
    (256) whatever the file; and the soft-caps are the file's, not the class defaults."""
    import transformers

    from models import sources

    config = transformers.Gemma2Config(hidden_size=48, num_attention_heads=4, head_dim=8,
                                       num_hidden_layers=blocks)
    summary = sources.GGUFSummary("gemma2", (), {"gemma2.attn_logit_softcapping": 40.0})
    monkeypatch.setattr(sources, "gguf_summary", lambda path: summary)
    sources.complete_gguf_config(config, Path("unused.gguf"))
    assert config.query_pre_attn_scalar == scalar and config.attn_logit_softcapping == 40.0
    assert config.final_logit_softcapping == 30.0  # not in this file: the class default stays
