"""The daemon as a systemd service: the rendered unit, sd_notify, the watchdog, --socket-group.

No systemd PID 1 runs here, so the unit file is checked with `systemd-analyze verify`, and the
daemon is started the way systemd would start it: the exact ExecStart= command line and
Environment= of the rendered unit (its /run, /var/lib and credential paths moved into a temporary
folder, and PYTHONPATH added so that this checkout's code runs), with a NOTIFY_SOCKET this test
listens on and WATCHDOG_USEC set.
"""

from __future__ import annotations

import grp
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from daemon_fixtures import REPO, free_port, llama_bundle, short_socket_dir  # noqa: F401

from bundle.errors import ToolkitError
from device.serve.notify import Notifier, Watchdog
from device.serve.unit import UnitOptions, exec_start, render_unit

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def unit_settings(text: str, section: str = "Service") -> dict[str, list[str]]:
    """KEY -> values of one section of a unit file (comments and blank lines skipped)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def venv_with_toolkit() -> str:
    """The prefix of this Python, whose bin/toolkit is the installed console script."""
    if not (Path(sys.prefix) / "bin" / "toolkit").exists():
        pytest.skip(f"{sys.prefix}/bin/toolkit is not installed (pip install -e .)")
    return sys.prefix


# --- the unit file ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opts", [
    {},
    {"tcp": "0.0.0.0:8443", "socket_group": "toolkit"},
    {"tcp": "0.0.0.0:8443", "tls_cert": "/etc/toolkit/cert.pem", "tls_key": "/etc/toolkit/key.pem",
     "store": "/srv/toolkit-store", "serial": "/dev/ttyGS0"},
], ids=["unix-only", "tcp-group", "tls-serial-store"])
def test_unit_passes_systemd_analyze_verify(tmp_path: Path, opts: dict[str, str]) -> None:
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    text = render_unit(UnitOptions(venv=venv_with_toolkit(), **opts))  # type: ignore[arg-type]
    unit = tmp_path / "toolkit.service"
    unit.write_text(text)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    complaints = [ln for ln in done.stderr.splitlines() if "toolkit.service" in ln]
    assert done.returncode == 0 and not complaints, done.stderr
    s = unit_settings(text)
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"]
    assert s["NoNewPrivileges"] == ["yes"] and s["ProtectSystem"] == ["strict"]
    assert s["StateDirectory"] == ["toolkit"] and s["RuntimeDirectory"] == ["toolkit"]
    assert {"video", "render"} <= set(s["SupplementaryGroups"][0].split())
    assert "DeviceAllow" in s and s["DevicePolicy"] == ["closed"]
    assert int(s["WatchdogSec"][0]) > 0
    assert float(s["TimeoutStopSec"][0]) > 30  # the drain (30 s) fits inside it
    if "tcp" in opts:
        assert "LoadCredential" in s and "%d/token" in s["ExecStart"][0]
    if "store" in opts:
        assert s["ReadWritePaths"] == [opts["store"]]
    if "serial" in opts:
        assert f"{opts['serial']} rw" in s["DeviceAllow"]


def test_service_unit_command_prints_the_unit_and_refuses_bad_paths() -> None:
    from toolkit.cli import main

    runner = CliRunner()
    done = runner.invoke(main, ["service", "unit", "--tcp", "0.0.0.0:8443", "--socket-group", "robots"])
    assert done.exit_code == 0, done.output
    assert "ExecStart=/opt/toolkit/venv/bin/toolkit serve --store /var/lib/toolkit/store" in done.output
    assert "--socket-group robots" in done.output and "robots" in done.output.split("SupplementaryGroups=")[1]
    bad = runner.invoke(main, ["service", "unit", "--store", "/var/lib/my store"])
    assert bad.exit_code != 0 and "absolute path of plain characters" in bad.output
    venv = runner.invoke(main, ["service", "unit", "--venv", "venv"])  # each path's own example
    assert venv.exit_code != 0 and "hint: e.g. --venv /opt/toolkit/venv" in venv.output
    with pytest.raises(ToolkitError, match="go together"):
        render_unit(UnitOptions(tcp="0.0.0.0:1", tls_cert="/etc/c.pem"))


def test_a_serial_only_unit_hands_the_daemon_its_token() -> None:
    """--serial without --tcp: the token was neither a credential nor on ExecStart=, so the daemon
    the unit starts refused to (--serial needs --token-file) and --token-file was ignored."""
    from device.serve.config import ServeConfig
    from toolkit.cli import main

    opts = UnitOptions(serial="/dev/ttyGS0", token_file="/etc/toolkit/serial-token")
    s = unit_settings(render_unit(opts))
    assert s["LoadCredential"] == ["token:/etc/toolkit/serial-token"]
    argv = exec_start(opts)
    assert argv[argv.index("--token-file") + 1] == "%d/token"
    ServeConfig(bundle=None, store=Path(argv[argv.index("--store") + 1]), serial="/dev/ttyGS0",
                token_file=Path("/run/credentials/toolkit.service/token"))  # what the daemon accepts
    assert "LoadCredential" not in unit_settings(render_unit(UnitOptions()))  # no listener: no token
    done = CliRunner().invoke(main, ["service", "unit", "--token-file", "/etc/toolkit/token"])
    assert done.exit_code == 1 and "error: --token-file guards the --tcp and --serial" in done.output
    assert "hint: drop --token-file" in done.output


def test_a_socket_outside_the_runtime_directory_is_writable_and_hidden_paths_are_refused() -> None:
    # ProtectSystem=strict: a socket folder other than /run/NAME is read-only unless named
    s = unit_settings(render_unit(UnitOptions(socket="/srv/api/toolkit.sock", store="/srv/store")))
    assert s["ReadWritePaths"] == ["/srv/store /srv/api"]
    assert "ReadWritePaths" not in unit_settings(render_unit(UnitOptions()))
    # PrivateTmp=/ProtectHome=: the daemon's socket or store there would be its private copy
    for opts in [{"socket": "/tmp/toolkit.sock"}, {"store": "/home/me/store"},
                 {"socket": "/run/user/1000/t.sock"}]:
        with pytest.raises(ToolkitError, match="cannot use a path under"):
            render_unit(UnitOptions(**opts))  # type: ignore[arg-type]


def test_service_unit_o_that_runs_out_of_space_keeps_the_old_unit(tmp_path: Path) -> None:
    import resource

    unit = tmp_path / "toolkit.service"
    unit.write_text("[Service]\nExecStart=/opt/old/bin/toolkit serve\n")
    before = unit.read_text()

    def small_disk() -> None:  # files stop growing at 512 bytes, as on a full disk (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    done = subprocess.run([sys.executable, "-m", "toolkit", "service", "unit", "-o", str(unit)],
                          capture_output=True, text=True, cwd=str(REPO), preexec_fn=small_disk,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
                          timeout=60)
    assert done.returncode == 1 and f"cannot write {unit}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert unit.read_text() == before and [p.name for p in tmp_path.iterdir()] == [unit.name]


# --- sd_notify -----------------------------------------------------------------------------------

class NotifyListener:
    """An abstract-namespace datagram socket, as systemd's NOTIFY_SOCKET; collects messages."""

    def __init__(self) -> None:
        self.name = f"toolkit-test-{secrets.token_hex(6)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def env_value(self) -> str:
        return "@" + self.name

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def wait_for(self, line: str, after: int = 0, timeout: float = 60.0) -> int:
        """Index of the first message (from `after` on) holding `line`; fails after timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i, m in enumerate(self.messages[after:], after):
                    if line in m.splitlines():
                        return i
                left = deadline - time.monotonic()
                assert left > 0, f"no {line!r} after message {after}: {self.messages}"
                self._cond.wait(left)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        self._thread.join(5)


def test_notifier_sends_to_abstract_and_path_sockets(tmp_path: Path) -> None:
    listener = NotifyListener()
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": listener.env_value})
        assert n.send("READY=1", "STATUS=x")
        assert listener.messages or listener.wait_for("READY=1") == 0
        assert listener.messages[0] == "READY=1\nSTATUS=x"
    finally:
        listener.close()
    path = short_socket_dir() / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert Notifier.from_env({"NOTIFY_SOCKET": str(path)}).send("WATCHDOG=1")
        assert s.recv(100) == b"WATCHDOG=1"
    shutil.rmtree(path.parent)
    assert not Notifier.from_env({}).send("READY=1")  # not under systemd: a no-op
    assert Notifier.from_env({"WATCHDOG_USEC": "4000000"}).watchdog_s == 4.0
    assert Notifier.from_env({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}).watchdog_s is None


def _fake_daemon(running: int = 0, waiting: int = 0) -> SimpleNamespace:
    from device.serve.metrics import ServingMetrics

    engine = SimpleNamespace(admission=SimpleNamespace(lock=threading.Lock()), running=running,
                             waiting=waiting, _thread=threading.current_thread())
    return SimpleNamespace(engine=engine, metrics=ServingMetrics())


def test_watchdog_pings_only_a_working_daemon() -> None:
    listener_thread = threading.current_thread()
    dog = Watchdog(Notifier(None, 2.0))
    idle = _fake_daemon()
    assert dog.problem(idle, [listener_thread])[0] == ""  # idle-waiting: healthy
    busy = _fake_daemon(running=2)
    first, mark = dog.problem(busy, [listener_thread])
    assert first == ""  # a new engine: its first look counts as progress
    dog._mark = mark  # as after a ping
    assert "no progress with 2 running" in dog.problem(busy, [listener_thread])[0]
    busy.metrics.generation_tokens.inc(3)  # the engine produced tokens: healthy again
    assert dog.problem(busy, [listener_thread])[0] == ""
    wedged = _fake_daemon()
    dog._mark = dog.problem(wedged, [listener_thread])[1]
    wedged.engine.admission.lock.acquire()  # an engine stuck holding its lock
    assert "lock is held" in dog.problem(wedged, [listener_thread])[0]
    dead = threading.Thread(target=lambda: None, name="listen-UnixServer")
    dead.start()
    dead.join()
    assert "listen-UnixServer" in dog.problem(idle, [dead])[0]


def test_watchdog_tick_sends_watchdog_1_only_when_healthy() -> None:
    listener = NotifyListener()
    try:
        dog = Watchdog(Notifier.from_env({"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "2000"}))
        daemon = _fake_daemon()
        me = [threading.current_thread()]
        assert dog.tick(daemon, me) and dog.last_problem == ""
        listener.wait_for("WATCHDOG=1")
        daemon.engine.running = 1  # busy, and no tokens since that ping
        time.sleep(0.002)  # past WatchdogSec/2 (1 ms)
        assert not dog.tick(daemon, me) and "no progress" in dog.last_problem
        daemon.metrics.success.inc()
        time.sleep(0.002)
        assert dog.tick(daemon, me) and dog.last_problem == ""
        assert listener.wait_for("WATCHDOG=1", after=1) == 1
    finally:
        listener.close()


# --- --socket-group --------------------------------------------------------------------------------

def _socket_facts(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_socket_mode_default_0600_and_0660_for_a_group() -> None:
    from device.serve.httpd import UnixServer

    folder = short_socket_dir()
    try:
        plain = UnixServer(folder / "a.sock", app=None)  # type: ignore[arg-type]
        assert _socket_facts(folder / "a.sock")[0] == 0o600
        plain.server_close()
        gid = os.getgid()
        grouped = UnixServer(folder / "b.sock", app=None, group=gid)  # type: ignore[arg-type]
        assert _socket_facts(folder / "b.sock") == (0o660, gid)
        grouped.server_close()
        if os.getuid() == 0:  # root may hand the socket to any group: show the chown happens
            other = next(g.gr_gid for g in grp.getgrall() if g.gr_gid != gid)
            third = UnixServer(folder / "c.sock", app=None, group=other)  # type: ignore[arg-type]
            assert _socket_facts(folder / "c.sock") == (0o660, other)
            third.server_close()
    finally:
        shutil.rmtree(folder)


def test_unknown_socket_group_is_refused_before_start(tmp_path: Path) -> None:
    from device.serve.config import ServeConfig

    with pytest.raises(ToolkitError, match="no such group"):
        ServeConfig(bundle=tmp_path, socket_group="no-such-group-xyz")


# --- the unit's ExecStart=, started for real -------------------------------------------------------

class UnitProcess:
    """The daemon started from a rendered unit, paths moved under `root`."""

    def __init__(self, text: str, root: Path, listener: NotifyListener, watchdog_s: int) -> None:
        s = unit_settings(text)
        moves = {"/run/toolkit": str(root / "run"), "/var/lib/toolkit": str(root / "state"),
                 "%d": str(root / "cred")}

        def moved(value: str) -> str:
            for a, b in moves.items():
                value = value.replace(a, b)
            return value

        self.argv = [moved(a) for a in shlex.split(s["ExecStart"][0])]
        self.env = {k: moved(v) for k, v in (e.split("=", 1) for e in s.get("Environment", []))}
        self.env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), HOME=str(root / "state"),
                        PYTHONPATH=str(REPO),  # this checkout's code, not the editable install's
                        CREDENTIALS_DIRECTORY=str(root / "cred"), NOTIFY_SOCKET=listener.env_value,
                        WATCHDOG_USEC=str(watchdog_s * 1_000_000))
        (root / "run").mkdir(mode=0o755, exist_ok=True)  # what RuntimeDirectory= creates
        (root / "state").mkdir(mode=0o700, exist_ok=True)  # StateDirectory=
        self.log = root / "daemon.log"
        self.socket = Path(moved("/run/toolkit/toolkit.sock"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # what systemctl stop sends (KillSignal=)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


@pytest.mark.slow
def test_unit_exec_start_sends_ready_after_the_bundle_loads_and_feeds_the_watchdog(
        llama_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from host import deploy as dp
    from host.client import DaemonClient, Endpoint

    root = short_socket_dir()
    listener = NotifyListener()
    group = grp.getgrgid(os.getgid()).gr_name  # the current user's primary group
    port = free_port()
    text = render_unit(UnitOptions(venv=venv_with_toolkit(), tcp=f"127.0.0.1:{port}", socket_group=group,
                                   watchdog_s=2, drain_timeout=5))
    (root / "cred").mkdir()
    token = secrets.token_urlsafe(32)
    (root / "cred" / "token").write_text(token + "\n")
    (root / "cred" / "token").chmod(0o400)  # as systemd hands a credential over
    unit = UnitProcess(text, root, listener, watchdog_s=2)
    assert unit.argv[:2] == [f"{sys.prefix}/bin/toolkit", "serve"]
    assert unit.argv[2:] == [a.replace("/var/lib/toolkit", str(root / "state"))
                             .replace("/run/toolkit", str(root / "run")).replace("%d", str(root / "cred"))
                             for a in exec_start(UnitOptions(venv=sys.prefix, tcp=f"127.0.0.1:{port}",
                                                             socket_group=group, drain_timeout=5))[2:]]
    try:
        # 1. an empty store: ready at once, and says so
        unit.start()
        ready = listener.wait_for("READY=1")
        assert "STATUS=ready: no bundle deployed yet" in listener.messages[ready].splitlines()
        assert any(m.startswith("STATUS=loading") for m in listener.messages[:ready])
        assert _socket_facts(unit.socket) == (0o660, os.getgid())
        listener.wait_for("WATCHDOG=1", after=ready, timeout=30)
        # 2. a deploy: the status line follows what is served
        monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(root / "config"))
        dp.add_device("svc", f"unix://{unit.socket}")
        result = dp.deploy(llama_bundle, "svc")
        assert result.install.ok, result.install.message
        name = result.install.bundle.name
        listener.wait_for(f"STATUS=serving {name}", after=ready)
        # 3. SIGTERM: STOPPING=1, a clean exit
        mark = len(listener.messages)
        assert unit.stop() == 0, unit.log.read_text()
        listener.wait_for("STOPPING=1", after=mark)
        # 4. started again: READY=1 only once the deployed bundle is loaded and served
        mark = len(listener.messages)
        unit.start()
        ready = listener.wait_for("READY=1", after=mark)
        assert f"STATUS=serving {name}" in listener.messages[ready].splitlines()
        assert any(m.startswith("STATUS=loading") for m in listener.messages[mark:ready])
        status = DaemonClient(Endpoint.unix(unit.socket), timeout=10).request("GET", "/v1/status")
        assert status.status == 200 and status.json()["state"] == "ready"
        tcp = DaemonClient(Endpoint.tcp("127.0.0.1", port, token=token), timeout=10)
        assert tcp.request("GET", "/v2/health/ready").status == 200  # the credential's token
        listener.wait_for("WATCHDOG=1", after=ready, timeout=30)
        assert unit.stop() == 0, unit.log.read_text()[-4000:]  # the daemon's own account of its stop
    finally:
        if unit.proc is not None and unit.proc.poll() is None:
            unit.proc.kill()
            unit.proc.wait(10)
        listener.close()
        shutil.rmtree(root, ignore_errors=True)
