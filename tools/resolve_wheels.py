"""Resolve the device install (`pip install edge-toolkit`, no extras) as binary wheels for the boards.

    python tools/resolve_wheels.py                 # both boards, a table each
    python tools/resolve_wheels.py --board jetpack6 --json
    python tools/resolve_wheels.py --board jetpack6 --download dist   # the wheels, for an offline board

The requirement list is read from pyproject.toml ([project].dependencies, no extras), so it cannot
drift from what pip installs. For each board pip resolves it from PyPI with `pip install --dry-run
--report` and `--only-binary=:all:` for the board's Python and every manylinux tag its glibc runs
(manylinux2014 and manylinux_2_17 up to the glibc): PyPI's metadata files are read, no wheel is
downloaded. A package without a wheel for the board fails the run (exit 1) with pip's reason.

pip evaluates environment markers (`; python_version < "3.11"`, `; platform_machine == ...`)
against the interpreter it runs on, not --python-version/--platform; this tool runs pip with the
marker environment of the board instead (python 3.10 / aarch64 / linux for JetPack 6), so
conditional dependencies - ours and those of every package below - resolve as on the board.

The machine's pip configuration (mirrors, find-links, constraints) is left out: the board installs
from PyPI, so PyPI is what is checked (--index-url to point at another index).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"


@dataclass(frozen=True)
class Board:
    name: str
    python: str  # major.minor, pip's --python-version
    python_full: str  # the distribution's Python, for python_full_version markers
    glibc: tuple[int, int]
    kernel: str

    def platforms(self) -> list[str]:
        major, minor = self.glibc
        return ["manylinux2014_aarch64", *(f"manylinux_{major}_{m}_aarch64" for m in range(17, minor + 1))]

    def marker_environment(self) -> dict[str, str]:
        return {"implementation_name": "cpython", "implementation_version": self.python_full,
                "os_name": "posix", "platform_machine": "aarch64", "platform_release": self.kernel,
                "platform_system": "Linux", "platform_version": "", "python_full_version": self.python_full,
                "platform_python_implementation": "CPython", "python_version": self.python,
                "sys_platform": "linux"}


BOARDS = {
    # Orin boards: Ubuntu 22.04 (glibc 2.35), Python 3.10, TensorRT 10.3 from apt
    "jetpack6": Board("JetPack 6 (Orin, Ubuntu 22.04)", "3.10", "3.10.12", (2, 35), "5.15.148-tegra"),
    # Thor: Ubuntu 24.04 (glibc 2.39), Python 3.12, TensorRT 10.13+ from apt
    "jetpack7": Board("JetPack 7 (Thor, Ubuntu 24.04)", "3.12", "3.12.3", (2, 39), "6.8.12-tegra"),
}

# Runs pip with the board's marker environment (argv[1], JSON); the rest of argv goes to pip.
_PIP_WITH_MARKERS = """\
import json, sys
from pip._vendor.packaging import markers
_env = json.loads(sys.argv[1])
markers.default_environment = lambda: dict(_env)
from pip._internal.cli.main import main
sys.exit(main(sys.argv[2:]))
"""
# The machine's pip settings that would mix other indexes or constraints into the answer.
_PIP_ENV_DROPPED = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX",
                    "PIP_CONSTRAINT", "PIP_REQUIREMENT", "PIP_ONLY_BINARY", "PIP_NO_BINARY",
                    "PIP_PRE", "PIP_TARGET", "PIP_PREFIX", "PIP_USER", "PIP_REQUIRE_VIRTUALENV")


class ResolveError(Exception):
    pass


def base_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """[project].dependencies of pyproject.toml: the install with no extras."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    try:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        deps = data["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise ResolveError(f"cannot read [project].dependencies from {pyproject}: {e}") from e
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ResolveError(f"{pyproject}: [project].dependencies is not a list of strings")
    return deps


def _pip(board: Board, args: list[str], index_url: str) -> subprocess.CompletedProcess[str]:
    """pip with the board's marker environment, binary wheels for its Python and platforms, from
    index_url alone."""
    env = {k: v for k, v in os.environ.items() if k not in _PIP_ENV_DROPPED}
    env["PIP_CONFIG_FILE"] = os.devnull  # no config file at all: no mirrors, no constraints
    cmd = [sys.executable, "-c", _PIP_WITH_MARKERS, json.dumps(board.marker_environment()),
           args[0], "--quiet", "--no-input", "--disable-pip-version-check",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", board.python,
           *(a for p in board.platforms() for a in ("--platform", p)),
           "--index-url", index_url, *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def _failure(board: Board, run: subprocess.CompletedProcess[str]) -> ResolveError:
    reason = "\n".join(line for line in (run.stderr + run.stdout).splitlines()
                       if line.strip() and not line.startswith("WARNING: Location"))
    return ResolveError(f"{board.name}: the requirements do not resolve to binary wheels for "
                        f"Python {board.python} / {board.platforms()[-1]}:\n{reason}")


def resolve(board: Board, requirements: list[str], index_url: str = PYPI) -> dict[str, Any]:
    """pip's installation report for `requirements` on `board`, binary wheels only."""
    with tempfile.TemporaryDirectory(prefix="resolve-wheels-") as tmp:
        report = Path(tmp) / "report.json"
        run = _pip(board, ["install", "--dry-run", "--ignore-installed", "--report", str(report),
                           # pip < 24 takes --platform only with --target; --dry-run writes nothing
                           "--target", str(Path(tmp) / "target"), *requirements], index_url)
        if run.returncode != 0 or not report.is_file():
            raise _failure(board, run)
        data: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
        return data


def download(board: Board, requirements: list[str], dest: Path, index_url: str = PYPI) -> None:
    """The wheels themselves into dest, for `pip install --no-index --find-links dest` on a board."""
    dest.mkdir(parents=True, exist_ok=True)
    run = _pip(board, ["download", "--dest", str(dest), *requirements], index_url)
    if run.returncode != 0:
        raise _failure(board, run)


def wheels(report: dict[str, Any]) -> list[dict[str, str]]:
    """name, version and wheel file of each package pip would install, by name."""
    out = []
    for item in report.get("install", []):
        url = item.get("download_info", {}).get("url", "")
        out.append({"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                    "wheel": url.rsplit("/", 1)[-1]})
    return sorted(out, key=lambda w: w["name"].lower())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--board", choices=[*BOARDS, "all"], default="all")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--index-url", default=PYPI, help=f"the index to resolve from (default {PYPI})")
    parser.add_argument("--download", type=Path, metavar="DIR",
                        help="also download the wheels into DIR (one board: give --board)")
    args = parser.parse_args(argv)
    boards = list(BOARDS) if args.board == "all" else [args.board]
    if args.download and len(boards) != 1:
        parser.error("--download needs one --board (the wheels of two boards do not share a folder)")
    result: dict[str, Any] = {}
    failed = []
    try:
        requirements = base_requirements()
    except ResolveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for key in boards:
        board = BOARDS[key]
        try:
            report = resolve(board, requirements, args.index_url)
        except (ResolveError, subprocess.TimeoutExpired) as e:
            print(f"error: {e}", file=sys.stderr)
            failed.append(key)
            continue
        found = wheels(report)
        if args.download:
            try:
                download(board, requirements, args.download, args.index_url)
            except (ResolveError, subprocess.TimeoutExpired) as e:
                print(f"error: {e}", file=sys.stderr)
                failed.append(key)
        not_wheels = [w["wheel"] for w in found if not w["wheel"].endswith(".whl")]
        if not_wheels:  # --only-binary should make this impossible; say so if it ever is not
            print(f"error: {board.name}: not wheels: {', '.join(not_wheels)}", file=sys.stderr)
            failed.append(key)
        result[key] = {"board": board.name, "python": board.python, "platforms": board.platforms(),
                       "requirements": requirements, "environment": report.get("environment", {}),
                       "packages": found}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in result.values():
            print(f"{r['board']}: Python {r['python']}, {r['platforms'][0]} .. {r['platforms'][-1]}: "
                  f"{len(r['packages'])} wheels")
            width = max(len(w["name"]) for w in r["packages"]) if r["packages"] else 0
            for w in r["packages"]:
                print(f"  {w['name']:<{width}}  {w['version']:<12} {w['wheel']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
