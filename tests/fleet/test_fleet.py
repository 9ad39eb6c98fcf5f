"""The Ansible collection (fleet/ansible_collections/edge/toolkit), run for real with
ansible-playbook against three "boards" on this machine.

Each board is `ansible_connection=local` with its own daemon (started here: no systemd PID 1 runs
on a CI machine), store, token and address: board-1 a Unix socket, board-2 and board-3 TCP with
their own tokens. board-3's daemon runs through tests/support/deploy_harness.py, which can hold its
smoke test, so that the test kills it in the middle of a deploy.

What runs in check mode, and why: the install playbook (`--check`, toolkit_manage_service=false).
Creating the system user, the venv (pip from the wheel built here) and /etc/systemd/system/ would
change this machine, and there is no systemd to start the unit; the controller's steps of the
install (registry, token, rendering the unit with `toolkit service unit`, waiting for each
board's readiness) run for real. Deploy, status, bench, report compare and rollback run for real.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import REPO, free_port, llama_bundle, short_socket_dir  # noqa: F401
from paths import SUPPORT

COLLECTION = REPO / "fleet" / "ansible_collections" / "edge" / "toolkit"
DEPLOY_HARNESS = SUPPORT / "deploy_harness.py"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook")
RECAP = re.compile(r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)

pytestmark = pytest.mark.skipif(ANSIBLE_PLAYBOOK is None,
                                reason="ansible-core is not installed (pip install 'edge-toolkit[fleet]')")


def recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines -> {host: {ok, changed, unreachable, failed}}."""
    return {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
            for m in RECAP.finditer(output.split("PLAY RECAP")[-1])}


@dataclass
class Board:
    name: str
    root: Path
    tcp_port: int | None
    token: str
    harness: bool = False  # run through deploy_harness.py (a smoke test the test can hold)
    tls: tuple[Path, Path] | None = None  # the daemon's --tls-cert and --tls-key
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.root / "d.sock"

    @property
    def hold(self) -> Path:
        return self.root / "hold"

    def start(self) -> None:
        args = ["serve", "--store", str(self.root / "store"), "--socket", str(self.socket), "--threads", "1"]
        if self.tcp_port:
            token_file = self.root / "token"
            token_file.write_text(self.token + "\n")
            token_file.chmod(0o600)
            args += ["--tcp", f"127.0.0.1:{self.tcp_port}", "--token-file", str(token_file)]
        if self.tls:
            args += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        cmd = ([sys.executable, str(DEPLOY_HARNESS), str(self.root), *args] if self.harness
               else [sys.executable, "-m", "toolkit", *args])
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        with open(self.root / "daemon.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def address(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}" if self.tcp_port else f"unix://{self.socket}"

    def log(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Fleet:
    def __init__(self, root: Path, wheel: Path,
                 board_vars: dict[str, dict[str, str | None]] | None = None) -> None:
        """board_vars: per board, inventory variables to set (or with None, to leave out)."""
        self.root = root
        self.boards = [Board("board-1", root / "b1", None, ""),
                       Board("board-2", root / "b2", free_port(), secrets.token_urlsafe(32)),
                       Board("board-3", root / "b3", free_port(), secrets.token_urlsafe(32), harness=True)]
        for b in self.boards:
            (b.root / "store").mkdir(parents=True)
        self.fleet_dir = root / "controller"
        self.inventory = root / "inventory.ini"
        self.wheel = wheel
        bin_dir = Path(sys.executable).parent
        self.cli = str(bin_dir / "toolkit") if (bin_dir / "toolkit").exists() else "toolkit"
        lines = ["[toolkit_boards]"]
        for b in self.boards:
            fields = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                      "toolkit_address": b.address(), "toolkit_token": b.token,
                      "toolkit_tcp": f"127.0.0.1:{b.tcp_port}" if b.tcp_port else "",
                      "toolkit_venv": str(b.root / "venv"), "toolkit_etc_dir": str(b.root / "etc"),
                      "toolkit_cache_dir": str(b.root / "cache"), "toolkit_unit_dir": str(b.root / "units"),
                      "toolkit_user": "toolkit-ci"}
            fields.update((board_vars or {}).get(b.name, {}))
            fields = {k: v for k, v in fields.items() if v is not None}
            lines.append(b.name + " " + " ".join(f"{k}={v!r}" if v else f"{k}=''" for k, v in fields.items()))
        lines += ["", "[toolkit_boards:vars]", f"toolkit_fleet_dir={self.fleet_dir}",
                  f"toolkit_cli={self.cli}", f"toolkit_python={sys.executable}", f"toolkit_wheel={wheel}",
                  "toolkit_manage_service=false", "toolkit_become=false", "toolkit_ready_timeout=60"]
        self.inventory.write_text("\n".join(lines) + "\n")

    def playbook(self, name: str, *args: str, background: bool = False) -> Any:
        """ansible-playbook PLAYBOOK ARGS: CompletedProcess, or a Popen with background=True."""
        # as the README runs it: from fleet/, whose ansible.cfg finds the collection
        env = {**os.environ, "PYTHONPATH": str(REPO),  # the controller's toolkit: this checkout
               "ANSIBLE_FORKS": "5",
               "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
               "ANSIBLE_LOCAL_TEMP": str(self.root / "ansible-tmp"),
               "ANSIBLE_HOME": str(self.root / "ansible-home"), "ANSIBLE_HOST_KEY_CHECKING": "0"}
        env.pop("ANSIBLE_COLLECTIONS_PATH", None)
        env.pop("ANSIBLE_CONFIG", None)
        # a playbook of the collection by name, or a playbook file
        playbook = name if "/" in name else f"edge.toolkit.{name}"
        cmd = [str(ANSIBLE_PLAYBOOK), "-i", str(self.inventory), playbook, *args]
        cwd = str(REPO / "fleet")
        if background:
            return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)

    def wait_ready(self, board: Board, timeout: float = 60.0) -> None:
        from host.client import DaemonClient, DaemonError, Endpoint

        deadline = time.monotonic() + timeout
        client = DaemonClient(Endpoint.unix(board.socket), timeout=5)
        while time.monotonic() < deadline:
            assert board.proc is not None and board.proc.poll() is None, board.log()
            try:
                if client.request("GET", "/v1/status").status == 200:
                    return
            except DaemonError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{board.name} did not answer:\n{board.log()}")

    def active(self, board: Board) -> str | None:
        """The manifest SHA-256 the board's store has active (straight from its status)."""
        from host.client import DaemonClient, Endpoint

        record = DaemonClient(Endpoint.unix(board.socket), timeout=10).request("GET", "/v1/status").json()
        return record["bundle"].get("manifest_sha256")


def _out(done: subprocess.CompletedProcess[str]) -> str:
    return f"rc={done.returncode}\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toolkit wheel, built from this checkout as the README says (no build isolation: the
    build backend is already installed and nothing is fetched)."""
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy of the sources: setuptools writes build/ and *.egg-info into the tree it
    # builds, and a build/ left from an earlier run would ship files deleted since
    src = out / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("bundle", "device", "host", "toolkit", "convert", "quantize", "targets", "models"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    built = next(out.glob("edge_toolkit-*.whl"))
    with zipfile.ZipFile(built) as z:  # the unit template travels as package data
        assert "device/serve/toolkit.service.in" in z.namelist()
    return built


@contextmanager
def fleet_in(wheel: Path, board_vars: dict[str, dict[str, str | None]] | None = None) -> Iterator[Fleet]:
    """A Fleet in a fresh short folder (socket paths must stay short); afterwards its boards are
    killed and the folder removed."""
    root = short_socket_dir()
    f = Fleet(root, wheel, board_vars)
    try:
        yield f
    finally:
        for b in f.boards:
            b.kill()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def fleet(wheel: Path) -> Iterator[Fleet]:
    with fleet_in(wheel) as f:
        yield f


def recording_toolkit(tmp_path: Path) -> tuple[Path, Path]:
    """(a stand-in `toolkit` that appends each command line to a file instead of running, that
    file): what a playbook asked the boards to run."""
    calls, fake = tmp_path / "calls", tmp_path / "toolkit"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    return fake, calls


def second_build(bundle: Path, out: Path) -> Path:
    """The same files under another manifest (built at another time): another bundle to deploy."""
    from bundle.manifest import MANIFEST, read_manifest

    shutil.copytree(bundle, out)
    manifest = read_manifest(out)
    (out / MANIFEST).write_text(replace(manifest, created_at="2026-01-01T00:00:00Z").to_json())
    return out


def manifest_sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.slow
def test_fleet_install_deploy_kill_rerun_bench_rollback(fleet: Fleet, llama_bundle: Path) -> None:  # noqa: F811
    a = llama_bundle
    b = second_build(a, fleet.root / "bundle-b")
    for board in fleet.boards:
        board.start()
    for board in fleet.boards:
        fleet.wait_ready(board)
    b1, b2, b3 = fleet.boards

    # install: check mode (see the module docstring); the controller's steps run for real
    done = fleet.playbook("install", "--check", "--diff")
    assert done.returncode == 0, _out(done)
    r = recap(done.stdout)
    assert set(r) == {b.name for b in fleet.boards}, _out(done)
    assert all(v["failed"] == 0 and v["changed"] > 0 for v in r.values()), _out(done)  # would install
    for board in fleet.boards:  # each board's own unit, as the role would write it
        assert (fleet.fleet_dir / "boards" / board.name / "devices.json").is_file()
        exec_start = (f"+ExecStart={board.root}/venv/bin/toolkit serve --store /var/lib/toolkit/store "
                      "--socket /run/toolkit/toolkit.sock")
        exec_start += f" --tcp 127.0.0.1:{board.tcp_port} --token-file %d/token" if board.tcp_port else ""
        assert exec_start + " --drain-timeout 30\n" in done.stdout, done.stdout
    assert "+User=toolkit-ci" in done.stdout and "+Type=notify" in done.stdout
    assert not any(board.token in done.stdout for board in fleet.boards[1:])  # no_log: never shown

    # deploy A to all three; board-3 is killed in the middle of its install (smoke test held)
    b3.hold.write_text("")
    run = fleet.playbook("deploy", "-e", f"toolkit_bundle={a}", background=True)
    assert isinstance(run, subprocess.Popen)
    killed = threading.Event()

    def kill_board_3() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            if (b3.root / "smoke-started").exists():
                b3.kill()
                killed.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_board_3, daemon=True)
    killer.start()
    stdout, _ = run.communicate(timeout=180)
    killer.join(5)
    assert killed.is_set(), stdout
    assert run.returncode != 0, stdout
    r = recap(stdout)
    assert r["board-3"]["failed"] == 1, stdout
    assert r["board-1"] == {**r["board-1"], "failed": 0, "changed": 1}, stdout
    assert r["board-2"] == {**r["board-2"], "failed": 0, "changed": 1}, stdout
    assert "failed: board-3" in stdout
    assert fleet.active(b1) == fleet.active(b2) == manifest_sha(a)

    # board-3 comes back; the same deploy finishes it and changes nothing on the others
    b3.hold.unlink()
    (b3.root / "smoke-started").unlink()
    b3.harness = False
    b3.start()
    fleet.wait_ready(b3)
    done = fleet.playbook("deploy", "-e", f"toolkit_bundle={a}")
    assert done.returncode == 0, _out(done)
    r = recap(done.stdout)
    changed = tuple(r[f"board-{i}"]["changed"] for i in (1, 2, 3))
    assert changed == (0, 0, 1), _out(done)
    assert fleet.active(b3) == manifest_sha(a)

    # once more: nothing changes anywhere, and nothing is uploaded
    done = fleet.playbook("deploy", "-e", f"toolkit_bundle={a}")
    assert done.returncode == 0, _out(done)
    r = recap(done.stdout)
    assert all(v["changed"] == 0 and v["failed"] == 0 for v in r.values()) and len(r) == 3, _out(done)
    assert done.stdout.count("sent 0 bytes") == 3, done.stdout

    # status of the fleet
    done = fleet.playbook("status")
    assert done.returncode == 0, _out(done)
    assert all(v["changed"] == 0 for v in recap(done.stdout).values())
    assert done.stdout.count("ready: ") >= 3, done.stdout

    # a second bundle everywhere, then the bench and the fleet's comparison
    done = fleet.playbook("deploy", "-e", f"toolkit_bundle={b}")
    assert done.returncode == 0, _out(done)
    assert all(v["changed"] == 1 for v in recap(done.stdout).values()), _out(done)
    tiny = ["--prompt-lens", "8", "--gen-len", "4", "--concurrency", "1", "--runs", "1", "--warmup", "0",
            "--no-power"]
    bench_args = json.dumps({"toolkit_bench_args": tiny})
    done = fleet.playbook("bench", "-e", bench_args)
    assert done.returncode == 0, _out(done)
    reports = fleet.fleet_dir / "reports"
    for board in fleet.boards:
        report = json.loads((reports / f"{board.name}.json").read_text())
        assert report["complete"] and report["cells"], report
    table = (reports / "fleet-compare.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| prompt"))
    assert "| board-1 |" in header and "| board-2 | board-2/board-1 |" in header, table
    assert "| board-3 | board-3/board-1 |" in header, table
    assert "board-1: " in table and "board-3: " in table
    assert (reports / "fleet-compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # one plot too

    # roll back from B: every board serves A again; a second rollback changes nothing
    done = fleet.playbook("rollback", "-e", f"toolkit_bundle={b}")
    assert done.returncode == 0, _out(done)
    assert all(v["changed"] == 1 for v in recap(done.stdout).values()), _out(done)
    assert {fleet.active(board) for board in fleet.boards} == {manifest_sha(a)}
    done = fleet.playbook("rollback", "-e", f"toolkit_bundle={b}")
    assert done.returncode == 0, _out(done)
    r = recap(done.stdout)
    assert all(v["changed"] == 0 and v["failed"] == 0 for v in r.values()) and len(r) == 3, _out(done)
    assert {fleet.active(board) for board in fleet.boards} == {manifest_sha(a)}


def self_signed(out: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as the README makes one."""
    cert, key = out / "cert.pem", out / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=board-2", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates")
@pytest.mark.parametrize("mode", ["files", "self-signed"])
def test_fleet_install_with_tls_registers_the_pinned_https_address(mode: str, wheel: Path,
                                                                   tmp_path: Path) -> None:
    """toolkit_tls_cert/toolkit_tls_key (the operator's files), or toolkit_tls=self-signed (the
    controller makes them): the board gets both root-only beside its token, its unit runs the
    daemon with --tls-cert/--tls-key as credentials, and the controller's registry names it
    https://HOST:PORT?pin=sha256:... (the pin of that certificate), over which the install's
    readiness wait and the status reach it; plain TCP does not. A second run changes nothing.
    The role once ignored TLS altogether: tcp:// in the registry, tokens in clear text."""
    from device.serve.httpd import cert_fingerprint
    from host.client import DaemonClient, DaemonError, Endpoint

    tls = ({"toolkit_tls": "self-signed"} if mode == "self-signed"
           else dict(zip(("toolkit_tls_cert", "toolkit_tls_key"), map(str, self_signed(tmp_path)))))
    board_vars: dict[str, dict[str, str | None]] = {"board-2": {
        "toolkit_address": None,  # derived: https://ansible_host:PORT, pinned
        "ansible_host": "127.0.0.1", "toolkit_tcp_port": "{{ toolkit_tcp.split(':')[-1] }}", **tls}}
    with fleet_in(wheel, board_vars) as fleet:
        b2 = fleet.boards[1]
        etc = b2.root / "etc"
        controller = fleet.fleet_dir / "boards" / "board-2"
        cert = controller / "tls-cert.pem" if mode == "self-signed" else Path(tls["toolkit_tls_cert"])
        key = controller / "tls-key.pem" if mode == "self-signed" else Path(tls["toolkit_tls_key"])
        # the role's TLS step for real (the rest of the install changes this machine: check mode
        # below); its files root-owned, so only as root: elsewhere in check mode
        board_tls = fleet.root / "board-tls.yml"
        board_tls.write_text("- hosts: board-2\n  gather_facts: false\n  tasks:\n"
                             "    - {import_role: {name: edge.toolkit.toolkit, tasks_from: controller}}\n"
                             "    - {import_role: {name: edge.toolkit.toolkit, tasks_from: tls}}\n"
                             "  handlers:\n"
                             "    - {name: Restart toolkit, ansible.builtin.debug: {msg: restart}}\n")
        as_root = os.geteuid() == 0
        if as_root:
            etc.mkdir()
        for run in (1, 2):
            done = fleet.playbook(str(board_tls), "--diff", *([] if as_root else ["--check"]))
            assert done.returncode == 0, _out(done)
            assert key.read_text() not in done.stdout  # never shown, not even by --diff
            if as_root:
                # the cert, the key (and a made certificate, once); a second run changes nothing
                assert recap(done.stdout)["board-2"]["changed"] == ((2 + (mode == "self-signed")) if run == 1
                                                                    else 0), _out(done)
        if as_root:
            for name, mode_bits in (("tls-cert.pem", 0o644), ("tls-key.pem", 0o600)):
                st = (etc / name).stat()
                assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, mode_bits), name
            assert (etc / "tls-key.pem").read_bytes() == key.read_bytes()
            b2.tls = (etc / "tls-cert.pem", etc / "tls-key.pem")
        else:
            b2.tls = (cert, key)
        if mode == "self-signed":
            assert key.stat().st_mode & 0o077 == 0  # the controller's copy of the key: ours only

        for board in fleet.boards:
            board.start()
        for board in fleet.boards:
            fleet.wait_ready(board)
        installs = []
        for _ in range(2):
            done = fleet.playbook("install", "--check", "--diff")
            assert done.returncode == 0, _out(done)  # the readiness wait reached board-2 over TLS
            registry = (controller / "devices.json").read_bytes()
            installs.append((recap(done.stdout), registry, cert.read_bytes()))
            exec_start = (f"+ExecStart={b2.root}/venv/bin/toolkit serve --store /var/lib/toolkit/store "
                          f"--socket /run/toolkit/toolkit.sock --tcp 127.0.0.1:{b2.tcp_port} "
                          "--tls-cert %d/tls-cert --tls-key %d/tls-key --token-file %d/token "
                          "--drain-timeout 30\n")
            assert exec_start in done.stdout, done.stdout
            assert f"+LoadCredential=tls-cert:{etc}/tls-cert.pem\n" in done.stdout
            assert f"+LoadCredential=tls-key:{etc}/tls-key.pem\n" in done.stdout
            assert done.stdout.count("--tls-cert %d/tls-cert") == 1  # the other boards: no TLS
            assert key.read_text() not in done.stdout and b2.token not in done.stdout
        # the controller's side of a second run: the same registry, the same certificate
        assert installs[0] == installs[1], installs

        entry = json.loads((controller / "devices.json").read_text())["board-2"]
        pin = cert_fingerprint(cert)
        assert entry["uri"] == f"https://127.0.0.1:{b2.tcp_port}?pin={pin}", entry
        assert Path(entry["token_file"]).read_text().strip() == b2.token
        done = fleet.playbook("status")
        assert done.returncode == 0, _out(done)
        assert done.stdout.count("ready: ") + done.stdout.count("empty: ") == 3, _out(done)
        reply = DaemonClient(Endpoint.parse(entry["uri"], b2.token), timeout=10).request("GET", "/v1/status")
        assert reply.status == 200
        plain = DaemonClient(Endpoint.tcp("127.0.0.1", b2.tcp_port, b2.token), timeout=10)
        with pytest.raises((DaemonError, OSError, http.client.HTTPException)):  # a reset, not an answer
            plain.request("GET", "/v1/status")


def test_collection_passes_ansible_lint_offline() -> None:
    lint = shutil.which("ansible-lint")
    if lint is None:
        pytest.skip("ansible-lint is not installed (pip install 'edge-toolkit[fleet]')")
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(REPO / "fleet"), "NO_COLOR": "1"}
    done = subprocess.run([lint, "--offline", "-c", str(COLLECTION / ".ansible-lint"), str(COLLECTION)],
                          capture_output=True, text=True, env=env, timeout=180, cwd=str(REPO / "fleet"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Profile 'production' was required, and it passed" in done.stderr + done.stdout


def test_report_compare_names_columns_after_files() -> None:
    from bundle.errors import ToolkitError
    from host.report import _letters, compare_reports

    assert [_letters(i) for i in (0, 25, 26, 27, 51, 52)] == ["A", "Z", "AA", "AB", "AZ", "BA"]
    report = {"complete": True, "environment": {"bundle": {"name": "m"}, "target": {"name": "cpu"}},
              "cells": [], "memory": {}}
    text = compare_reports([("x/orin-01.json", report), ("x/thor-01.json", report)], ["orin-01", "thor-01"])
    assert "| orin-01 | thor-01 | thor-01/orin-01 |" in text
    with pytest.raises(ToolkitError, match="one distinct label per report"):
        compare_reports([("a/b.json", report), ("c/b.json", report)], ["b", "b"])


@pytest.mark.parametrize(("extra", "says"), [
    ("toolkit_wheel=", "toolkit_wheel must name the toolkit wheel on the controller"),
    ("toolkit_user=Bad", "--user 'Bad' is not a valid user or group name"),
    ("toolkit_tls_cert=cert.pem", "toolkit_tls_cert and toolkit_tls_key go together"),
    ("toolkit_tls_key=key.pem", "toolkit_tls_cert and toolkit_tls_key go together"),
    ("toolkit_tls=yes", "toolkit_tls is 'yes': leave it empty"),
    ("toolkit_tls=self-signed toolkit_tls_cert=cert.pem", "then do not set toolkit_tls_cert"),
    ("toolkit_tls=self-signed toolkit_address=tcp://127.0.0.1:8443", "leave toolkit_address empty"),
    ("toolkit_tls=self-signed toolkit_tcp=''", "toolkit_tcp must be HOST:PORT (it is '')"),
    ("toolkit_tls_cert=/no/cert.pem toolkit_tls_key=/no/key.pem toolkit_tcp=127.0.0.1:1 toolkit_address=",
     "must both be PEM files on the controller"),
], ids=["no-wheel", "bad-user", "cert-no-key", "key-no-cert", "bad-tls", "self-signed-and-cert",
        "tls-tcp-address", "tls-no-tcp", "no-tls-files"])
def test_install_with_a_bad_variable_fails_clearly_before_changing_a_board(
        extra: str, says: str, tmp_path: Path) -> None:
    # an empty toolkit_wheel once copied the controller's working folder to the board; a bad
    # user was created on the board before `toolkit service unit` refused it; a certificate
    # without its key (or TLS the controller could not reach) must stop before anything is made
    (tmp_path / "edge_toolkit-0.1.0-py3-none-any.whl").write_bytes(b"")  # exists; never installed
    with fleet_in(tmp_path / "edge_toolkit-0.1.0-py3-none-any.whl") as fleet:
        done = fleet.playbook("install", "--check", "-e", extra)
        assert done.returncode != 0 and says in done.stdout, _out(done)
        assert all(r["failed"] == 1 and r["changed"] == 0 for r in recap(done.stdout).values()), _out(done)


def test_bench_playbook_takes_plot_false_as_written_on_the_command_line(tmp_path: Path) -> None:
    # `-e toolkit_fleet_plot=false` (as bench.yml says) is the string "false", which Jinja takes
    # as true: the compare still asked for --plot, which fails without matplotlib. A stand-in
    # toolkit records each command line instead of running it.
    fake, calls = recording_toolkit(tmp_path)
    with fleet_in(tmp_path / "unused.whl") as fleet:
        done = fleet.playbook("bench", "-e", f"toolkit_cli={fake}", "-e", "toolkit_fleet_plot=false")
        assert done.returncode == 0, _out(done)
        compare = [line for line in calls.read_text().splitlines() if line.startswith("report compare")]
        assert len(compare) == 1 and "--plot" not in compare[0], compare


def test_bench_playbook_refuses_bench_args_given_as_a_string(tmp_path: Path) -> None:
    fake, calls = recording_toolkit(tmp_path)
    with fleet_in(tmp_path / "unused.whl") as fleet:
        done = fleet.playbook("bench", "-e", f"toolkit_cli={fake}",
                              "-e", "toolkit_bench_args=--prompt-lens 128")
        assert done.returncode != 0, _out(done)
        # was: "can only concatenate list (not "_AnsibleTaggedStr") to list", on every board
        assert "toolkit_bench_args must be a list of `toolkit bench` options" in done.stdout, _out(done)
        assert not calls.exists() or "bench" not in calls.read_text()