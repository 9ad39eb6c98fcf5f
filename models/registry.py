"""The registry: one `ArchSpec` record per Hugging Face `model_type` (models/arch.py).

Adding an architecture whose blocks these records can describe is one `register(...)` call;
convert/, quantize/ and targets/plan.py read the record and never compare model-type strings.
"""

from __future__ import annotations

from dataclasses import replace

from bundle.errors import ToolkitError
from models.arch import (
    BERT_NAMES,
    DECODER,
    ENCODER,
    GPT2_LAYOUT,
    GPT2_NAMES,
    LAYERNORM_NAMES,
    PHI3_LAYOUT,
    PHI_LAYOUT,
    POST_NORMS,
    SANDWICH_NORMS,
    ArchSpec,
    Layout,
    Refusal,
    Scalar,
)

__all__ = ["DECODER", "ENCODER", "REGISTRY", "ArchSpec", "get_spec", "register", "supported"]

REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    if spec.task not in (DECODER, ENCODER):
        raise ValueError(f"{spec.model_type}: unknown task {spec.task!r}")
    if spec.model_type in REGISTRY:
        raise ValueError(f"{spec.model_type} registered twice")
    REGISTRY[spec.model_type] = spec
    return spec


def supported() -> list[str]:
    return sorted(REGISTRY)


def get_spec(model_type: str | None) -> ArchSpec:
    spec = REGISTRY.get(model_type or "")
    if spec is None:
        raise ToolkitError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(supported())}",
            hint="convert an existing ONNX export instead (passed through without parity), or "
                 "add an ArchSpec in models/registry.py")
    return spec


# --- the registry ------------------------------------------------------------------------
# Families that share most of a record derive it with dataclasses.replace: what differs is
# exactly what the call lists.
# transformers' Llama- and Gemma-derived attention rotates whole heads: with a partial factor
# its RoPE tables are narrower than the heads and its own forward fails (a shape error), so there
# is no reference to match (phi, phi3 and stablelm rotate the leading dims and are exported).
WHOLE_HEAD_ROPE = Refusal("partial_rotary_factor", "transformers' attention for this family "
                          "rotates whole heads; its own model fails on a partial factor",
                          allowed=(None, 1, 1.0))
LLAMA = register(ArchSpec("llama", DECODER, "llama", qkv_bias="attention_bias",
                          out_bias="attention_bias", mlp_bias="mlp_bias",
                          refuse=(WHOLE_HEAD_ROPE,), examples=("SmolLM2", "Llama 2", "Llama 3.x")))
register(replace(LLAMA, model_type="mistral", qkv_bias=False, out_bias=False, mlp_bias=False,
                 sliding_window="sliding_window", examples=("Mistral 7B",)))
register(replace(LLAMA, model_type="smollm3", rope_layers="no_rope_layers",
                 sliding_window="sliding_window", examples=("SmolLM3-3B",)))
register(replace(LLAMA, model_type="granite", embed_scale=Scalar("embedding_multiplier"),
                 residual_scale=Scalar("residual_multiplier"),
                 attn_scale=Scalar("attention_multiplier"),
                 logit_scale=Scalar("logits_scaling", -1.0), examples=("Granite 3.x",)))
register(replace(LLAMA, model_type="qwen2", family="qwen", qkv_bias=True, out_bias=False,
                 mlp_bias=False, sliding_window="sliding_window", examples=("Qwen2", "Qwen2.5")))
register(replace(LLAMA, model_type="qwen3", family="qwen", mlp_bias=False, qk_norm="head",
                 sliding_window="sliding_window", examples=("Qwen3-0.6B/1.7B/4B",)))
register(replace(LLAMA, model_type="olmo2", family="olmo", mlp_bias=False, qk_norm="all",
                 layout=Layout(norms=POST_NORMS), examples=("OLMo 2",)))
GEMMA = register(ArchSpec("gemma", DECODER, "gemma", norm="rms1",
                          embed_scale=Scalar("hidden_size", 0.5), qkv_bias="attention_bias",
                          out_bias="attention_bias", refuse=(WHOLE_HEAD_ROPE,),
                          examples=("Gemma 2B/7B",)))
GEMMA2 = register(replace(GEMMA, model_type="gemma2", layout=Layout(norms=SANDWICH_NORMS),
                          act="hidden_activation", attn_scale=Scalar("query_pre_attn_scalar", -0.5),
                          sliding_window="sliding_window",
                          attn_softcap=Scalar("attn_logit_softcapping"),
                          final_softcap=Scalar("final_logit_softcapping"),
                          examples=("Gemma 2 2B",)))
# transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it
# (Gemma3Attention passes no softcap, 4.57): the reference parity checks against has no cap
register(replace(GEMMA2, model_type="gemma3_text", qk_norm="head", local_rotary="rotary_emb_local",
                 attn_softcap=None, examples=("Gemma 3 270M/1B",)))
register(ArchSpec("phi3", DECODER, "phi", layout=PHI3_LAYOUT, sliding_window="sliding_window",
                  examples=("Phi-3/3.5-mini", "Phi-4-mini")))
register(ArchSpec("phi", DECODER, "phi", names=LAYERNORM_NAMES, layout=PHI_LAYOUT, norm="layer",
                  parallel=True, qkv_bias=True, out_bias=True, mlp_bias=True,
                  refuse=(Refusal("qk_layernorm", "phi's per-head q/k LayerNorm"),),
                  examples=("Phi-1.5", "Phi-2")))
register(ArchSpec("stablelm", DECODER, "stablelm", names=LAYERNORM_NAMES, norm="layer",
                  parallel="use_parallel_residual", qkv_bias="use_qkv_bias",
                  refuse=(Refusal("qk_layernorm", "StableLM's per-head q/k LayerNorm"),),
                  examples=("StableLM 2 1.6B", "StableLM 3B")))
register(ArchSpec("gpt2", DECODER, "gpt2", names=GPT2_NAMES, layout=GPT2_LAYOUT, positions="learned",
                  norm="layer", act="activation_function", qkv_bias=True, out_bias=True,
                  mlp_bias=True, attn_scaled="scale_attn_weights",
                  layer_scaled="scale_attn_by_inverse_layer_idx", examples=("GPT-2",)))
register(ArchSpec("bert", ENCODER, "bert", names=BERT_NAMES, positions="learned",
                  examples=("all-MiniLM-L6-v2", "BERT")))


def supported_markdown() -> str:
    """The README's table of architectures (tests/models/test_architectures.py keeps them equal)."""
    rows = ["| `model_type` | family | examples | what the record says |", "|---|---|---|---|"]
    rows += [f"| `{s.model_type}` | {s.family} | {', '.join(s.examples)} | {traits(s)} |"
             for s in sorted(REGISTRY.values(), key=lambda s: s.model_type)]
    return "\n".join(rows)


def traits(s: ArchSpec) -> str:
    """What sets a family apart, read off its record (partial RoPE, windows and RoPE scaling
    come from each model's config and are not listed)."""
    if s.task == ENCODER:
        return "encoder, exported by optimum"
    lay, out = s.layout, []
    out.append({"rms": "RMSNorm", "rms1": "RMSNorm (1 + w)", "layer": "LayerNorm"}[s.norm])
    norms = lay.norms
    if s.parallel:
        out.append("parallel attention + MLP" if s.parallel is True else f"parallel if {s.parallel}")
    if norms.post_attn and norms.pre_attn:
        out.append("pre- and post-norms")
    elif norms.post_attn:
        out.append("post-norms only")
    if s.qk_norm:
        out.append(f"q/k norm ({'per head' if s.qk_norm == 'head' else 'whole projection'})")
    if len(lay.qkv) == 1:
        out.append("fused QKV")
    out.append(("gated MLP" + (", fused gate/up" if len(lay.mlp_in) == 1 else "")) if lay.gated
               else "plain MLP")
    out.append("learned positions" if s.positions == "learned" else "RoPE")
    for label, value in (("embedding x", s.embed_scale), ("residual x", s.residual_scale),
                         ("attention scale", s.attn_scale), ("logits x", s.logit_scale),
                         ("attention soft-cap", s.attn_softcap), ("logit soft-cap", s.final_softcap)):
        if value:
            out.append(f"{label} `{value.attr}`" + (f"^{value.power:g}" if value.power != 1 else ""))
    if s.sliding_window:
        out.append("sliding window" + (" with its own RoPE base" if s.local_rotary else ""))
    if s.rope_layers:
        out.append(f"NoPE layers (`{s.rope_layers}`)")
    return ", ".join(out)
