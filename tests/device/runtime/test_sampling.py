"""Sampling: the fast paths give the token the plain definition gives, for the same seed.

The reference below is sample() as it was before the nucleus was found by a partial sort
(device/runtime/sampling.py `nucleus`) and the draw made without Generator.choice's checks of p:
a full stable argsort of -p for top_p (~4 ms a token on SmolLM2's 49,152 ids, which made a
sampled top_p 0.95 stream through the daemon 1.67x slower at int8), and rng.choice(V, p=p).
"""

from __future__ import annotations

import numpy as np
import pytest

from device.runtime.sampling import SamplingParams, nucleus, sample


def reference(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    z = logits.astype(np.float64)
    if not np.isfinite(z).all():
        z = np.nan_to_num(z, nan=-np.inf, posinf=np.finfo(np.float64).max, neginf=-np.inf)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z = (z - z.max()) / params.temperature
    z[np.isnan(z)] = -np.inf
    z[int(np.argmax(z))] = 0.0
    if params.top_k and params.top_k < z.shape[0]:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z)
    p /= p.sum()
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.shape[0], p=p))


def logits_case(g: np.random.Generator, case: int) -> np.ndarray:
    V = int(g.choice([5, 300, 4096, 49152]))
    lg = (g.standard_normal(V) * float(g.choice([0.1, 1.0, 3.0, 30.0]))).astype(np.float32)
    if case % 5 == 0:  # ties, many of them, across any partition boundary
        lg[g.integers(0, V, size=max(1, V // 3))] = lg[0]
    if case % 7 == 0:  # masked tokens (a grammar's -inf)
        lg[g.integers(0, V, size=max(1, V // 4))] = -np.inf
    return lg


@pytest.mark.parametrize("top_p, top_k", [(1.0, 0), (0.9, 0), (0.95, 40), (0.5, 0), (0.999, 0), (0.1, 5)])
def test_the_same_seed_draws_the_same_token_as_the_plain_definition(top_p: float, top_k: int) -> None:
    g = np.random.default_rng(int(top_p * 1000) + top_k)
    for case in range(150):
        lg = logits_case(g, case)
        params = SamplingParams(temperature=float(g.choice([0.2, 0.8, 1.5])), top_p=top_p, top_k=top_k)
        seed = int(g.integers(0, 1 << 31))
        got = sample(lg, params, np.random.default_rng(seed))
        assert got == reference(lg, params, np.random.default_rng(seed))


def test_the_nucleus_is_the_stable_sorts_prefix_even_when_ties_straddle_the_partition() -> None:
    p = np.full(1000, 1.0)
    p[:3] = 50.0  # a few likely ids, then 997 tied ones: the first k by id must be the ones kept
    p /= p.sum()
    for top_p in (0.01, 0.2, 0.5, 0.9):
        order = np.argsort(-p, kind="stable")
        want = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        np.testing.assert_array_equal(nucleus(p, top_p), want)
