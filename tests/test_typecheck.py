"""The TensorRT modules type-check in strict mode against tensorrt-stubs, and no TensorRT API
removed in 10.x appears anywhere (tools/check_trt.sh; CI runs it through this test)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_trt_modules_pass_mypy_strict_and_use_no_removed_api():
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is missing: install the dev extra (pip install -e '.[dev]')")
    run = subprocess.run(["bash", str(ROOT / "tools/check_trt.sh")], capture_output=True, text=True,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
