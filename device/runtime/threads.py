"""--threads, checked once for every ONNX Runtime session and the daemon's flags (no numpy here:
`toolkit serve --help` imports the daemon's config, and help must stay light)."""

from __future__ import annotations

import os

from bundle.errors import ToolkitError


def check_threads(threads: int | None) -> None:
    """--threads: None (all cores) or 1 to this machine's cores. More threads than cores only
    contend (ONNX Runtime's workers spin), and a mistyped 10000 had the daemon start 10,000
    threads while loading the bundle, deaf to SIGTERM until it was killed."""
    cores = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cores:
        raise ToolkitError(f"--threads must be 1 to {cores}, the cores of this machine (got {threads})",
                           hint="leave --threads (and TOOLKIT_THREADS) out to use all of them")


def env_threads() -> int | None:
    """TOOLKIT_THREADS (None: unset or empty), the default of --threads; a value that is not a
    whole number is one line here, not a ValueError traceback from deep in the bundle's load."""
    value = os.environ.get("TOOLKIT_THREADS", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ToolkitError(f"TOOLKIT_THREADS={value!r} is not a number of threads",
                           hint="set it to 1 up to the cores of this machine, or unset it") from None
