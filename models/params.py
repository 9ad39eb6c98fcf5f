"""One model's config read through its `ArchSpec` into the numbers the decoder is built from.

    resolve(spec, config) -> ArchParams     # every config read of convert/decoder.py happens here

A config option the record cannot express is refused here, before any weight is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from bundle.errors import ToolkitError
from models.arch import ArchSpec, Scalar

# The activations these families name (transformers' ACT2FN keys), by the formula they use.
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class LayerPlan:
    """What differs between the layers of one model."""

    window: int | None  # sliding window (keys with q - k < window are visible); None: full
    rope: str | None  # "global" | "local" (Gemma 3's sliding layers) | None: NoPE / learned
    attn_scale: float  # multiplies q.k in this layer (GPT-2 may divide it by the layer's number)


@dataclass(frozen=True)
class ArchParams:
    spec: ArchSpec
    act: str  # "silu" | "gelu" | "gelu_tanh" | "relu"
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    parallel: bool
    embed_scale: float
    residual_scale: float  # multiplies each branch before it joins the residual
    logit_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    rotary_dim: int  # leading dims of each head that RoPE rotates (partial rotary: < head_dim)
    layers: tuple[LayerPlan, ...]

    @property
    def window(self) -> int | None:
        """The sliding window of the layers that have one (one size per model in every family)."""
        return next((p.window for p in self.layers if p.window), None)


def _scalar(s: Scalar | None, config: Any, default: float) -> float:
    value = s.read(config) if s else None
    return default if value is None else value


def resolve(spec: ArchSpec, config: Any, num_layers: int, head_dim: int) -> ArchParams:
    for r in spec.refuse:
        value = getattr(config, r.attr, None)
        if value not in r.allowed:
            raise ToolkitError(f"{spec.model_type} with {r.attr}={json.dumps(value, default=str)} is not "
                               f"supported ({r.why})",
                               hint="no public checkpoint of the sizes boards run sets it; "
                                    "convert an ONNX export of it instead")
    act_name = getattr(config, spec.act, None) or "silu"
    if act_name not in ACTIVATIONS:
        raise ToolkitError(f"{spec.model_type}: activation {act_name!r} is not supported",
                           hint=f"supported: {', '.join(sorted(ACTIVATIONS))}")
    rotary_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", None) or 1.0))
    return ArchParams(
        spec=spec, act=ACTIVATIONS[act_name],
        qkv_bias=spec.flag(spec.qkv_bias, config), out_bias=spec.flag(spec.out_bias, config),
        mlp_bias=spec.flag(spec.mlp_bias, config), parallel=spec.flag(spec.parallel, config),
        embed_scale=_scalar(spec.embed_scale, config, 1.0),
        residual_scale=_scalar(spec.residual_scale, config, 1.0),
        logit_scale=_scalar(spec.logit_scale, config, 1.0),
        attn_softcap=spec.attn_softcap.read(config) if spec.attn_softcap else None,
        final_softcap=spec.final_softcap.read(config) if spec.final_softcap else None,
        rotary_dim=rotary_dim - rotary_dim % 2,
        layers=_layer_plans(spec, config, num_layers, head_dim))


def _layer_plans(spec: ArchSpec, config: Any, num_layers: int,
                 head_dim: int) -> tuple[LayerPlan, ...]:
    """Per-layer window and RoPE from the config's own per-layer lists (`layer_types`, SmolLM3's
    `no_rope_layers`); a window with no `layer_types` applies to every layer (Mistral, Phi-3).
    The attention scale: the record's (1/sqrt(head_dim) by default), 1 where the config turns
    scaling off, and divided by i + 1 in layer i where it asks for that (GPT-2's flags)."""
    scale = _scalar(spec.attn_scale, config, 1.0 / math.sqrt(head_dim))
    scale = scale if spec.flag(spec.attn_scaled, config, default=True) else 1.0
    by_layer = spec.flag(spec.layer_scaled, config)
    raw = getattr(config, spec.sliding_window, None) if spec.sliding_window else None
    window = int(raw) if raw and getattr(config, "use_sliding_window", True) is not False else None
    types = list(getattr(config, "layer_types", None) or ["sliding_attention"] * num_layers)
    ropes = getattr(config, spec.rope_layers, None) if spec.rope_layers else None
    plans = []
    for i in range(num_layers):
        sliding = window is not None and types[i] == "sliding_attention"
        rope: str | None = None
        if spec.positions == "rope" and (ropes is None or ropes[i]):
            rope = "local" if spec.local_rotary and sliding else "global"
        plans.append(LayerPlan(window if sliding else None, rope,
                               scale / (i + 1) if by_layer else scale))
    return tuple(plans)


def static_rope_limit(config: Any) -> int | None:
    """RoPE tables are baked into the graph for positions [0, max_seq). Two scalings change
    with the sequence's length in transformers: `dynamic` (NTK) rescales past the original
    context and `longrope` (Phi-3/4) switches short -> long factors there (re-rotating what
    came before). Up to that length both are fixed, so a static cache is exact: that length is
    the limit (the default max_seq stays under it; a larger --max-seq is refused)."""
    scaling = getattr(config, "rope_scaling", None) or {}
    if scaling.get("rope_type", scaling.get("type")) not in ("dynamic", "longrope"):
        return None
    limit = (getattr(config, "original_max_position_embeddings", None)
             or scaling.get("original_max_position_embeddings") or config.max_position_embeddings)
    return int(limit)
