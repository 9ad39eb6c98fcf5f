"""How the daemon swaps the bundle it serves for a newly deployed one.

  hot   load the new bundle beside the one being served, smoke-test it, switch, drain the old
        one in the background: no gap in service, but for a moment both are in memory.
  cold  drain and unload the served bundle first, then load and smoke-test the new one: half
        the peak memory; requests get 503 "switching" (with Retry-After) until it is up, and a
        new bundle that fails is unloaded and the old one loaded again.

`auto` (the default) swaps hot when the new bundle's resident estimate fits in what the device
has available now (MemAvailable, with the old bundle loaded) with a margin to spare, and cold
otherwise. On a Jetson the GPU's memory is this same RAM, so an 8 GB Orin Nano serving a 3 GB
model cannot also load a second 3 GB one: a hot swap there would end in the OOM killer, which
takes the daemon and the service with it. A device that cannot tell (no /proc/meminfo) swaps
hot, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundle.manifest import read_manifest

SWAP_MARGIN = 256 << 20  # left free after a hot swap's second bundle (allocator slack, page cache)


@dataclass(frozen=True)
class SwapPlan:
    mode: str  # "hot" | "cold"
    why: str


def resident_estimate(bundle: Path) -> int:
    """Bytes the bundle will hold once loaded: its fit plan's process components (weights, KV
    cache, activations, runtime; not the OS reserve) for the bundle's precision, else (encoders,
    bundles without a plan) the size of its files, which for weights-dominated bundles is what
    loading them costs."""
    manifest = read_manifest(bundle)
    row = manifest.plan.row(manifest.precision) if manifest.plan else None
    if row is not None:
        return row.components.total - row.components.os_reserve
    return sum(e.bytes for e in manifest.files.values())


def plan_swap(setting: str, need: int | None, available: int | None, margin: int = SWAP_MARGIN) -> SwapPlan:
    """Hot or cold for a swap while a bundle is being served; `need` is the new bundle's
    resident estimate, `available` what the device has now (None: unknown)."""
    gib = 1 << 30
    if setting == "hot":
        return SwapPlan("hot", "--swap hot")
    if setting == "cold":
        return SwapPlan("cold", "--swap cold")
    if need is None or available is None:
        return SwapPlan("hot", "the device's available memory is unknown")
    if need + margin <= available:
        return SwapPlan("hot", f"the new bundle needs ~{need / gib:.2f} GiB and "
                               f"{available / gib:.2f} GiB is available")
    return SwapPlan("cold", f"the new bundle needs ~{need / gib:.2f} GiB but only "
                            f"{available / gib:.2f} GiB is available beside the one being served")
