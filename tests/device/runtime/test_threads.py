"""--threads beyond the machine's cores is refused in one line (device/runtime/threads.check_threads):
the daemon once started 10,000 threads while loading, deaf to SIGTERM, on a mistyped value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from bundle.errors import ToolkitError
from device.runtime.threads import check_threads
from device.serve.config import ServeConfig


def test_threads_from_one_to_the_cores() -> None:
    cores = os.cpu_count() or 1
    for ok in (None, 1, cores):
        check_threads(ok)
        assert ServeConfig(bundle=Path("b"), threads=ok).threads == ok
    for bad in (0, cores + 1, 10_000):
        with pytest.raises(ToolkitError, match=f"--threads must be 1 to {cores}") as e:
            ServeConfig(bundle=Path("b"), threads=bad)
        assert "leave --threads (and TOOLKIT_THREADS) out" in (e.value.hint or "")


def test_every_onnx_runtime_session_checks_them(tiny_bundle: Any, monkeypatch: Any) -> None:
    """Not only the daemon's flag: bench, generate and TOOLKIT_THREADS reach the same session options."""
    from device.runtime.runner import load_bundle

    monkeypatch.setenv("TOOLKIT_THREADS", str((os.cpu_count() or 1) + 1))
    with pytest.raises(ToolkitError, match="--threads must be 1 to"):
        load_bundle(tiny_bundle(), slots=1)
