"""Prompt-lookup drafting (n-gram speculation): guess the next tokens of a request by finding
where its last few tokens occurred before, in the prompt or the output so far, and proposing
what followed them there. The model then verifies the guess in one multi-token step
(device/serve/scheduler.py); a guess only ever saves steps, the output is the model's own.

    lookup = PromptLookup(prompt_ids)       # indexes the prompt once
    lookup.push(token)                      # every token the request outputs
    draft = lookup.draft(4)                 # [] or up to 4 tokens to verify

The index maps each n-gram (n = MIN_NGRAM..MAX_NGRAM) to the end of its most recent occurrence
that has a continuation, so a lookup is MAX_NGRAM - MIN_NGRAM + 1 dict probes, and a push that
many inserts: no scan of the context per token. Longer matches are tried first (they predict
better); a match shorter than MIN_NGRAM proposes nothing, because a wrong draft costs a wider
step for nothing (see the README's measurements of the ≤ 3 % cost on plain generation).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from device.runtime.backend import DecoderBackend
from device.runtime.generate import prefill

MAX_NGRAM = 3  # the longest suffix looked up
MIN_NGRAM = 2  # the shortest suffix that may propose a draft


class PromptLookup:
    """The tokens of one request (prompt, then output) and an index of their n-grams."""

    def __init__(self, tokens: Iterable[int] = (), max_ngram: int = MAX_NGRAM,
                 min_ngram: int = MIN_NGRAM) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram ({min_ngram}) <= max_ngram ({max_ngram})")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        # n-gram -> e: tokens[e - n:e] is its most recent occurrence with a continuation tokens[e]
        self._ends: dict[tuple[int, ...], int] = {}
        for t in tokens:
            self.push(t)

    def push(self, token: int) -> None:
        """Append one token; the n-grams that end just before it now have a continuation."""
        t, e = self.tokens, len(self.tokens)
        for n in range(self.min_ngram, min(self.max_ngram, e) + 1):
            self._ends[tuple(t[e - n:e])] = e
        t.append(int(token))

    def draft(self, k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest
        suffix (MAX_NGRAM down to MIN_NGRAM tokens) seen before; [] when none was."""
        t = self.tokens
        if k < 1:
            return []
        for n in range(min(self.max_ngram, len(t)), self.min_ngram - 1, -1):
            e = self._ends.get(tuple(t[len(t) - n:]))
            if e is not None:  # e <= len(t) - 1: at least one token follows
                out = t[e:e + k]
                period = len(t) - e  # the match ran into the suffix itself: a repeating run
                while len(out) < k:  # ... so what follows the suffix repeats it
                    out.append(out[len(out) - period])
                return out
        return []


# A verify step's logits equal single steps' up to float rounding where the kernels treat each
# token on its own (fp32 SmolLM2-135M: max |diff| 4e-5 over logits of magnitude ~25), and exactly
# where the backend runs one-token steps with a spare token (convert/spare_token.py). Graphs where
# rounding grows (int8/int4 MatMulNBits without the spare: ~0.8) or that quantize activations
# per tensor over the whole step (int8 dynamic quantization: ~1.0) would let a draft change the
# greedy output, so drafting is refused for them (probe below).
VERIFY_TOLERANCE = 1e-3


def verify_step_deviation(backend: DecoderBackend, k: int) -> float:
    """max |logits difference| between k+1 one-token steps and the same tokens as one step of
    k+1, on slot 0 after a short random prompt (run before serving: writes no request's rows)."""
    rng = np.random.default_rng(0)
    k = max(1, min(k, backend.max_seq - 4))
    n = min(8, backend.max_seq - k - 2)
    ids = rng.integers(0, backend.vocab_size, n + k + 1).tolist()
    prefill(backend, ids[:n], 0)
    single = [backend.step(np.array([[t]], np.int64), np.array([[n + i]], np.int64), [0])[0, -1].copy()
              for i, t in enumerate(ids[n:])]
    multi = backend.step(np.array([ids[n:]], np.int64), (n + np.arange(k + 1, dtype=np.int64))[None], [0])
    return max(float(np.abs(a - b).max()) for a, b in zip(single, multi[0]))
