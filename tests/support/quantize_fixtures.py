"""Fixtures for the quantize tests: tiny random models converted to fp32 bundles, once per session.

The tiny Llama has hidden 64 and intermediate 128 (every K a multiple of the 32-wide quantization
blocks), head_dim 16 (ONNX Runtime's GroupQueryAttention on CPU bundles), and a tied LM head like
SmolLM2's, so the shared-table paths run. Weights are random, so the gate's figures mean little:
tests that want a bundle written pass permissive thresholds; the gate itself is tested by making
it fail on purpose.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from tiny_models import make_decoder, make_encoder  # noqa: E402

LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
MAX_SEQ = 64
# permissive gate limits for random weights (the figures are still computed and recorded)
LOOSE = {"max_ppl_increase": 10.0, "min_top1": 0.0, "min_greedy": 0.0, "min_cosine": -1.0}


@pytest.fixture(scope="session")
def q_fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """q_fp32_bundle(kind, target) -> a converted fp32 bundle ("llama" or "bert"), cached."""
    from convert.pipeline import convert_model

    cache: dict[tuple[str, str], Path] = {}
    folders: dict[str, Path] = {}

    def get(kind: str = "llama", target: str = "cpu") -> Path:
        if kind not in folders:
            folder = tmp_path_factory.mktemp(f"q-hf-{kind}")
            folders[kind] = make_encoder(folder) if kind == "bert" else make_decoder(folder, "llama",
                                                                                    **LLAMA)
        key = (kind, target)
        if key not in cache:
            out = tmp_path_factory.mktemp("q-bundles") / f"{kind}-{target}-fp32"
            convert_model(str(folders[kind]), target, out, max_seq=None if kind == "bert" else MAX_SEQ)
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def q_bundle(q_fp32_bundle: Callable[[str, str], Path],
             tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """q_bundle(kind, target, precision, fmt=None, grid=None) -> a quantized bundle (loose
    gate), cached; fmt overrides the target's format, grid the int4 grid (None: the gate's
    choice, which is the symmetric grid under these loose limits)."""
    from quantize import quantize_bundle
    from quantize.formats import QuantOptions

    cache: dict[tuple[Any, ...], Path] = {}

    def get(kind: str, target: str, precision: str, fmt: str | None = None,
            grid: str | None = None) -> Path:
        key = (kind, target, precision, fmt, grid)
        if key not in cache:
            out = tmp_path_factory.mktemp("q-out") / f"{kind}-{target}-{precision}"
            quantize_bundle(q_fp32_bundle(kind, target), precision, out=out, thresholds=LOOSE,
                            samples=4, seq_len=32, fmt=fmt, options=QuantOptions(int4_grid=grid))
            cache[key] = out
        return cache[key]

    return get
