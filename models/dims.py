"""ModelDims (a bundle/manifest.py record) read from a Hugging Face config through an ArchSpec."""

from __future__ import annotations

from typing import Any

from bundle.errors import ToolkitError
from bundle.manifest import ModelDims
from models.arch import DECODER, ArchSpec
from models.params import resolve


def dims_from_config(spec: ArchSpec, config: Any) -> ModelDims:
    """Read the fields named by spec.names; a missing field is a ToolkitError naming it."""
    n = spec.names

    def need(attr: str) -> Any:
        value = getattr(config, attr, None)
        if value is None:
            raise ToolkitError(f"{spec.model_type} config has no {attr!r}",
                               hint="the model's config.json is incomplete or not a "
                                    f"{spec.model_type} config")
        return value

    def count(attr: str, value: Any) -> int:
        """A dimension: a positive whole number (1024 or 1024.0), else a ToolkitError naming it."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 1 \
                or value != int(value):
            raise ToolkitError(f"{spec.model_type} config: {attr} is {value!r}; it must be a "
                               "positive whole number",
                               hint="the model's config.json is damaged or not a "
                                    f"{spec.model_type} config")
        return int(value)

    def number(attr: str) -> float:
        value = need(attr)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ToolkitError(f"{spec.model_type} config: {attr} is {value!r}; it must be a "
                               "number of 0 or more", hint="the model's config.json is damaged")
        return float(value)

    hidden, heads = count(n.hidden, need(n.hidden)), count(n.heads, need(n.heads))
    kv = getattr(config, n.kv_heads, None) if n.kv_heads else None
    head_dim = count("head_dim", getattr(config, "head_dim", None) or hidden // heads)
    inter = getattr(config, n.intermediate, None) or 4 * hidden  # gpt2: n_inner None = 4 * n_embd
    num_layers = count(n.num_layers, need(n.num_layers))
    window = resolve(spec, config, num_layers, head_dim).window if spec.task == DECODER else None
    return ModelDims(
        model_type=spec.model_type,
        num_layers=num_layers, hidden=hidden, heads=heads,
        kv_heads=count(n.kv_heads or n.heads, kv or heads), head_dim=head_dim,
        intermediate=count(n.intermediate, inter),
        vocab_size=count(n.vocab, need(n.vocab)),
        max_positions=count(n.max_positions, need(n.max_positions)),
        norm_eps=number(n.norm_eps),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        rope_theta=float(getattr(config, "rope_theta", 10000.0)) if spec.positions == "rope" else None,
        sliding_window=window,
        mlp_matrices=3 if spec.layout.gated else 2,
    )
