"""ModelDims: the normalised dimensions every later stage reads (never the raw HF config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from bundle.errors import ToolkitError
from models.registry import ArchSpec


@dataclass(frozen=True)
class ModelDims:
    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    tie_embeddings: bool
    rope_theta: float | None = None
    sliding_window: int | None = None

    @property
    def params(self) -> int:
        """Matmul + embedding parameters (norms and biases ignored: < 0.1 %)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp_mats = 3 if self.model_type in ("llama", "mistral", "qwen2") else 2
        mlp = mlp_mats * self.hidden * self.intermediate
        emb = self.vocab_size * self.hidden * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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
    window = getattr(config, spec.sliding_window, None) if spec.sliding_window else None
    if getattr(config, "use_sliding_window", True) is False:
        window = None
    return ModelDims(
        model_type=spec.model_type,
        num_layers=int(need(n.num_layers)), hidden=hidden, heads=heads,
        kv_heads=int(kv or heads), head_dim=int(head_dim), intermediate=int(inter),
        vocab_size=int(need(n.vocab)), max_positions=int(need(n.max_positions)),
        norm_eps=float(need(n.norm_eps)),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", True)),
        rope_theta=float(getattr(config, "rope_theta", 10000.0)) if spec.positions == "rope" else None,
        sliding_window=int(window) if window else None,
    )
