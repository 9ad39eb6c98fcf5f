"""Which pip extra brings which import, and the one line a command says when one is missing.

`pip install edge-toolkit` is the device install (daemon, ONNX Runtime, store, client, CLI);
the host's conversion and plotting stacks are extras. A command that reaches an import of a
package that is not installed stops with

    error: toolkit convert needs the [convert] extra (torch is not installed):
           pip install 'edge-toolkit[convert]'

on one line: toolkit/cli.py turns the ModuleNotFoundError into that ToolkitError, once, for
every command.
"""

from __future__ import annotations

import importlib.util

# top-level import name -> the extra that installs it (pyproject.toml's optional-dependencies)
EXTRAS = {
    "torch": "convert",
    "transformers": "convert",
    "optimum": "convert",
    "onnx": "convert",
    "gguf": "convert",
    "accelerate": "convert",
    "safetensors": "convert",
    "matplotlib": "report",
    "pycuda": "jetson",
}


def missing_extra(err: BaseException) -> tuple[str, str] | None:
    """(extra, package) when `err` is the import of an extra's package that is not installed;
    None for anything else (a missing submodule of an installed package is a bug, not an extra)."""
    if not isinstance(err, ModuleNotFoundError) or not err.name:
        return None
    package = err.name.split(".")[0]
    extra = EXTRAS.get(package)
    if extra is None or _installed(package):
        return None
    return extra, package


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # None in sys.modules, or a module without a spec
        return False


def install_command(extra: str) -> str:
    return f"pip install 'edge-toolkit[{extra}]'"


def needs_extra(what: str, extra: str, package: str) -> str:
    """`toolkit convert needs the [convert] extra (torch is not installed): pip install ...`"""
    return f"{what} needs the [{extra}] extra ({package} is not installed): {install_command(extra)}"


def plots_need_extra(package: str) -> str:
    """The line `toolkit bench` / `toolkit report html` print when they wrote no plots."""
    return f"the plots need the [report] extra ({package} is not installed): {install_command('report')}"
