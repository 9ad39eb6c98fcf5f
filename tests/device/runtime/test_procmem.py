"""Memory the daemon would take and the machine does not have: refused in one line before it is
taken (device/runtime/procmem.check_fits), where the kernel's OOM killer would otherwise end the
daemon without a word: the KV cache of many slots, a prefix-cache budget beyond the RAM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bundle.contract import KVCacheLayout
from bundle.errors import ToolkitError
from device.runtime import procmem
from device.runtime.kvcache import StaticKVCache
from device.serve.config import MAX_SLOTS, ServeConfig


def meminfo(tmp_path: Path, available_kib: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       99999999 kB\nMemAvailable:   {available_kib} kB\n")
    return path


def test_check_fits_reads_memavailable(tmp_path: Path) -> None:
    info = meminfo(tmp_path, 1024)  # 1 MiB
    procmem.check_fits(1 << 20, "one MiB", "-", info)
    with pytest.raises(ToolkitError, match="two MiB needs 2 MiB; this machine has 1 MiB available"):
        procmem.check_fits(2 << 20, "two MiB", "ask for less", info)
    procmem.check_fits(1 << 40, "anything", "-", tmp_path / "no-such-file")  # not Linux: no check


def test_a_kv_cache_beyond_the_memory_is_refused_before_it_is_allocated(monkeypatch: Any) -> None:
    layout = KVCacheLayout(30, 3, 2048, 64, "float32")  # SmolLM2-135M: 94 MiB a slot
    monkeypatch.setattr(procmem, "mem_available", lambda meminfo=None: 500 << 20)
    allocated: list[tuple[int, ...]] = []
    monkeypatch.setattr(np, "zeros", lambda shape, dtype: allocated.append(shape))
    with pytest.raises(ToolkitError, match=r"KV cache of 8 slots of 2048 tokens needs 720 MiB") as e:
        StaticKVCache(layout, 8)
    assert "--slots" in (e.value.hint or "") and allocated == []


def test_one_slot_is_lazy_and_not_checked(monkeypatch: Any) -> None:
    """One slot's pages are mapped as its positions are written (kvcache.py), so a one-slot cache
    larger than what is free now still starts; only what several slots commit is checked."""
    monkeypatch.setattr(procmem, "mem_available", lambda meminfo=None: 1 << 20)
    assert StaticKVCache(KVCacheLayout(2, 1, 64, 4, "float32"), 1).slots == 1


def test_slots_have_a_ceiling() -> None:
    assert ServeConfig(bundle=Path("b"), slots=MAX_SLOTS).slots == MAX_SLOTS
    with pytest.raises(ToolkitError, match=f"--slots must be 1 to {MAX_SLOTS}"):
        ServeConfig(bundle=Path("b"), slots=100_000)


def test_a_prefix_cache_budget_beyond_the_memory_is_refused(tiny_bundle: Any, monkeypatch: Any) -> None:
    from device.runtime.runner import load_bundle
    from device.serve.scheduler import Scheduler

    runner = load_bundle(tiny_bundle(), slots=2, threads=1)
    try:
        monkeypatch.setattr(procmem, "mem_available", lambda meminfo=None: 256 << 20)
        with pytest.raises(ToolkitError, match="prefix cache of 1024 MiB needs 1,024 MiB") as e:
            Scheduler(runner.backend, runner.tokenizer, prefix_cache_bytes=1 << 30)
        assert "--prefix-cache-mb" in (e.value.hint or "")
        Scheduler(runner.backend, runner.tokenizer, prefix_cache_bytes=64 << 20).close()
    finally:
        runner.close()


def test_a_prefix_cache_budget_beyond_the_memory_is_refused_before_loading(tmp_path: Path,
                                                                           monkeypatch: Any) -> None:
    """A flag's error, found before any bundle is read (this one does not exist): with --store it
    used to be found when the engine was made, blamed on the active bundle (a rollback tried,
    the daemon up serving nothing)."""
    from device.serve.server import serve

    monkeypatch.setattr(procmem, "mem_available", lambda meminfo=None: 256 << 20)
    config = ServeConfig(bundle=tmp_path / "no-such-bundle", socket=tmp_path / "d.sock",
                         prefix_cache_mb=1024)
    with pytest.raises(ToolkitError, match="prefix cache of 1024 MiB needs 1,024 MiB") as e:
        serve(config)
    assert "--prefix-cache-mb" in (e.value.hint or "") and not (tmp_path / "d.sock").exists()
