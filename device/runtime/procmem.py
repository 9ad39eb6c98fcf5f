"""Process and system memory read from /proc: one reader for the daemon, the bench and the
TensorRT backend. On a Jetson the GPU's memory is this same RAM, so MemAvailable (not
cuda.mem_get_info, which under-reports once the page cache fills: tensorrt_jetson.md §6.4) is
what the device really has left."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bundle.errors import ToolkitError

MEMINFO = Path("/proc/meminfo")
SELF_STATUS = Path("/proc/self/status")


def proc_kib(path: Path, keys: Sequence[str]) -> dict[str, int]:
    """"Key:   1234 kB" lines of /proc/meminfo or /proc/self/status -> {key: bytes}; {} where
    the file is missing or unreadable (not Linux)."""
    out: dict[str, int] = {}
    try:
        for line in Path(path).read_text(encoding="ascii").splitlines():
            key, _, rest = line.partition(":")
            if key in keys:
                out[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def mem_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable in bytes, or None without /proc/meminfo."""
    return proc_kib(meminfo, ("MemAvailable",)).get("MemAvailable")


def check_fits(need: int, what: str, hint: str, meminfo: Path = MEMINFO) -> None:
    """Refuse, in one line, to take `need` bytes that MemAvailable says this machine does not
    have (nothing to check without /proc/meminfo): what the kernel would otherwise answer with
    its OOM killer, the daemon gone without a word."""
    available = mem_available(meminfo)
    if available is not None and need > available:
        raise ToolkitError(f"{what} needs {need / 2**20:,.0f} MiB; this machine has "
                           f"{available / 2**20:,.0f} MiB available", hint=hint)


def peak_rss(pid: int | None = None) -> int:
    """VmHWM in bytes of process `pid` (None: this one), the peak of its own memory map: unlike
    getrusage's ru_maxrss, which Linux carries across fork + exec, it starts afresh at exec, so
    a child of a parent that peaked higher (a bench that quantized first) reports its own. Falls
    back to ru_maxrss for this process where /proc is missing; 0 for another process there."""
    got = proc_kib(SELF_STATUS if pid is None else Path(f"/proc/{pid}/status"), ("VmHWM",))
    if "VmHWM" in got:
        return got["VmHWM"]
    if pid is not None:
        return 0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def process_rss() -> tuple[int, int]:
    """(current RSS, peak RSS = VmHWM) of this process in bytes; psutil and getrusage where
    /proc is missing."""
    got = proc_kib(SELF_STATUS, ("VmRSS", "VmHWM"))
    if "VmRSS" in got and "VmHWM" in got:
        return got["VmRSS"], got["VmHWM"]
    import psutil  # type: ignore[import-untyped]  # (no stubs; not a TensorRT-path dependency)

    return int(psutil.Process().memory_info().rss), peak_rss()  # peak: getrusage's, as there
