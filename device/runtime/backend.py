"""The interface every runtime backend implements (ONNX Runtime here, TensorRT in trt_backend.py).

A decoder backend owns its static KV cache (host memory for ONNX Runtime, device memory for
TensorRT) sized `slots x max_seq`, allocated once when it is created. One call runs one step of
the static-kv-v1 contract for some slots and writes their new keys/values into the cache:

    logits = backend.step(input_ids [B,T], position_ids [B,T], slot_ids [B], logits_index [K],
                          lengths [B])                # -> [B,K,V] float32 (K = T by default)

Row b of the step belongs to slot slot_ids[b]; its tokens sit at position_ids[b, 0] .. +T-1.
`lengths` (backends with ragged_steps only): row b's first lengths[b] tokens are real, the rest
right padding (ids 0, positions repeating its last real one); default T for every row.
The returned array may be a reused buffer: read it before the next step.

`spare_token`: while True, a step of batch 1 also runs one spare token after its last (where
the graph takes one: convert/spare_token.py), so that a one-token step computes each value
exactly as a longer step does, in the form `spare_form` says (bundle/contract.py: SPARE_WHOLE,
through the whole graph; SPARE_AT_ATTENTION, at the attention nodes only); backends whose
graphs take none ignore both.

Two copies serve the daemon's prefix cache (device/serve/prefix_cache.py), in the cache's own
dtype and memory (host arrays for ONNX Runtime, device memory for TensorRT):

    block = backend.read_kv(slot, lo, hi)       # keys/values of positions lo..hi-1 of a slot
    backend.write_kv(slot, lo, block)           # the same rows into (another) slot at lo
    block.release()                             # its memory back (device memory on TensorRT)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np


class KVBlock(Protocol):
    """Keys and values of `tokens` consecutive positions of one slot, for every layer, copied
    out of the cache; `nbytes` is the memory it holds."""

    @property
    def tokens(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def release(self) -> None: ...


@runtime_checkable
class DecoderBackend(Protocol):
    kind: str  # "onnxruntime" | "tensorrt"
    slots: int
    max_seq: int
    vocab_size: int
    spare_token: bool
    spare_form: int
    spare_forms: tuple[int, ...]  # the forms the graph takes (none: it takes no spare)
    ragged_steps: bool  # step() takes `lengths` (ONNX Runtime's ragged graph, convert/ragged.py)
    # ... and, fed SPARE_AT_ATTENTION with several rows, gives each row of one real token its
    # spare at the attention nodes (convert/ragged.py: row spares; False: rows carry their own)
    row_spares: bool

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, slot_ids: Sequence[int],
             logits_index: np.ndarray | None = None,
             lengths: np.ndarray | None = None) -> np.ndarray: ...

    def read_kv(self, slot: int, lo: int, hi: int) -> KVBlock: ...

    def write_kv(self, slot: int, lo: int, block: KVBlock) -> None: ...

    def kv_cache_bytes(self) -> int: ...

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


@runtime_checkable
class EncoderBackend(Protocol):
    kind: str

    def encode(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...  # last_hidden_state

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...
