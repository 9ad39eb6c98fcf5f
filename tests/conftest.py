"""Shared fixtures: tiny model folders and bundles, built once per test session.

Helpers that build models live in tests/tiny_models.py so other fixture modules can reuse them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from tiny_models import make_decoder, make_encoder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """tiny_dir(arch) -> a Hugging Face folder with a tiny random `arch` model (cached)."""
    cache: dict[str, Path] = {}

    def get(arch: str = "llama") -> Path:
        if arch not in cache:
            folder = tmp_path_factory.mktemp(f"hf-{arch}")
            cache[arch] = make_encoder(folder) if arch == "bert" else make_decoder(folder, arch)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_dir):
    """tiny_bundle(arch, target) -> a converted fp32 bundle of the tiny model (cached)."""
    from convert.pipeline import convert_model

    cache: dict[tuple[str, str], Path] = {}

    def get(arch: str = "llama", target: str = "cpu", batch: int = 4) -> Path:
        key = (arch, target)
        if key not in cache:
            out = tmp_path_factory.mktemp("bundles") / f"{arch}-{target}"
            seq = 0 if arch == "bert" else 64
            convert_model(str(tiny_dir(arch)), target, out, max_seq=seq or None, batch=batch)
            cache[key] = out
        return cache[key]

    return get
