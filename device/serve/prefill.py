"""Chunked prefill: a prompt read in pieces between the decode steps of the requests already
running, so a long prompt arriving does not stall them for its whole prefill.

    job = PrefillJob(state, prompt_ids, done=reused)    # reused: prefix-cache tokens copied in
    sizer = ChunkSizer(fixed=None)                       # None: sized by time (below)
    n = sizer.size(job.remaining)                        # tokens for this engine iteration

The engine (device/serve/scheduler.py) runs, per iteration, one chunk of the oldest waiting
prefill, then one batched decode step of the others. While nothing else decodes, a prompt is read
in one step: chunking costs a lone request nothing.

Why a time budget rather than a fixed token count (the default, `--prefill-chunk auto`): what the
others feel is the time of a chunk, and the tokens a chunk may hold for a given time differ by
10x between a Jetson GPU and two CPU cores, by model, and by where in the prompt the chunk is
(attention over what came before grows with the position). Two rules, both from measured times:

- size: a chunk aims at CHUNK_STEPS decode steps of time. Its size comes from the measured
  prefill time per token of the last chunks: n' = target / (t / n). A step costs a + b*n (a
  fixed cost, then per token), and this multiplicative rule converges to the n where a chunk
  takes the target, whatever a and b are here. A floor of MIN_CHUNK tokens keeps the prompt
  moving where the fixed cost alone exceeds the target.
- pace: prefill time is paid for by decode time, a token bucket. Each decode step earns
  CHUNK_SHARE of its time, each chunk spends its own; a chunk runs only when nothing is owed.
  So over the long prompt the others' time per output token is at most (1 + CHUNK_SHARE) times
  what it is without it, even where one chunk costs more than a decode step.

The pace is what makes the bound hold on a CPU: there every step reads all the weights once (for
SmolLM2-135M fp32, 540 MB), so a chunk of even one token costs about a decode step (measured on
2 cores: a 1-token prefill step 170 ms, a 3-row decode step 230 ms, a 16-token chunk 310-450 ms
depending on its position). A chunk in every gap would at least double every gap; paced, the
gaps that hold a chunk are as long, but they are fewer. On a GPU, where a chunk of tens of
tokens costs about a decode step, the same rules give a chunk about every other step.

Both scale with the prompts waiting: with P prompts not fully read, the share and the chunk's
target time are multiplied by max(1, P), so each waiting prompt is read at the pace one long
prompt alone gets, and the others' time per output token is at most (1 + CHUNK_SHARE * P) times
what it is without them. One long prompt arriving (P = 1) keeps the bound above. A burst of
prompts arriving together (8 requests at once: the first decodes while 7 wait) was otherwise
read at one prompt's pace, one after another: measured in-process on SmolLM2-135M fp32, 2 cores,
8 x 128-token prompts, the last stream's first token came at 5.8 s (3.6 s scaled; 2.1 s with
chunking off, which stalls the decoders for every prompt), and the first streams had finished
before the last began.

A fixed `--prefill-chunk N` takes N tokens in every iteration (no pace); 0 turns chunking off
(the prompt is read in one step, the others wait).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CHUNK_SHARE = 0.8  # prefill time allowed per unit of decode time: others' TPOT <= 1.8x
CHUNK_STEPS = 1.0  # a chunk's target time, in decode steps (the longest gap: about 2 steps)
MIN_CHUNK = 16  # tokens: the floor of a time-sized chunk
FIRST_CHUNK = 64  # tokens, before any prefill time has been measured
EMA = 0.5  # weight of the newest measurement in the running estimates


@dataclass
class PrefillJob:
    """A request that holds a slot and whose prompt is not fully in its cache yet."""

    state: Any  # the scheduler's _Slot
    prompt: np.ndarray  # [1, n] int64
    done: int  # prompt tokens in the slot's cache (prefix-cache hit + chunks run)
    reused: int = 0  # of which copied from the prefix cache
    started: bool = False  # the prefix cache was looked up (at the first step)

    @classmethod
    def of(cls, state: Any, prompt_ids: Sequence[int], reused: int) -> PrefillJob:
        return cls(state, np.asarray(prompt_ids, dtype=np.int64)[None], reused, reused)

    @property
    def total(self) -> int:
        return int(self.prompt.shape[1])

    @property
    def remaining(self) -> int:
        return self.total - self.done

    def chunk(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next n tokens (at most what remains): ids [1, n], positions [1, n], and the
        logits index [1] of its last token."""
        n = min(n, self.remaining)
        ids = self.prompt[:, self.done:self.done + n]
        pos = np.arange(self.done, self.done + n, dtype=np.int64)[None]
        return ids, pos, np.array([n - 1], dtype=np.int64)


class ChunkSizer:
    """Tokens per interleaved chunk: fixed, or sized by time (see the module docstring)."""

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.decode_s: float | None = None  # running estimate of one decode step
        self.token_s: float | None = None  # running estimate of prefill seconds per token (chunks)
        self.full_token_s: float | None = None  # the same for prompts read in one step
        self.credit = 0.0  # seconds of prefill the decode steps have paid for (<= 0: owed)
        self.demand = 1.0  # max(1, prompts waiting) at the last decode step

    @property
    def enabled(self) -> bool:
        return self.fixed != 0

    def observe_decode(self, seconds: float, waiting: int = 1) -> None:
        """A decode step took `seconds` while `waiting` prompts were not fully read."""
        self.decode_s = _ema(self.decode_s, seconds)
        self.demand = float(max(1, waiting))
        share = CHUNK_SHARE * self.demand
        self.credit = min(0.0, self.credit + share * seconds)  # no saving up while idle

    def ready(self) -> bool:
        """Whether a chunk may run in this iteration (auto: once its predecessors are paid for)."""
        return self.fixed is not None or self.credit >= 0.0

    def observe_prefill(self, tokens: int, seconds: float, chunked: bool) -> None:
        if tokens < 1:
            return
        if chunked:
            self.token_s = _ema(self.token_s, seconds / tokens)
            self.credit -= seconds
        else:
            self.full_token_s = _ema(self.full_token_s, seconds / tokens)

    def size(self, remaining: int) -> int:
        if self.fixed:
            return min(self.fixed, remaining)
        per_token = self.token_s or self.full_token_s
        if self.decode_s is None or per_token is None:
            return min(FIRST_CHUNK, remaining)
        n = int(CHUNK_STEPS * self.demand * self.decode_s / per_token)
        return min(max(n, MIN_CHUNK), remaining)

    def describe(self) -> dict[str, object]:
        return {"prefill_chunk": "off" if self.fixed == 0 else self.fixed or "auto",
                "prefill_credit_ms": round(self.credit * 1e3, 3),
                "decode_step_ms": None if self.decode_s is None else round(self.decode_s * 1e3, 3),
                "prefill_demand": round(self.demand, 3),
                "chunk_tokens_now": None if not self.enabled else self.size(1 << 30)}


def _ema(old: float | None, new: float) -> float:
    return new if old is None else EMA * new + (1 - EMA) * old
