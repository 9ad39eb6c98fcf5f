"""The prefix cache: KV rows of recent prompt prefixes, kept so a request that starts the same way
(a shared system prompt, a RAG template, the earlier turns of a chat) copies them into its slot
instead of computing them again.

    cache = PrefixCache(budget_bytes=64 << 20)
    blocks = cache.lookup(prompt_ids)                  # longest cached prefix, whole blocks
    for i, block in enumerate(blocks): backend.write_kv(slot, i * cache.block_tokens, block)
    ... prefill prompt_ids[len(blocks) * cache.block_tokens:] ...
    cache.insert(prompt_ids, lambda lo, hi: backend.read_kv(slot, lo, hi))

Token-exact, in blocks of `block_tokens`. Block k of a sequence (tokens k*B .. (k+1)*B-1) is keyed
by a hash chaining every token from 0 to its end (blake2b of the previous block's key and its own
tokens), so finding block k means the whole prefix up to it matches - a hit is always an exact
prefix, never a block of the same tokens at another position or after other tokens. (A 128-bit
key: a collision is as likely as a corrupted read.) A lookup never covers the prompt's last
token: its logits are what the request samples first, so at least that token is prefilled.

Why blocks of 32 tokens: a prompt reuses its shared prefix rounded down to a block, so at most 31
shared tokens are computed again (on SmolLM2-135M, a few ms of prefill); smaller blocks cost more
copies per hit (one strided copy per layer, K and V, per block: 1080 numpy copies for 600 tokens
of a 30-layer model at 32, about 3 ms) and more keys to hash.

Eviction is LRU within the byte budget, and it evicts leaves first: every lookup and insert marks
a chain's blocks used from the deepest to the first, so a block is always more recent than the
blocks that extend it, and the oldest block is the end of some chain - evicting it never strands
the blocks after it. The memory is the backend's block memory, in the KV cache's dtype (host
arrays for ONNX Runtime, device memory for TensorRT); `bytes` counts it.

One engine thread owns a cache (no locks); HTTP threads only read the stats (plain ints).
The cache belongs to the engine of one served bundle: a swapped-in bundle gets a new engine, and
with it an empty cache.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from device.runtime.backend import KVBlock

BLOCK_TOKENS = 32


@dataclass
class PrefixCacheStats:
    """Since this cache was created (one served bundle)."""

    hits: int = 0  # lookups that reused at least one block
    misses: int = 0  # lookups that reused nothing
    tokens_reused: int = 0  # prompt tokens copied instead of computed
    inserted: int = 0  # blocks stored
    evicted: int = 0  # blocks dropped for room


def block_keys(tokens: Sequence[int], n_blocks: int, block_tokens: int) -> list[bytes]:
    """The chained keys of the first n_blocks blocks of tokens: key k covers tokens 0..(k+1)*B-1."""
    ids = np.asarray(tokens[:n_blocks * block_tokens], dtype=np.int64)
    keys, prev = [], b""
    for k in range(n_blocks):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(ids[k * block_tokens:(k + 1) * block_tokens].tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


class PrefixCache:
    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError(f"block_tokens must be at least 1 (got {block_tokens})")
        self.budget_bytes, self.block_tokens = max(0, budget_bytes), block_tokens
        self._blocks: OrderedDict[bytes, KVBlock] = OrderedDict()  # oldest first
        self.bytes = 0
        self.stats = PrefixCacheStats()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def entries(self) -> int:
        return len(self._blocks)

    def lookup(self, prompt: Sequence[int]) -> list[KVBlock]:
        """The blocks of the longest cached prefix of prompt, in order; never its last token."""
        if not self.enabled:
            return []
        keys = block_keys(prompt, (len(prompt) - 1) // self.block_tokens, self.block_tokens)
        found: list[KVBlock] = []
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        self._touch(keys[:len(found)])
        if found:
            self.stats.hits += 1
            self.stats.tokens_reused += len(found) * self.block_tokens
        else:
            self.stats.misses += 1
        return found

    def insert(self, tokens: Sequence[int], read: Callable[[int, int], KVBlock]) -> int:
        """Store the whole blocks of tokens not stored yet, reading each block's rows with
        read(lo, hi) (positions lo..hi-1 of the slot that holds tokens); returns blocks stored."""
        if not self.enabled:
            return 0
        keys = block_keys(tokens, len(tokens) // self.block_tokens, self.block_tokens)
        stored = 0
        for k, key in enumerate(keys):
            if key in self._blocks:
                continue
            lo = k * self.block_tokens
            block = read(lo, lo + self.block_tokens)
            if block.nbytes > self.budget_bytes:  # one block does not fit: nothing will
                block.release()
                break
            self._blocks[key] = block
            self.bytes += block.nbytes
            stored += 1
            if self.bytes > self.budget_bytes and self._bytes_of(keys[:k + 1]) > self.budget_bytes:
                break  # this chain alone fills the budget: its deeper blocks would evict its own
        self.stats.inserted += stored
        self._touch(keys)
        self._evict()
        return stored

    def clear(self) -> None:
        """Release every block (the engine stops, or its backend is about to close)."""
        for block in self._blocks.values():
            block.release()
        self._blocks.clear()
        self.bytes = 0

    def status(self) -> dict[str, int]:
        return {**asdict(self.stats), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "entries": self.entries, "block_tokens": self.block_tokens}

    def _touch(self, keys: Sequence[bytes]) -> None:
        """Mark a chain used, deepest block first: each block ends up more recent than those
        that extend it (see the module docstring)."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def _bytes_of(self, keys: Sequence[bytes]) -> int:
        return sum(self._blocks[k].nbytes for k in keys if k in self._blocks)

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes and self._blocks:
            _, block = self._blocks.popitem(last=False)
            block.release()
            self.bytes -= block.nbytes
            self.stats.evicted += 1
