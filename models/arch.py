"""The declarative record of an architecture family: what convert/, targets/plan.py and the
quantizers need to know about a Hugging Face `model_type`, as data (optimum's export configs,
without the class hierarchy).

An `ArchSpec` says three things:
  - where the config keeps each dimension (`ConfigNames`),
  - what the checkpoint's modules are called (`Layout`), so the exported module mirrors the
    state dict one to one and `load_state_dict(strict=True)` proves every tensor was mapped,
  - how a block computes (norm kind, norm placement, q/k norms, MLP gating, scalars read from
    the config, soft-capping, sliding windows, RoPE variants).
`models/params.py` reads one model's config through its spec into `ArchParams`, the resolved
numbers the decoder module is built from. Nothing downstream compares model-type strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DECODER = "text-generation"
ENCODER = "feature-extraction"


@dataclass(frozen=True)
class ConfigNames:
    """Where a config keeps each normalised field (optimum's NormalizedConfig, as data)."""

    num_layers: str = "num_hidden_layers"
    hidden: str = "hidden_size"
    heads: str = "num_attention_heads"
    kv_heads: str | None = "num_key_value_heads"  # None: multi-head attention (kv = heads)
    intermediate: str = "intermediate_size"
    max_positions: str = "max_position_embeddings"
    norm_eps: str = "rms_norm_eps"
    vocab: str = "vocab_size"


GPT2_NAMES = ConfigNames(num_layers="n_layer", hidden="n_embd", heads="n_head", kv_heads=None,
                         intermediate="n_inner", max_positions="n_positions",
                         norm_eps="layer_norm_epsilon")
BERT_NAMES = ConfigNames(kv_heads=None, norm_eps="layer_norm_eps")
LAYERNORM_NAMES = ConfigNames(norm_eps="layer_norm_eps")  # phi, stablelm


@dataclass(frozen=True)
class BlockNorms:
    """Module names of the norms around a block's two halves; None where the family has none.

        llama:    x + attn(pre_attn(x))               then  x + mlp(pre_mlp(x))
        gemma2/3: x + post_attn(attn(pre_attn(x)))    then  x + post_mlp(mlp(pre_mlp(x)))
        olmo2:    x + post_attn(attn(x))              then  x + post_mlp(mlp(x))
    A parallel block (phi-2) feeds attn and mlp the same pre_attn(x) and adds both.
    """

    pre_attn: str | None = "input_layernorm"
    post_attn: str | None = None
    pre_mlp: str | None = "post_attention_layernorm"
    post_mlp: str | None = None


SANDWICH_NORMS = BlockNorms("input_layernorm", "post_attention_layernorm",
                            "pre_feedforward_layernorm", "post_feedforward_layernorm")
POST_NORMS = BlockNorms(None, "post_attention_layernorm", None, "post_feedforward_layernorm")
PARALLEL_NORMS = BlockNorms("input_layernorm", None, None, None)


@dataclass(frozen=True)
class Layout:
    """Module names inside a *ForCausalLM checkpoint (state-dict keys, without the layer index).

    qkv: three names for split projections, one for a fused [q; k; v] matrix (phi3, gpt2).
    mlp_in: ("gate", "up") split, ("gate_up",) fused [gate; up] when `gated`, ("fc1",) plain.
    """

    body: str = "model"
    embed: str = "embed_tokens"
    positions: str | None = None  # learned position table (gpt2: wpe)
    layers: str = "layers"
    final_norm: str = "norm"
    attn: str = "self_attn"
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    out: str = "o_proj"
    mlp: str = "mlp"
    mlp_in: tuple[str, ...] = ("gate_proj", "up_proj")
    mlp_out: str = "down_proj"
    gated: bool = True  # act(gate) * up, or act(fc1) alone
    norms: BlockNorms = BlockNorms()
    conv1d: bool = False  # gpt2's Conv1D stores W as [in, out]: y = x @ W + b
    lm_head_bias: bool = False  # phi-2


GPT2_LAYOUT = Layout(body="transformer", embed="wte", positions="wpe", layers="h", final_norm="ln_f",
                     attn="attn", qkv=("c_attn",), out="c_proj", mlp_in=("c_fc",), mlp_out="c_proj",
                     gated=False, norms=BlockNorms("ln_1", None, "ln_2", None), conv1d=True)
PHI_LAYOUT = Layout(final_norm="final_layernorm", out="dense", mlp_in=("fc1",), mlp_out="fc2",
                    gated=False, norms=PARALLEL_NORMS, lm_head_bias=True)
PHI3_LAYOUT = Layout(qkv=("qkv_proj",), mlp_in=("gate_up_proj",))


@dataclass(frozen=True)
class Scalar:
    """A number read from the config: getattr(config, attr) ** power; absent or None -> unset."""

    attr: str
    power: float = 1.0

    def read(self, config: Any) -> float | None:
        value = getattr(config, self.attr, None)
        return None if value is None else float(value) ** self.power


@dataclass(frozen=True)
class Refusal:
    """A config option this toolkit does not export: refused before any work, with why.
    The option is refused when the config sets it to a value outside `allowed` (absent is
    allowed): a flag that is true, or a factor other than its neutral value."""

    attr: str
    why: str
    allowed: tuple[Any, ...] = (None, False)


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # Hugging Face config.model_type
    task: str  # DECODER | ENCODER
    family: str  # the lineage, for people and the manifest ("llama", "gemma", ...); never branched on
    names: ConfigNames = field(default_factory=ConfigNames)
    layout: Layout = field(default_factory=Layout)
    positions: str = "rope"  # "rope" | "learned"
    norm: str = "rms"  # "rms" | "rms1" (Gemma: x_hat * (1 + w)) | "layer" (LayerNorm with bias)
    qk_norm: str | None = None  # "head": over head_dim, per head (Qwen3, Gemma 3);
    #                             "all": over the whole projection (OLMo 2); norm kind as `norm`
    parallel: bool | str = False  # attn and mlp from the same normed input (phi-2; stablelm's flag)
    act: str = "hidden_act"  # the config attribute that names the activation
    qkv_bias: bool | str = False  # bool, or the config attribute that says
    out_bias: bool | str = False
    mlp_bias: bool | str = False
    embed_scale: Scalar | None = None  # Gemma: sqrt(hidden); Granite: embedding_multiplier
    residual_scale: Scalar | None = None  # Granite: residual_multiplier on each branch
    attn_scale: Scalar | None = None  # None: 1/sqrt(head_dim)
    attn_scaled: bool | str = True  # False, or the config flag that is false, where q.k is not scaled
    #                                 at all (GPT-2's scale_attn_weights)
    layer_scaled: bool | str = False  # layer i's scores also x 1/(i + 1) (GPT-2's
    #                                   scale_attn_by_inverse_layer_idx)
    logit_scale: Scalar | None = None  # Granite: 1 / logits_scaling
    attn_softcap: Scalar | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: Scalar | None = None  # Gemma 2: on the logits
    sliding_window: str | None = None  # config attr; `layer_types` picks the layers (all if absent)
    local_rotary: str | None = None  # Gemma 3: the sliding layers' own rotary module (own base)
    rope_layers: str | None = None  # SmolLM3: per-layer list, 0 = no RoPE in that layer (NoPE)
    refuse: tuple[Refusal, ...] = ()
    examples: tuple[str, ...] = ()

    def flag(self, value: bool | str, config: Any, default: bool = False) -> bool:
        """A record's flag: itself, or the config attribute it names (`default` where the config
        lacks it: transformers' own default for that attribute)."""
        return bool(getattr(config, value, default)) if isinstance(value, str) else value
