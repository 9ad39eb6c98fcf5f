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

# head_dim 16 where ONNX Runtime's GroupQueryAttention applies (CPU bundles), 8 for gpt2 so
# the portable static attention is covered on CPU too.
DECODER_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False),
    "mistral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=128, sliding_window=96),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
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
    """A tiny `arch` decoder with random weights saved as a Hugging Face folder."""
    import torch
    import transformers

    tokenizer = word_tokenizer()
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel),
    }[arch]
    extra = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    config = cfg_cls(vocab_size=len(tokenizer), **{**DECODER_CONFIGS[arch], **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
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
