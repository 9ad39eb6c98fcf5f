"""The generation loop for one request on one slot: prefill, then decode one token at a time.

    tokens = generate(backend, prompt_ids, max_new_tokens=32)      # greedy, slot 0

It is the loop that parity checks at convert time and that the daemon's scheduler runs per
slot, so what parity proves is what the device does.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from bundle.errors import ToolkitError
from device.runtime.backend import DecoderBackend
from device.runtime.sampling import SamplingParams, sample

GREEDY = SamplingParams()


def prefill(backend: DecoderBackend, prompt_ids: Sequence[int], slot: int = 0,
            chunk: int | None = None) -> np.ndarray:
    """Run the prompt through the graph (in chunks of `chunk` tokens to bound activation
    memory); returns the logits of the last prompt token, [V]."""
    n = len(prompt_ids)
    if n == 0:
        raise ToolkitError("the prompt is empty")
    if n >= backend.max_seq:
        raise ToolkitError(f"the prompt has {n} tokens; the cache holds {backend.max_seq}",
                           hint="shorten the prompt or convert with a larger --max-seq")
    ids = np.asarray(prompt_ids, dtype=np.int64)[None]
    chunk = chunk or n
    logits = np.empty(0)
    for start in range(0, n, chunk):
        part = ids[:, start:start + chunk]
        pos = np.arange(start, start + part.shape[1], dtype=np.int64)[None]
        last = np.array([part.shape[1] - 1], dtype=np.int64)  # logits for the last token only
        logits = backend.step(part, pos, [slot], last)[0, -1].copy()
    return logits


def generate(backend: DecoderBackend, prompt_ids: Sequence[int], max_new_tokens: int,
             params: SamplingParams = GREEDY, stop_ids: Iterable[int] = (),
             slot: int = 0) -> Iterator[int]:
    """Yield up to max_new_tokens tokens (fewer when a stop token comes or the cache is full).
    A stop token is not yielded."""
    rng = np.random.default_rng(params.seed)
    stop = set(stop_ids)
    logits = prefill(backend, prompt_ids, slot)
    pos = len(prompt_ids)
    budget = min(max_new_tokens, backend.max_seq - pos)
    for i in range(budget):
        token = sample(logits, params, rng)
        if token in stop:
            return
        yield token
        if i + 1 == budget:
            return
        step_ids = np.array([[token]], dtype=np.int64)
        logits = backend.step(step_ids, np.array([[pos]], dtype=np.int64), [slot])[0, -1]
        pos += 1
