"""bench/kernels.py measures the kernels it names: its MatMulNBits graphs compute x @ W for the
weights they hold (4- and 8-bit, both accuracy levels, within int8 rounding of the activations
at level 4), and its attention graph runs with the caches bound in place. Times belong to the
bench, not the suite."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from bench.kernels import _session, attention_ms, product_model


def dequantized(model, i: int, K: int, N: int, bits: int) -> np.ndarray:
    """W [K, N] of MatMulNBits product i: blocks of 32 along K, low bits first, zero point
    2^(bits-1) (the operator's default when none is given)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q, s = inits[f"q{i}"], inits[f"s{i}"].reshape(N, -1)
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(N, q.shape[1], -1)
    values = (q.astype(np.float32) - 2 ** (bits - 1)) * s[:, :, None]
    return values.reshape(N, -1)[:, :K].T


@pytest.mark.parametrize("bits, accuracy", [(4, 0), (4, 4), (8, 0), (8, 4)])
def test_products_compute_x_times_their_weights(bits: int, accuracy: int) -> None:
    K, N, M = 64, 48, 3
    model = product_model(K, N, bits, accuracy)
    x = np.random.default_rng(2).standard_normal((M, K), dtype=np.float32)
    ys = _session(model, 1).run(None, {"x": x})
    for i in (0, 7):
        want = x @ dequantized(model, i, K, N, bits)
        tol = 1e-4 if accuracy == 0 else 0.02  # level 4 rounds x to int8 per block
        assert np.abs(ys[i] - want).max() <= tol * np.abs(want).max(), (i, bits, accuracy)


def test_fp32_products_are_matmuls() -> None:
    model = product_model(16, 8, None)
    x = np.ones((2, 16), np.float32)
    w = numpy_helper.to_array(model.graph.initializer[0])
    assert np.allclose(_session(model, 1).run(None, {"x": x})[0], x @ w, atol=1e-5)


def test_attention_graph_runs_as_the_bench_binds_it() -> None:  # the caches bound as outputs too
    assert attention_ms(S=32, B=2, past=8, fp16=False, threads=1, repeat=1) > 0
