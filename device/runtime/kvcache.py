"""The static KV cache on the host side of an ONNX Runtime backend (gpt-fast's KVCache, in NumPy).

One K and one V buffer per layer, [slots, kv_heads, max_seq, head_dim], allocated once at load
and never reallocated. A slot is one request's row. Which entries are valid is not stored in the
cache: the runtime tracks each slot's length and passes it as position_ids (contract:
bundle/contract.py), so stale entries beyond it never need clearing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bundle.contract import KVCacheLayout
from device.runtime.procmem import check_fits


@dataclass
class HostKVBlock:
    """Positions lo..hi-1 of one slot copied out of every buffer: data [2L, Hkv, T, D] in the
    cache's dtype, buffers in the cache's order (K0, V0, K1, ...). A KVBlock (backend.py)."""

    data: np.ndarray

    @property
    def tokens(self) -> int:
        return int(self.data.shape[2])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def release(self) -> None:
        pass  # host memory: dropping the last reference frees it


def check_kv_fits(layout: KVCacheLayout, slots: int) -> None:
    """Refuse a cache of `slots` slots that this machine's free memory cannot hold. One slot is
    mapped lazily (StaticKVCache), so only several are checked. The daemon calls this before a
    store's active bundle loads too (device/serve/server.py), so that --slots is blamed, not the
    bundle."""
    if slots > 1:
        shape = (slots, layout.kv_heads, layout.max_seq, layout.head_dim)
        need = 2 * layout.num_layers * int(np.prod(shape)) * np.dtype(layout.dtype).itemsize
        check_fits(need, f"the KV cache of {slots} slots of {layout.max_seq} tokens",
                   "serve fewer slots (--slots), or convert with a smaller --max-seq")


class StaticKVCache:
    def __init__(self, layout: KVCacheLayout, slots: int) -> None:
        self.layout = layout
        self.slots = slots
        shape = (slots, layout.kv_heads, layout.max_seq, layout.head_dim)
        dtype = np.dtype(layout.dtype)
        # past_key.0, past_value.0, past_key.1, ... as the graph orders them. np.zeros maps
        # pages lazily; with several slots they are written once here, so every page is
        # committed at load: the first batched step over slots not used before page-faulted
        # their whole rows in (SmolLM2 fp32, 94 MB a slot at max_seq 2048: 0.2-2 s stalls on 2
        # cores, the first time each batch of slots decoded), and a board short of the memory
        # fails at start rather than at the eighth request. One slot stays lazy: its steps
        # touch only the positions they use (measured: +16 MB for a 256-token request), so a
        # single-stream runtime holds what its context uses (SmolLM2 int4, max_seq 2048: peak
        # RSS 284 MB, 357 committed).
        check_kv_fits(layout, slots)  # committed now (below), all of it, with several slots
        self.buffers: list[np.ndarray] = []
        for _ in range(2 * layout.num_layers):
            buf = np.zeros(shape, dtype)
            if slots > 1:
                buf.fill(0)
            self.buffers.append(buf)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    @staticmethod
    def is_run(slot_ids: Sequence[int]) -> bool:
        """Consecutive ascending slots: their rows are one view of each buffer."""
        lo = slot_ids[0]
        return list(slot_ids) == list(range(lo, lo + len(slot_ids)))

    def rows(self, slot_ids: Sequence[int]) -> tuple[list[np.ndarray], bool]:
        """The cache rows of these slots, [B, Hkv, S, D] per buffer, and whether they are views.
        A contiguous run of slots is a view (no copy); any other selection is gathered (a copy
        per step, which an in-place graph then updates instead of the cache)."""
        if self.is_run(slot_ids):
            lo = slot_ids[0]
            return [b[lo:lo + len(slot_ids)] for b in self.buffers], True
        idx = np.asarray(slot_ids)
        return [b[idx] for b in self.buffers], False

    def put_rows(self, slot_ids: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        """Copy gathered rows (from rows()) back into the cache."""
        idx = np.asarray(slot_ids)
        for buf, r in zip(self.buffers, rows):
            buf[idx] = r

    def write(self, slot_ids: Sequence[int], starts: Sequence[int], new: Sequence[np.ndarray]) -> None:
        """cache[slot, :, start:start+T, :] = new[b] for each row b (new: [B, Hkv, T, D] each)."""
        T = new[0].shape[2]
        for b, (slot, start) in enumerate(zip(slot_ids, starts)):
            for buf, n in zip(self.buffers, new):
                buf[slot, :, start:start + T, :] = n[b]

    def read_block(self, slot: int, lo: int, hi: int) -> HostKVBlock:
        """cache[slot, :, lo:hi, :] of every buffer, copied: a strided slice (Hkv rows of
        (hi-lo)*D contiguous elements each) per buffer into one packed array."""
        L = self.layout
        data = np.empty((len(self.buffers), L.kv_heads, hi - lo, L.head_dim), np.dtype(L.dtype))
        for i, buf in enumerate(self.buffers):
            data[i] = buf[slot, :, lo:hi, :]
        return HostKVBlock(data)

    def write_block(self, slot: int, lo: int, block: HostKVBlock) -> None:
        """The inverse of read_block: cache[slot, :, lo:lo+T, :] = block, every buffer."""
        T = block.tokens
        for buf, rows in zip(self.buffers, block.data):
            buf[slot, :, lo:lo + T, :] = rows
