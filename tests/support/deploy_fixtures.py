"""Fixtures of the deploy tests (tests/host/test_deploy.py, tests/device/store/test_store_hardening.py):
bundle variants of the tiny Llama and store daemons, in a thread or as a real `toolkit serve --store`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import serve_store_in_thread
from paths import REPO

from bundle.contract import RAGGED_MODEL_FILE
from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, hash_tree, read_manifest
from device.serve.serial_link import LinkDown

HARNESS = Path(__file__).with_name("deploy_harness.py")


@pytest.fixture(scope="module")
def base_bundle(tiny_bundle: Any) -> Path:
    return Path(tiny_bundle("llama", "cpu"))


def variant(src: Path, dst: Path, name: str, extra_bytes: int = 0, break_model: bool = False,
            runtime: str | None = None) -> Path:
    """A copy of src with another identity (source.name), optionally an extra random file, a
    model that cannot load, or another target runtime; the manifest is re-hashed."""
    shutil.copytree(src, dst)
    if extra_bytes:
        (dst / "extra.bin").write_bytes(os.urandom(extra_bytes))
    if break_model:  # both forms of the graph (a daemon with several slots loads the ragged one)
        for graph in (dst / "model.onnx", dst / RAGGED_MODEL_FILE):
            if graph.exists():
                graph.write_bytes(b"this is not an onnx graph" * 100)
    manifest = read_manifest(dst)
    manifest.source = dataclasses.replace(manifest.source, name=name)
    if runtime:
        manifest.target = dataclasses.replace(manifest.target, runtime=runtime,
                                              name="jetson-orin-nano-8gb", family="jetson")
    manifest.files = hash_tree(dst)
    (dst / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def bundles(base_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {
        "a": variant(base_bundle, root / "a", "tiny-a"),
        "b": variant(base_bundle, root / "b", "tiny-b", extra_bytes=20 << 20),  # 3 HTTP chunks
        "broken": variant(base_bundle, root / "broken", "tiny-broken", break_model=True),
        "trt": variant(base_bundle, root / "trt", "tiny-trt", runtime="tensorrt"),
    }


def same_files(bundle: Path, installed: Path) -> None:
    """Byte-identical: every file's SHA-256 and the manifest itself."""
    assert hash_tree(installed) == hash_tree(bundle)
    assert (installed / MANIFEST).read_bytes() == (bundle / MANIFEST).read_bytes()


@dataclass
class StoreDaemon:
    store: Path
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def active_dir(self) -> Path | None:
        data = json.loads((self.store / "active").read_text()) if (self.store / "active").exists() else None
        return self.store / "bundles" / data["dir"] if data else None


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("TOOLKIT_TOKEN", raising=False)
    return tmp_path / "config"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """start(**serve_store kwargs) -> a store daemon in a thread of this process."""
    daemons: list[StoreDaemon] = []

    def run(store: Path | None = None, **kwargs: Any) -> StoreDaemon:
        store = store or tmp_path / f"store{len(daemons)}"
        daemon = StoreDaemon(store, *serve_store_in_thread(store, **kwargs))
        daemons.append(daemon)
        return daemon

    yield run
    for d in daemons:
        d.close()


@dataclass
class Served:
    """A `toolkit serve --store` process (python -m toolkit serve), on a short socket path."""

    proc: subprocess.Popen[bytes]
    socket: Path
    store: Path
    log: Path

    def api(self) -> Any:
        from host.client import DaemonClient, Endpoint

        return DaemonClient(Endpoint.unix(self.socket), timeout=30)

    def serving(self) -> str:
        """The model the daemon answers with, after proving it generates."""
        api = self.api()
        model = api.get("/v1/models")["data"][0]["id"]
        out = api.post("/v1/completions", {"prompt": "hello world", "max_tokens": 3})
        assert out["usage"]["completion_tokens"] >= 1
        return str(model)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(store, *args, hold=None) -> a real daemon, ready for deploys (killed at teardown)."""
    procs: list[Served] = []

    def run(store: Path, *args: str, hold: Path | None = None) -> Served:
        sock_dir = Path(tempfile.mkdtemp(prefix="tkdeploy-", dir="/tmp"))  # AF_UNIX paths are short
        sock = sock_dir / "d.sock"
        log = tmp_path / f"daemon{len(procs)}.log"
        base = [sys.executable, str(HARNESS), str(hold), "serve"] if hold else \
               [sys.executable, "-m", "toolkit", "serve"]
        cmd = [*base, "--store", str(store), "--socket", str(sock), "--threads", "1", *args]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        served = Served(proc, sock, store, log)
        procs.append(served)
        from host.transfer import HttpDeployClient

        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}:\n{served.text()}")
            try:
                HttpDeployClient(f"unix://{sock}").hello()  # listening (the deploy routes answer
                if served.api().get("/v1/status")["state"] in ("ready", "empty", "failed"):  # (while
                    return served  # loading); failed: up, serving nothing, status says why
            except (LinkDown, ToolkitError):
                pass
            assert time.monotonic() < deadline, served.text()
            time.sleep(0.05)

    yield run
    for served in procs:
        if served.proc.poll() is None:
            served.proc.kill()
        served.proc.wait(10)
        shutil.rmtree(served.socket.parent, ignore_errors=True)
