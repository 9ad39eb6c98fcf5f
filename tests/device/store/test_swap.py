"""device/store/swap.py: hot or cold, and how much a bundle will hold once loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bundle.errors import ToolkitError
from device.serve.config import ServeConfig
from device.store.swap import SWAP_MARGIN, plan_swap, resident_estimate

GIB = 1 << 30


def test_auto_swaps_hot_only_when_both_fit() -> None:
    assert plan_swap("auto", 1 * GIB, 4 * GIB).mode == "hot"
    tight = plan_swap("auto", 3 * GIB, 3 * GIB + SWAP_MARGIN - 1)
    assert tight.mode == "cold" and "3.00 GiB" in tight.why
    assert plan_swap("auto", 3 * GIB, 3 * GIB + SWAP_MARGIN).mode == "hot"
    assert plan_swap("auto", 3 * GIB, None).mode == "hot"  # cannot tell: as before
    assert plan_swap("hot", 9 * GIB, 1 * GIB).mode == "hot"
    assert plan_swap("cold", 1, 100 * GIB).mode == "cold"


def test_swap_setting_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match="--swap"):
        ServeConfig(bundle=tmp_path, swap="warm")


def test_resident_estimate_uses_the_plan_for_the_bundle_precision(tiny_bundle: Any, tmp_path: Path) -> None:
    bundle = tiny_bundle()
    manifest = json.loads((bundle / "manifest.json").read_text())
    estimate = resident_estimate(bundle)
    rows = [r for r in manifest["plan"]["rows"] if r["precision"] == manifest["precision"]]
    parts = rows[0]["components"]
    assert estimate == sum(parts.values()) - parts["os_reserve"] > 0
    # without a plan: the bundle's files
    manifest["plan"] = None
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps(manifest))
    assert resident_estimate(bare) == sum(e["bytes"] for e in manifest["files"].values())


class _Engine:
    """Enough of an engine for a swap to retire it."""

    closed = False

    def begin_drain(self) -> None:
        pass

    def wait_idle(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class _Runner:
    closed = False

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("what", ["new", "both"])
def test_a_cold_swap_always_leaves_switching(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              what: str) -> None:
    """Whatever raises while the new bundle loads (here a plain RuntimeError, as ONNX Runtime's
    errors are), the swap reports a failed smoke test and the daemon is not left in 'switching'
    (503 forever): the old bundle is back, or the daemon says it serves nothing."""
    from device.serve.server import Daemon

    old, new = tmp_path / "old", tmp_path / "new"
    daemon = Daemon(ServeConfig(bundle=old, swap="cold"))
    daemon.runner, daemon.engine, daemon.state = _Runner(), _Engine(), "ready"
    installed: list[Path] = []

    def load_smoked(path: Path) -> Any:
        if path == new or what == "both":
            raise RuntimeError(f"[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : no kernel in {path.name}")
        return _Runner(), None

    def install(runner: Any, path: Path) -> None:
        installed.append(path)
        daemon.runner, daemon.engine, daemon.state = runner, _Engine(), "ready"

    monkeypatch.setattr(daemon, "_load_smoked", load_smoked)
    monkeypatch.setattr(daemon, "_install", install)
    result = daemon.activate(new)
    assert not result.ok and "NOT_IMPLEMENTED" in result.detail and "\n" not in result.detail
    assert daemon.state != "switching"
    if what == "new":
        assert installed == [old] and daemon.state == "ready"
        assert daemon.failure is not None and daemon.failure.serving == "old"
    else:
        assert daemon.state == "failed" and daemon.failure is not None and daemon.failure.serving is None
    assert daemon.failure.bundle == "new"
