"""The device install: `pip install edge-toolkit` with no extras, into a fresh venv, serves, takes
deploys, streams and benchmarks, and carries none of the conversion stack; its requirements
resolve to binary wheels for both JetPack generations (tools/resolve_wheels.py).

The venv is made once for the module with Python 3.10 where this machine has it (JetPack 6's
Python: the whole device path then runs on 3.10), `python -m venv`, a non-editable install of a copy of the
working tree: what git would carry, so the package list in pyproject.toml is what is proved).
Everything it runs is its own `toolkit` command, started outside the repository and without
PYTHONPATH, so nothing of the full install can leak in. The bundle is the tiny Llama of
daemon_fixtures.py, converted beforehand by the full install (the repository's interpreter).

These tests need PyPI (pip installs from it, through its cache and this machine's mirrors) and
are skipped only when PyPI cannot be reached.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from daemon_fixtures import llama_bundle, short_socket_dir, start_daemon  # noqa: F401 (fixture)

REPO = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple/pip/"
# What the device install must not bring (the [convert] and [report] extras).
HOST_ONLY = {"torch", "transformers", "optimum", "optimum-onnx", "onnx", "matplotlib",
             "safetensors", "gguf", "accelerate"}
PROMPT = "hello cat"


@pytest.fixture(scope="module")
def pypi() -> None:
    """Skip (saying why) when PyPI does not answer; everything else is the test's to pass."""
    try:
        with urllib.request.urlopen(urllib.request.Request(PYPI, method="HEAD"), timeout=15):
            pass
    except (urllib.error.URLError, OSError) as e:
        pytest.skip(f"PyPI is unreachable ({PYPI}: {e}); the device install cannot be tested")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_requirement_names() -> set[str]:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from resolve_wheels import base_requirements
    finally:
        sys.path.remove(str(REPO / "tools"))
    names = set()
    for req in base_requirements(REPO / "pyproject.toml"):
        found = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req)
        assert found, req
        names.add(_norm(found.group(0)))
    return names


def copy_source(dst: Path) -> Path:
    """The files git would carry (tracked and untracked-not-ignored): no build/, *.egg-info,
    caches or bundles, and the install never writes into the shared working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=False)
    if listed.returncode != 0:  # not a git checkout: everything but what .gitignore names
        shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".venv", "bundles"))
        return dst
    for rel in listed.stdout.decode().split("\0"):
        src = REPO / rel
        if rel and src.is_file():  # a tracked file deleted in the work tree is skipped
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


@dataclass
class Venv:
    root: Path
    python: Path
    toolkit: Path
    env: dict[str, str]
    work: Path  # the cwd of every command: outside the repository

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.toolkit), *args], cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=timeout)


def board_python() -> str:
    """The oldest Python a board runs, 3.10 (JetPack 6), when this machine has it (pyenv keeps
    3.10 beside the 3.11 the suite runs on; $DEVICE_PYTHON overrides); else this interpreter."""
    import glob

    candidates = [os.environ.get("DEVICE_PYTHON", ""), shutil.which("python3.10") or "",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python3.10")))]
    for exe in filter(None, candidates):
        ok = subprocess.run([exe, "-c", "import sys, venv; assert sys.version_info[:2] == (3, 10)"],
                            capture_output=True, timeout=60)
        if ok.returncode == 0:
            return exe
    return sys.executable


@pytest.fixture(scope="module")
def venv(pypi: None, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    root = tmp_path_factory.mktemp("device-install")
    src = copy_source(root / "src")
    where = root / "venv"
    subprocess.run([board_python(), "-m", "venv", str(where)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER", "PIP_TARGET",
                        "PIP_PREFIX")}
    env.update(VIRTUAL_ENV=str(where), PATH=f"{where / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PYTHONUNBUFFERED="1", TOOLKIT_CONFIG_DIR=str(root / "config"))
    python = where / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                              "--disable-pip-version-check", str(src)],
                             cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, f"pip install {src} failed:\n{install.stdout}\n{install.stderr}"
    work = root / "work"
    work.mkdir()
    return Venv(root, python, where / "bin" / "toolkit", env, work)


def test_the_device_install_runs_on_the_boards_python(venv: Venv) -> None:
    """Where this machine has Python 3.10 (JetPack 6's), the device install is made with it."""
    version = subprocess.run([str(venv.python), "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    assert version == ("(3, 10)" if board_python() != sys.executable else str(sys.version_info[:2]))


def test_the_device_install_has_no_conversion_stack(venv: Venv) -> None:
    probe = ("import importlib.metadata as md, json, toolkit, device, bundle, host\n"
             "print(json.dumps({'dists': sorted({d.metadata['Name'] for d in md.distributions()}),"
             " 'files': [m.__file__ for m in (toolkit, device, bundle, host)]}))")
    out = subprocess.run([str(venv.python), "-c", probe], cwd=venv.work, env=venv.env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    installed = {_norm(n) for n in found["dists"]}
    assert not installed & HOST_ONLY, f"the no-extras install brought {sorted(installed & HOST_ONLY)}"
    missing = (base_requirement_names() | {"edge-toolkit"}) - installed - {"tomli"}  # tomli: < 3.11
    assert not missing, f"not installed: {sorted(missing)}"
    for path in found["files"]:  # the venv's own copy, not the repository's
        assert Path(path).resolve().is_relative_to(venv.root.resolve()), path
    listed = subprocess.run([str(venv.python), "-m", "pip", "list", "--format", "json"],
                            cwd=venv.work, env=venv.env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert not {_norm(p["name"]) for p in json.loads(listed.stdout)} & HOST_ONLY


@dataclass
class Board:
    """The venv's `toolkit serve --store` daemon, with the tiny Llama deployed by the venv's
    `toolkit deploy`."""
    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    deploy_output: str


def _wait(socket_path: Path, proc: subprocess.Popen[bytes], log: Path, states: tuple[str, ...],
          timeout: float = 120) -> None:
    from bundle.errors import ToolkitError
    from host.client import DaemonClient, Endpoint

    client = DaemonClient(Endpoint.unix(socket_path), timeout=5)
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {proc.returncode}:\n"
                                 f"{log.read_text(errors='replace')}")
        try:
            state = client.get("/v1/status").get("state")
            if state in states:
                return
        except (ToolkitError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"the daemon is {state!r}, not {' or '.join(states)}, after {timeout} s:\n"
                         f"{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def board(venv: Venv, llama_bundle: Path) -> Iterator[Board]:  # noqa: F811
    sock_dir = short_socket_dir()  # AF_UNIX paths are short
    sock, log = sock_dir / "d.sock", venv.root / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv.toolkit), "serve", "--store", str(venv.root / "store"),
                                 "--socket", str(sock), "--threads", "1"],
                                cwd=venv.work, env=venv.env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait(sock, proc, log, ("empty", "ready"))
        added = venv.run("devices", "add", "board", f"unix://{sock}")
        assert added.returncode == 0, added.stdout + added.stderr
        deployed = venv.run("deploy", str(llama_bundle), "--device", "board")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        _wait(sock, proc, log, ("ready",))
        yield Board(proc, sock, log, deployed.stdout + deployed.stderr)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_deploy_and_stream_from_the_device_install_match_the_full_install(
        venv: Venv, board: Board, llama_bundle: Path) -> None:  # noqa: F811
    assert "smoke test passed" in board.deploy_output, board.deploy_output
    args = ["generate", "--max-tokens", "12", "--temperature", "0", PROMPT]
    on_board = venv.run(*args[:1], "--socket", str(board.socket), *args[1:])
    assert on_board.returncode == 0, on_board.stdout + on_board.stderr
    assert on_board.stdout.strip(), on_board.stderr

    full = start_daemon(llama_bundle)  # python -m toolkit serve, the repository's interpreter
    try:
        here = subprocess.run([sys.executable, "-m", "toolkit", *args[:1], "--socket",
                               str(full.socket_path), *args[1:]], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        full.stop()
    assert here.returncode == 0, here.stdout + here.stderr
    assert on_board.stdout == here.stdout  # greedy: the same tokens, streamed the same way


def test_bench_from_the_device_install_writes_the_report_and_names_the_report_extra(
        venv: Venv, board: Board) -> None:
    from bundle.benchreport import check_report

    out = venv.work / "board.json"
    run = venv.run("bench", "--socket", str(board.socket), "--prompt-lens", "8", "--gen-len", "4",
                   "--concurrency", "1", "--runs", "1", "--warmup", "1", "-o", str(out))
    both = run.stdout + run.stderr
    assert run.returncode == 0, both
    assert "TTFT p50 ms" in run.stdout and "decode tok/s" in run.stdout  # the text table
    assert "Traceback" not in both
    # no matplotlib: no plots, and one line says which extra brings them
    assert "edge-toolkit[report]" in both, both
    report = json.loads(out.read_text())
    check_report(report, str(out))
    assert report["complete"] and len(report["cells"]) == 1
    try:
        import jsonschema
    except ImportError:
        return  # check_report above is the toolkit's own reader; the schema needs the dev extra
    jsonschema.validate(report, json.loads((REPO / "docs/bench-report.schema.json").read_text()))


def test_convert_on_the_device_install_names_the_convert_extra(venv: Venv) -> None:
    run = venv.run("convert", "smollm2-135m")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "edge-toolkit[convert]" in run.stderr, run.stderr
    assert "Traceback" not in run.stdout + run.stderr


# --- the boards' wheels ---------------------------------------------------------------------------

def test_the_device_install_resolves_to_binary_wheels_on_both_jetpacks(pypi: None) -> None:
    from packaging.utils import parse_wheel_filename

    run = subprocess.run([sys.executable, str(REPO / "tools/resolve_wheels.py"), "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(run.stdout)
    wanted = base_requirement_names()
    for key, python, glibc in (("jetpack6", "3.10", 35), ("jetpack7", "3.12", 39)):
        board = result[key]
        assert board["python"] == python and board["environment"]["python_version"] == python
        names = {_norm(w["name"]) for w in board["packages"]}
        # tomli has the marker python_version < "3.11": on the 3.10 board only
        assert wanted - {"tomli"} <= names and (("tomli" in names) == (python == "3.10")), names
        assert not names & HOST_ONLY
        cp = "cp" + python.replace(".", "")
        for w in board["packages"]:
            _, _, _, tags = parse_wheel_filename(w["wheel"])
            ok = [t for t in tags if (t.platform == "any" or (
                t.platform.endswith("_aarch64") and _glibc(t.platform) <= glibc)) and (
                t.interpreter.startswith("py3") or t.interpreter == cp
                or (t.abi == "abi3" and _cp(t.interpreter) <= _cp(cp)))]
            assert ok, f"{key}: {w['wheel']} does not run on Python {python} aarch64 glibc 2.{glibc}"


def _glibc(platform: str) -> int:
    """The glibc minor a manylinux tag needs: manylinux2014 = 2.17, manylinux_2_28 = 2.28."""
    if platform.startswith("manylinux2014"):
        return 17
    found = re.match(r"manylinux_2_(\d+)_", platform)
    return int(found.group(1)) if found else 10**6


def _cp(interpreter: str) -> tuple[int, int]:
    """cp38 -> (3, 8), cp310 -> (3, 10); anything else sorts after every CPython."""
    found = re.fullmatch(r"cp(\d)(\d+)", interpreter)
    return (int(found.group(1)), int(found.group(2))) if found else (10**6, 0)
