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

    hidden, heads = int(need(n.hidden)), int(need(n.heads))
    kv = getattr(config, n.kv_heads, None) if n.kv_heads else None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = getattr(config, n.intermediate, None) or 4 * hidden  # gpt2: n_inner None = 4 * n_embd
    num_layers = int(need(n.num_layers))
    window = resolve(spec, config, num_layers, int(head_dim)).window if spec.task == DECODER else None
    return ModelDims(
        model_type=spec.model_type,
        num_layers=num_layers, hidden=hidden, heads=heads,
        kv_heads=int(kv or heads), head_dim=int(head_dim), intermediate=int(inter),
        vocab_size=int(need(n.vocab)), max_positions=int(need(n.max_positions)),
        norm_eps=float(need(n.norm_eps)),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        rope_theta=float(getattr(config, "rope_theta", 10000.0)) if spec.positions == "rope" else None,
        sliding_window=window,
        mlp_matrices=3 if spec.layout.gated else 2,
    )
