"""The TensorRT modules type-check in strict mode against tensorrt-stubs, and no TensorRT API
removed in 10.x appears anywhere (tools/check_trt.sh; CI runs it through this test); the
device side type-checks for Python 3.10 (mypy-device.ini)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_trt_modules_pass_mypy_strict_and_use_no_removed_api():
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is missing: install the dev extra (pip install -e '.[dev]')")
    run = subprocess.run(["bash", str(ROOT / "tools/check_trt.sh")], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_device_side_passes_mypy_for_python_3_10():
    """bundle/, device/, host/ and toolkit/ - what `pip install edge-toolkit` runs on a board -
    type-check with Python 3.10's standard library (JetPack 6): mypy-device.ini."""
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is missing: install the dev extra (pip install -e '.[dev]')")
    run = subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy-device.ini"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
