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


@pytest.mark.parametrize("value,message", [("abc", "TOOLKIT_THREADS='abc' is not a number"),
                                           ("10000", "--threads must be 1 to")])
def test_toolkit_threads_is_checked_before_anything_loads(value: str, message: str, tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    """Not when the bundle loads (this one does not exist): 'abc' was a ValueError traceback from
    load_bundle, and with --store either value was blamed on the active bundle."""
    from device.serve.server import serve

    monkeypatch.setenv("TOOLKIT_THREADS", value)
    config = ServeConfig(bundle=tmp_path / "no-such-bundle", socket=tmp_path / "d.sock")
    with pytest.raises(ToolkitError, match=message):
        serve(config)
    ServeConfig(bundle=Path("b"), threads=1).check_machine()  # the flag wins over the variable
