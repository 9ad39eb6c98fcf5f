"""Per-architecture export specs: one small declarative record per Hugging Face `model_type`.

A spec says which module family exports the architecture and how its config names map onto
the toolkit's normalised `ModelDims`. Adding an architecture that shares a family is one
`register(...)` call of a few lines; nothing downstream compares model-type strings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bundle.errors import ToolkitError

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


@dataclass(frozen=True)
class ArchSpec:
    model_type: str  # Hugging Face config.model_type
    task: str  # DECODER | ENCODER
    family: str  # module family in convert/: "llama" | "gpt2" | "bert"
    names: ConfigNames = field(default_factory=ConfigNames)
    positions: str = "rope"  # "rope" | "learned"
    qkv_bias: bool | str = False  # bool, or the config attribute that says
    out_bias: bool | str = False
    mlp_bias: bool | str = False
    sliding_window: str | None = None  # config attr: max_seq beyond it would change results
    examples: tuple[str, ...] = ()

    def flag(self, value: bool | str, config: Any) -> bool:
        return bool(getattr(config, value, False)) if isinstance(value, str) else value


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
register(ArchSpec("llama", DECODER, "llama", qkv_bias="attention_bias", out_bias="attention_bias",
                  mlp_bias="mlp_bias", examples=("SmolLM2", "Llama 2", "Llama 3 (GQA)")))
register(ArchSpec("mistral", DECODER, "llama", sliding_window="sliding_window",
                  examples=("Mistral 7B",)))
register(ArchSpec("qwen2", DECODER, "llama", qkv_bias=True, examples=("Qwen2", "Qwen2.5")))
register(ArchSpec("gpt2", DECODER, "gpt2", names=GPT2_NAMES, positions="learned",
                  qkv_bias=True, out_bias=True, mlp_bias=True, examples=("GPT-2",)))
register(ArchSpec("bert", ENCODER, "bert", names=BERT_NAMES, positions="learned",
                  examples=("all-MiniLM-L6-v2", "BERT")))
