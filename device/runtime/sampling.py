"""Token choice: greedy, or temperature / top-k / top-p sampling from a seeded generator.

Each request owns its numpy Generator, so a given seed reproduces the same tokens whatever
else the daemon is running.

No accepted input can make the probabilities NaN (the daemon validates temperature and top_p,
device/serve/openai_api.py, and this is the second line): logits are shifted by their maximum
BEFORE dividing by the temperature, so the best token's score is exactly 0 and every other is
<= 0 whatever the temperature (a tiny one gives -inf, exp(-inf) = 0, never inf - inf); the
maximum token always keeps probability 1 before normalising, so the sum is >= 1. Logits that are
themselves NaN or infinite (a broken engine) fall back to the argmax of the finite ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a token already generated
    frequency_penalty: float = 0.0  # ... and this, times how often it was generated

    @property
    def greedy(self) -> bool:
        return not self.temperature > 0.0  # NaN counts as greedy too

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def penalize(logits: np.ndarray, counts: np.ndarray, params: SamplingParams) -> np.ndarray:
    """OpenAI's definition over the generated tokens (as vLLM applies it):
    logits[t] - count[t] * frequency_penalty - (count[t] > 0) * presence_penalty.
    logits [V] float32, counts [V] int32 -> a new [V] float32 (the backend's buffer is left alone)."""
    seen = counts > 0
    out = logits.astype(np.float32, copy=True)
    out -= counts.astype(np.float32) * np.float32(params.frequency_penalty)
    out[seen] -= np.float32(params.presence_penalty)
    return out


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """logits [V] float32 -> token id."""
    if params.greedy:
        # argmax of the float32 row: float64 preserves the order, so this is the token the
        # float64 path below picks, without its [V] copy (per row of every decode step).
        # argmax returns the first NaN when there is one: only then is the slow path needed.
        best = int(np.argmax(logits))
        if not np.isnan(logits[best]):
            return best
    z = logits.astype(np.float64)
    if not np.isfinite(z).all():
        z = np.nan_to_num(z, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
        if not np.isfinite(z).any():
            return 0  # nothing to choose from; any id ends in the stop checks or max_tokens
    if params.greedy:
        return int(np.argmax(z))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = (z - z.max()) / params.temperature  # <= 0 everywhere, 0 at the best token
    z[np.isnan(z)] = -np.inf  # -inf - max (a masked token) stays out
    z[int(np.argmax(z))] = 0.0
    if params.top_k and params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        keep = nucleus(p, params.top_p)
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    # what Generator.choice(V, p=p) does, without its O(V) checks of p (it is a distribution
    # by construction): the same one draw from rng, so the same token for the same seed
    cdf = np.cumsum(p)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest set of likeliest tokens whose mass reaches top_p (ties: lower id first), as
    ids in that order: what a stable argsort of -p gives, without sorting all V (SmolLM2's
    49,152: ~4 ms a token, more than an int8 decode step). Only the k likeliest are sorted,
    k doubling until the set ends on a token likelier than every one left out (then no token
    outside could come before it in the full order either); usually the first k does."""
    V = p.shape[0]
    k = min(V, 256)
    while k < V:
        top = np.argpartition(-p, k - 1)[:k]  # the k likeliest, in no order
        top = top[np.lexsort((top, -p[top]))]  # by probability, then id: the stable order
        cut = int(np.searchsorted(np.cumsum(p[top]), top_p))
        if cut < k - 1 and p[top[cut]] > p[top[k - 1]]:
            return top[:cut + 1]
        k *= 2
    order = np.argsort(-p, kind="stable")
    return order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability under the model (OpenAI's `logprobs`): the
    log-softmax of the raw logits, before penalties, grammar mask and temperature, as vLLM
    reports them by default. top: the k likeliest tokens there, best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """logits [V] -> the chosen token's log-probability and the k likeliest (id, logprob)."""
    z = np.nan_to_num(logits.astype(np.float64), nan=-np.inf, posinf=np.finfo(np.float64).max)
    z -= z.max()
    with np.errstate(divide="ignore"):
        lp = z - np.log(np.exp(z).sum())
    top: tuple[tuple[int, float], ...] = ()
    if k > 0:
        best = np.argpartition(-lp, k - 1)[:k]
        best = best[np.argsort(-lp[best], kind="stable")]
        top = tuple((int(t), float(lp[t])) for t in best)
    return TokenLogprob(token, float(lp[token]), top)
