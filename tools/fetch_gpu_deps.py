"""Download what tools/gpu_check.py installs on a GPU machine that has no network: the pycuda
sdist (built there against its CUDA) and the pure-Python wheels around it.

    python tools/fetch_gpu_deps.py                 # -> tools/gpu_deps/ (git-ignored)
    python tools/gpu_check.py OUT                  # on the GPU machine, beside tools/gpu_deps/

Why these: pycuda has no wheels (it compiles against the machine's CUDA); building it without
network needs setuptools and wheel (a Python 3.12 venv has neither) and pip's
--no-build-isolation; numpy is the machine's. pycuda.driver itself imports none of pytools,
platformdirs or mako; pytools and its pure dependencies come along for the pycuda modules that
do (compiler, gpuarray). pytools' siphash24 (a C extension, for persistent caches) and mako are
left out: the check never imports them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DEFAULT_DEST = Path(__file__).parent / "gpu_deps"
PYCUDA = "pycuda==2026.1"  # the sdist; 2026.1 is the newest release when this was written
# pure-Python wheels (py3-none-any), pinned so two fetches carry the same bytes
WHEELS = ("setuptools==84.2.1", "wheel==0.48.0", "pytools==2026.1.1", "platformdirs==4.14.9",
          "typing_extensions==4.16.0")
PYTHON = "3.12"  # the GPU machine's Python


def download_commands(dest: Path, python: str = sys.executable) -> list[list[str]]:
    """The pip calls, in order: the sdist (`--no-binary pycuda`, not `:all:`: pip prepares the
    sdist's metadata in an isolated build environment, whose setuptools and wheel come as wheels;
    with `:all:` it would try to build numpy from source for that, and without isolation it needs
    `wheel` in this interpreter), then the wheels for Python 3.12 on any platform (pure Python
    only)."""
    pip = [python, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    return [[*pip, "--no-binary", "pycuda", PYCUDA],
            [*pip, "--only-binary", ":all:", "--python-version", PYTHON, "--implementation", "py",
             "--platform", "any", *WHEELS]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", nargs="?", type=Path, default=DEFAULT_DEST)
    args = ap.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for cmd in download_commands(args.dest):
        if subprocess.run(cmd).returncode:
            print(f"error: {' '.join(cmd)} failed", file=sys.stderr)
            return 1
    names = sorted(p.name for p in args.dest.iterdir())
    print(f"{args.dest}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
