"""The IO contract of an exported graph: the one thing host and device must agree on.

Decoder graphs ("static-kv-v1")
-------------------------------
The *runtime* owns a fixed-capacity cache per layer; the graph never allocates or returns it.

    inputs
      input_ids        int64  [batch, seq]                        tokens processed this step
      position_ids     int64  [batch, seq]                        their absolute positions; row b
                                                                  covers position_ids[b, 0] ..
                                                                  position_ids[b, 0] + seq - 1
      logits_index     int64  [n_logits]                          which of the seq positions get
                                                                  logits: [seq-1] for a prefill,
                                                                  arange(seq) for perplexity
      past_key.{i}     float  [batch, kv_heads, max_seq, head_dim]  layer i's cache (static max_seq)
      past_value.{i}   float  [batch, kv_heads, max_seq, head_dim]
    outputs
      logits           float  [batch, n_logits, vocab]
      new_key.{i}      float  [batch, kv_heads, seq, head_dim]    keys of the positions processed
      new_value.{i}    float  [batch, kv_heads, seq, head_dim]
    or, in "in-place" graphs (below), instead of new_*:
      present_key.{i}  float  [batch, kv_heads, max_seq, head_dim]  the cache after this step
      present_value.{i}

Semantics. Cache entries [0, position_ids[b, 0]) of row b are valid; everything from there to
max_seq is ignored (masked), whatever it holds. Each query attends over the valid past plus the
new tokens up to and including itself (causal). After the step the runtime writes new_key.{i}
into past_key.{i}[b, :, p0 : p0 + seq, :] (and the same for values). Prefill (seq = prompt
length) and decode (seq = 1) are the same graph; batch rows are independent.

In-place graphs (CPU bundles, `cache_update: "in-place"`): attention is ONNX Runtime's fused
GroupQueryAttention, which reads only the valid prefix of each row and writes the new keys into
present_key.{i}. The runtime binds present_key.{i} to the very buffer it passes as past_key.{i};
the kernel then updates the cache in place (its share-buffer mode), so there is nothing to write
from the host. (When the runtime had to gather non-adjacent slots into a copy, it copies those
rows back.) tests/convert/test_convert.py shows both forms give the same cache and logits.
In-place graphs written since 2026-12-04 also take `spare_token` (int32 scalar): with 1
(SPARE_WHOLE), a step of batch 1 computes each token exactly as a step of several tokens would
(convert/spare_token.py); 0 leaves the graph as it was. Graphs written since 2026-12-06 also
read 2 (SPARE_AT_ATTENTION), the same spare at the attention nodes only, cheaper, and exact
where the start-up probe finds it so; older graphs read 2 as 1. The runtime feeds a form where
it runs one slot, 0 elsewhere.
In-place bundles written since 2026-12-06 also hold model.ragged.onnx: the same graph (the same
weights file) with one more input, `query_seqlens` (int32 [batch]: row b's first
query_seqlens[b] tokens are real, the rest right padding whose positions repeat the last real
one), so rows of different lengths run as one [batch, seq] step (convert/ragged.py). ONNX
Runtime 1.32 knows that input; an older one refuses the graph and the runtime loads model.onnx.
Ragged graphs marked ROW_SPARES_KEY also give, fed SPARE_AT_ATTENTION in a step of several
rows, every row of one real token a spare at the attention nodes (convert/ragged.py).

Why new slices and not an in-place update on TensorRT: TensorRT 10.3 (JetPack 6) defines no aliasing between
an input and an output of a plain engine (tensorrt_jetson.md §3.4, option A); writing the slice
from the host side is correct on both ONNX Runtime and every TensorRT 10.x, costs O(seq) per
layer, and keeps one copy of the cache. `max_seq` is a static dimension so TensorRT's
optimization profiles only vary batch and seq.

Encoder graphs ("encoder-v1")
-----------------------------
    inputs   input_ids, attention_mask[, token_type_ids]   int64 [batch, seq]
    outputs  last_hidden_state                             float [batch, seq, hidden]
Pooling (mean over attention_mask, optional L2 normalisation) is applied by the runtime as the
manifest's `pooling` record says, so the graph stays the plain exporter output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DECODER_CONTRACT: Final = "static-kv-v1"
SPARE_TOKEN: Final = "spare_token"  # in-place graphs (above); absent from older bundles
SPARE_WHOLE: Final = 1  # spare_token's value for a spare through the whole graph
SPARE_AT_ATTENTION: Final = 2  # ... for one at the attention nodes only (read as 1 by older graphs)
# the graph's metadata entry naming the forms it takes ("1,2"); absent: 1 alone (older graphs)
SPARE_FORMS_KEY: Final = "toolkit.spare_forms"
QUERY_SEQLENS: Final = "query_seqlens"  # the ragged graph's extra input (above)
# the ragged graph's metadata entry ("1") where, fed SPARE_AT_ATTENTION in a step of several
# rows, it gives each row of one real token its own spare at the attention nodes (absent: ragged
# graphs written before stop 43 (2026-12-06), whose rows carry their spare from the host)
ROW_SPARES_KEY: Final = "toolkit.row_spares"
RAGGED_MODEL_FILE: Final = "model.ragged.onnx"  # beside the bundle's model file, in-place only
ENCODER_CONTRACT: Final = "encoder-v1"
GENERIC_CONTRACT: Final = "onnx-passthrough-v1"


def past_names(num_layers: int) -> list[str]:
    """past_key.0, past_value.0, past_key.1, ... in graph input order."""
    return [f"past_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def new_names(num_layers: int) -> list[str]:
    """new_key.0, new_value.0, ... in graph output order (paired with past_names)."""
    return [f"new_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """present_key.0, present_value.0, ...: in-place graphs only, aliasing past_names."""
    return [f"present_{kv}.{i}" for i in range(num_layers) for kv in ("key", "value")]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "int64" | "float32" | "float16"
    shape: tuple[str | int, ...]  # symbolic axes are strings

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class DecoderContract:
    """The decoder contract for one model: every name and shape, derived from the dimensions."""

    num_layers: int
    kv_heads: int
    head_dim: int
    max_seq: int
    vocab_size: int
    kv_dtype: str = "float32"
    in_place: bool = False  # present_* outputs alias past_* (GroupQueryAttention graphs)

    @property
    def inputs(self) -> list[TensorSpec]:
        cache = ("batch", self.kv_heads, self.max_seq, self.head_dim)
        specs = [TensorSpec("input_ids", "int64", ("batch", "seq")),
                 TensorSpec("position_ids", "int64", ("batch", "seq")),
                 TensorSpec("logits_index", "int64", ("n_logits",))]
        return specs + [TensorSpec(n, self.kv_dtype, cache) for n in past_names(self.num_layers)]

    @property
    def outputs(self) -> list[TensorSpec]:
        new = ("batch", self.kv_heads, "seq", self.head_dim)
        cache = ("batch", self.kv_heads, self.max_seq, self.head_dim)
        specs = [TensorSpec("logits", "float32", ("batch", "n_logits", self.vocab_size))]
        if self.in_place:
            return specs + [TensorSpec(n, self.kv_dtype, cache) for n in present_names(self.num_layers)]
        return specs + [TensorSpec(n, self.kv_dtype, new) for n in new_names(self.num_layers)]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx dynamic_axes: batch and seq vary, max_seq is static."""
        axes: dict[str, dict[int, str]] = {}
        for spec in self.inputs + self.outputs:
            axes[spec.name] = {i: a for i, a in enumerate(spec.shape) if isinstance(a, str)}
        return axes

    def to_json(self) -> dict[str, object]:
        return {
            "name": DECODER_CONTRACT,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "cache_update": "in-place" if self.in_place else "host-writes-new",
            "cache_write": "past_X.{i}[b, :, p0:p0+seq, :] = new_X.{i}[b]; p0 = position_ids[b, 0]",
            "valid_past": "cache positions [0, position_ids[b, 0]) of row b",
        }


@dataclass(frozen=True)
class KVCacheLayout:
    """How the runtime lays out its cache: one K and one V buffer per layer."""

    num_layers: int
    kv_heads: int
    max_seq: int
    head_dim: int
    dtype: str = "float32"

    @property
    def bytes_per_position(self) -> int:
        """K and V of every layer for one sequence position."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * _itemsize(self.dtype)

    def bytes_for(self, slots: int) -> int:
        return self.bytes_per_position * self.max_seq * slots

    def resident_bytes(self, slots: int, runtime: str) -> int:
        """What a runtime holds for a cache of `slots`: the cache, and on TensorRT its staging
        rows too, where a step gathers slots that are not one contiguous run (every slot but
        one: device/runtime/trt_backend.py), so (2 * slots - 1) rows in all."""
        return self.bytes_for(slots + (staging_slots(slots) if runtime == "tensorrt" else 0))

    def to_json(self) -> dict[str, object]:
        return {
            "layout": "per-layer K and V, [slots, kv_heads, max_seq, head_dim]",
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "max_seq": self.max_seq,
            "head_dim": self.head_dim,
            "dtype": self.dtype,
            "bytes_per_position": self.bytes_per_position,
        }


def staging_slots(slots: int) -> int:
    """The TensorRT backend's staging rows per layer, K and V: the widest gathered batch that is
    not already in place (a run of all the slots is contiguous), so every slot but one."""
    return slots - 1


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int64": 8}[dtype]
