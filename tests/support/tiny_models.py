"""Tiny random-initialised Hugging Face models, written as real model folders (config.json,
model.safetensors, tokenizer.json + chat template) so every test goes through the same loaders
as a user's model. Each builds in well under a second."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a of to and in is it you that he was for on are as with his they at be this "
         "have from or one had by word but not what all were we when your can said there use "
         "an each which she do how their if will up other about out many then them these so "
         "some her would make like him into time has look two more write go see number no way "
         "could people my than first water been call who oil its now find long down day did get "
         "come made may part paris france capital hello world jetson orin").split()
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant {% endif %}")

# One case per family (the key), built from transformers' own config class for `model_type`.
# head_dim 16 where ONNX Runtime's GroupQueryAttention applies (CPU bundles), 8 for gpt2 so
# the portable static attention is covered on CPU too. Windows are shorter than parity's prompts
# (7, 33 tokens + 32 greedy) so sliding layers are exercised past their window.
_GQA = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
_GEMMA = dict(_GQA, head_dim=16, intermediate_size=128, query_pre_attn_scalar=16)
DECODER_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(_GQA, tie_word_embeddings=True)),
    "llama3": ("llama", dict(_GQA, rope_theta=500000.0, rope_scaling=dict(  # Llama 3.2 style
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "qwen2": ("qwen2", dict(_GQA, tie_word_embeddings=False)),
    "qwen3": ("qwen3", dict(_GQA, head_dim=16, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(_GQA, num_key_value_heads=1, sliding_window=20)),
    "smollm3": ("smollm3", dict(_GQA, num_hidden_layers=4, no_rope_layer_interval=4)),
    "granite": ("granite", dict(_GQA, embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.015625, logits_scaling=8.0)),
    "olmo2": ("olmo2", dict(_GQA, tie_word_embeddings=False)),
    "gemma": ("gemma", dict(_GEMMA, num_key_value_heads=1)),
    "gemma2": ("gemma2", dict(_GEMMA, sliding_window=20, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0)),
    "gemma3_text": ("gemma3_text", dict(_GEMMA, sliding_window=20, rope_local_base_freq=10000.0,
                                        rope_theta=1000000.0, layer_types=[
                                            "sliding_attention", "full_attention"],
                                        rope_scaling=dict(rope_type="linear", factor=8.0))),
    "phi3": ("phi3", dict(_GQA, max_position_embeddings=128, original_max_position_embeddings=64,
                          rope_scaling=dict(type="longrope", short_factor=[1.0 + i / 8 for i in range(8)],
                                            long_factor=[2.0 + i for i in range(8)]))),
    "phi4": ("phi3", dict(_GQA, partial_rotary_factor=0.75, tie_word_embeddings=True,  # Phi-4-mini
                          max_position_embeddings=128, original_max_position_embeddings=64,
                          rope_scaling=dict(type="longrope", short_factor=[1.0 + i / 8 for i in range(6)],
                                            long_factor=[2.0 + i for i in range(6)]))),
    "phi": ("phi", dict(_GQA, num_key_value_heads=4, partial_rotary_factor=0.5)),
    "stablelm": ("stablelm", dict(_GQA, partial_rotary_factor=0.25, use_qkv_bias=True)),
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)),
}


def word_tokenizer(kind: str = "decoder"):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "encoder":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]")
    vocab = {w: i for i, w in enumerate(SPECIALS + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_decoder(folder: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """A tiny decoder of case `arch` (DECODER_CONFIGS) with random weights, saved as a Hugging
    Face folder."""
    import torch
    import transformers

    tokenizer = word_tokenizer()
    model_type, settings = DECODER_CONFIGS[arch]
    extra = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    config = transformers.AutoConfig.for_model(model_type, vocab_size=len(tokenizer),
                                               **{**settings, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharper logits than the 0.02-std init, so greedy has clear winners
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_encoder(folder: Path, seed: int = 0) -> Path:
    import json

    import torch
    import transformers

    tokenizer = word_tokenizer("encoder")
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=128)
    torch.manual_seed(seed)
    transformers.BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # sentence-transformers layout: mean pooling + L2 normalisation, like all-MiniLM-L6-v2
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    return folder
