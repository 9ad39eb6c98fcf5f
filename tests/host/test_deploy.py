"""Deploy: the wire protocol and `toolkit deploy`, end to end (the store on its own:
tests/device/store/test_store.py; the serial link's framing: tests/device/serve/test_serial_link.py).

Bundles are the real tiny Llama of conftest.py (converted once per session); variants are copies
with a changed manifest (a new bundle identity), a damaged model (fails its smoke test) or an
extra random file (several chunks, so resume is visible). Devices are store daemons on temporary
Unix sockets, loopback TCP (through a proxy that cuts the connection) and pty pairs (through a
relay that damages bytes); the crash test SIGKILLs a daemon process in the middle of an install.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from deploy_fixtures import same_files, variant

from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, read_manifest
from device.store.store import StoreLimits
from host import deploy as dp
from host.pty_relay import Faults, PtyRelay


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret-token-for-tests-0123456789\n")
    path.chmod(0o600)
    return path


class CuttingProxy:
    """TCP proxy that closes the connection it carries once `cut_after` client bytes have passed
    (once), like a cable pulled mid-upload; later connections pass untouched."""

    def __init__(self, upstream: int, cut_after: int) -> None:
        self.upstream, self.cut_after = upstream, cut_after
        self.sent = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and not self.cuts and self.sent + len(data) > self.cut_after:
                    self.cuts += 1
                    dst.sendall(data[:self.cut_after - self.sent])
                    raise OSError("cut")
                if upstream:
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


# --- deploy end to end, to real daemons (`toolkit serve --store`) ----------------------------------

@pytest.mark.parametrize("swap", ["auto", "cold"])
def test_deploy_to_the_daemon_switches_what_it_serves(bundles: dict[str, Path], config: Path, serve: Any,
                                                      tmp_path: Path, swap: str) -> None:
    """auto swaps hot here (the tiny bundles fit beside each other); cold unloads the served
    bundle first and, when the new one fails, loads the old one again."""
    daemon = serve(tmp_path / "store", "--swap", swap)
    assert daemon.api().request("GET", "/health").status == 503  # an empty store serves nothing
    dp.add_device("local", f"unix://{daemon.socket}")
    first = dp.deploy(bundles["a"], "local")
    assert first.install.ok and first.held_at_start == 0 and first.sent_bytes == first.total_bytes
    same_files(bundles["a"], daemon.store / "bundles" / first.install.bundle.dir)
    assert daemon.serving() == "tiny-a"
    long = {"prompt": "hello world " * 20, "max_tokens": 3, "temperature": 0}
    answers = [daemon.api().post("/v1/completions", long)["choices"][0]["text"] for _ in range(2)]
    cache = daemon.api().get("/v1/status")["prefix_cache"]
    assert answers[0] == answers[1] and cache["hits"] == 1 and cache["entries"] > 0
    again = dp.deploy(bundles["a"], "local")  # the device has it: nothing is sent
    assert again.sent_bytes == 0 and again.install.ok
    second = dp.deploy(bundles["b"], "local")
    assert second.install.ok and second.install.previous and second.install.previous.name == "tiny-a"
    assert daemon.serving() == "tiny-b"
    cache = daemon.api().get("/v1/status")["prefix_cache"]  # the new bundle's: empty
    assert cache["hits"] == 0 and cache["entries"] == 0 and cache["bytes"] == 0
    broken = dp.deploy(bundles["broken"], "local")  # loads, fails its smoke test: rolled back
    assert not broken.install.ok and broken.install.rolled_back
    assert broken.install.active and broken.install.active.name == "tiny-b"
    assert daemon.serving() == "tiny-b"
    ping = dp.ping("local")
    assert ping.hello.active and ping.hello.active["name"] == "tiny-b" and ping.hello.backend == "onnxruntime"
    assert ping.hello.facts.memory_total > 0 and ping.hello.rtt_s < 1
    back = dp.rollback("local")
    assert back.ok and back.active and back.active.name == "tiny-a"
    assert daemon.serving() == "tiny-a"
    assert daemon.api().get("/v1/status")["store"]["previous"] == second.install.bundle.dir
    assert ("cold swap" in daemon.text()) == (swap == "cold")
    if swap == "cold":
        assert "--swap cold" in second.install.smoke.detail
        assert "previous bundle is loaded again" in broken.install.smoke.detail


def test_tcp_cut_mid_upload_resumes_by_itself_and_on_rerun(bundles: dict[str, Path], config: Path, serve: Any,
                                                           tmp_path: Path) -> None:
    port = free_port()
    token = token_file(tmp_path)
    daemon = serve(tmp_path / "store", "--tcp", f"127.0.0.1:{port}", "--token-file", str(token))
    total = sum(e.bytes for e in read_manifest(bundles["b"]).files.values())

    proxy = CuttingProxy(port, cut_after=12 << 20)  # in the second 8 MiB chunk of extra.bin
    dp.add_device("net", f"tcp://127.0.0.1:{proxy.port}?token-file={token}")
    retried: list[str] = []
    result = dp.deploy(bundles["b"], "net", on_retry=retried.append)
    # one retry for the cut; any more only while the device still held the dropped connection's
    # file open ("busy": its handler had not read the EOF yet, under load)
    assert proxy.cuts == 1 and len(retried) == result.attempts - 1 >= 1
    assert all("another connection" in r for r in retried[1:]), retried
    assert result.install.ok
    # the second connection resumed from what the device held (at least the first chunk) and
    # nothing acknowledged was sent twice
    assert result.held_per_attempt[0] == 0 and result.held_per_attempt[1] >= 8 << 20
    assert result.sent_bytes <= total
    same_files(bundles["b"], daemon.store / "bundles" / result.install.bundle.dir)
    assert daemon.serving() == "tiny-b"
    proxy.close()

    # no retries: the command fails and says to re-run; the re-run sends only the rest
    proxy = CuttingProxy(port, cut_after=12 << 20)
    dp.add_device("net", f"tcp://127.0.0.1:{proxy.port}?token-file={token}", replace=True)
    c = variant(bundles["b"], tmp_path / "c", "tiny-c")
    with pytest.raises(ToolkitError) as e:
        dp.deploy(c, "net", retries=0)
    assert "re-run" in str(e.value)
    retried.clear()
    rerun = dp.deploy(c, "net", on_retry=retried.append)
    # as above, a retry only while the device still held the cut connection's file open (under
    # load): its handler then drops the cut chunk's unverified tail, and the retry resumes from
    # the chunk's start; otherwise one attempt sends exactly what the device lacked
    assert all("another connection" in r for r in retried), retried
    assert rerun.held_at_start >= 8 << 20 and min(rerun.held_per_attempt) >= 8 << 20
    if retried:
        assert rerun.sent_bytes <= rerun.total_bytes
    else:
        assert rerun.sent_bytes == rerun.total_bytes - rerun.held_at_start
    assert rerun.install.ok
    same_files(c, daemon.store / "bundles" / rerun.install.bundle.dir)
    assert daemon.serving() == "tiny-c"
    proxy.close()


def test_a_busy_chunk_is_retried_and_a_busy_commit_is_not(bundles: dict[str, Path], config: Path,
                                                          serve: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk answered "busy" (the device still holds the file for a connection that just
    dropped) is sent again after a pause; a commit answered "busy" (another install is running)
    fails the deploy at once with the device's words."""
    from host.transfer import HttpDeployClient, RemoteError

    daemon = serve(tmp_path / "store")
    dp.add_device("local", f"unix://{daemon.socket}")
    real_send, real_commit = HttpDeployClient.send_chunks, HttpDeployClient.commit
    busy = ["chunk"]

    def send_chunks(self: Any, upload_id: str, chunks: Any) -> Any:
        if busy and busy[0] == "chunk":
            busy.pop()
            raise RemoteError("model.onnx is being written by another connection", 409, "busy")
        return real_send(self, upload_id, chunks)

    def commit(self: Any, upload_id: str, *rest: Any, **kw: Any) -> Any:
        if busy and busy[0] == "commit":
            raise RemoteError("another install is running", 409, "busy")
        return real_commit(self, upload_id, *rest, **kw)

    monkeypatch.setattr(HttpDeployClient, "send_chunks", send_chunks)
    monkeypatch.setattr(HttpDeployClient, "commit", commit)
    retried: list[str] = []
    result = dp.deploy(bundles["a"], "local", on_retry=retried.append)
    assert result.install.ok and result.attempts == 2 and "another connection" in retried[0]
    busy.append("commit")
    with pytest.raises(ToolkitError, match="refused the bundle: another install is running"):
        dp.deploy(bundles["b"], "local", on_retry=retried.append)
    assert len(retried) == 1


def test_deploy_over_a_lossy_serial_line(bundles: dict[str, Path], config: Path, serve: Any,
                                         tmp_path: Path) -> None:
    """A pty pair through a relay that damages >= 1 % of the bytes (bursts of flips and
    losses, both directions): the install completes with exactly the sent bytes."""
    faults = Faults(corrupt=0.0008, drop=0.0008, burst=16)
    token = token_file(tmp_path)
    with PtyRelay(faults=faults, seed=11) as relay:
        daemon = serve(tmp_path / "store", "--serial", relay.device_path, "--token-file", str(token))
        dp.add_device("board", f"serial://{relay.host_path}?baud=921600&token-file={token}")
        result = dp.deploy(bundles["a"], "board", retries=6)
        assert result.install.ok
        same_files(bundles["a"], daemon.store / "bundles" / result.install.bundle.dir)
        assert relay.stats.to_device.affected_ratio >= 0.01
        assert dp.ping("board").hello.active["name"] == "tiny-a"  # type: ignore[index]
        assert daemon.serving() == "tiny-a"


def test_sigkill_mid_install_leaves_the_previous_bundle_serving(bundles: dict[str, Path], config: Path,
                                                                serve: Any, tmp_path: Path) -> None:
    store, hold = tmp_path / "store", tmp_path / "hold"
    hold.mkdir()
    daemon = serve(store, hold=hold)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    (hold / "hold").write_text("")
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, dp.deploy, bundles["b"], "local", retries=0))
    t.start()
    deadline = time.monotonic() + 30
    while not (hold / "smoke-started").exists():
        assert time.monotonic() < deadline, "the install never reached its smoke test"
        time.sleep(0.02)
    assert json.loads((store / "active").read_text())["name"] == "tiny-b"  # switched, not yet smoked
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    t.join(30)
    assert errors  # the host saw the connection die
    (hold / "hold").unlink()
    restarted = serve(store)  # recovery runs before anything is loaded
    assert restarted.serving() == "tiny-a"
    dp.add_device("local", f"unix://{restarted.socket}", replace=True)
    assert dp.ping("local").hello.active["name"] == "tiny-a"  # type: ignore[index]
    again = dp.deploy(bundles["b"], "local")  # the verified bundle was kept: nothing is resent
    assert again.install.ok and again.sent_bytes == 0
    assert restarted.serving() == "tiny-b"


@pytest.mark.parametrize("swap", ["hot", "cold"])
def test_what_clients_see_while_a_new_bundle_is_smoke_tested(bundles: dict[str, Path], config: Path,
                                                             serve: Any, tmp_path: Path, swap: str) -> None:
    """Hot: the old bundle keeps answering while the new one is tested beside it. Cold: it has
    been unloaded, so readiness and requests answer 503 "switching" until the new one is up."""
    hold = tmp_path / "hold"
    hold.mkdir()
    daemon = serve(tmp_path / "store", "--swap", swap, hold=hold)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    (hold / "hold").write_text("")
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, dp.deploy, bundles["b"], "local"))
    t.start()
    deadline = time.monotonic() + 30
    while not (hold / "smoke-started").exists():
        assert time.monotonic() < deadline, "the install never reached its smoke test"
        time.sleep(0.02)
    api = daemon.api()
    if swap == "hot":
        assert api.request("GET", "/health").status == 200 and daemon.serving() == "tiny-a"
    else:
        assert api.request("GET", "/health").status == 503
        assert api.get("/v1/status")["state"] == "switching"
        reply = api.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert reply.status == 503 and reply.headers.get("Retry-After")
    (hold / "hold").unlink()
    t.join(60)
    assert not errors and daemon.serving() == "tiny-b"


def test_an_active_bundle_damaged_on_disk_falls_back_to_the_previous(bundles: dict[str, Path], config: Path,
                                                                     serve: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"
    daemon = serve(store)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    b = dp.deploy(bundles["b"], "local").install
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    with open(store / "bundles" / b.bundle.dir / "model.onnx", "r+b") as f:  # a flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    restarted = serve(store)  # every hash is checked again at start: b is refused, a serves
    assert restarted.serving() == "tiny-a"
    assert "failed to load" in restarted.text()


def _catch(errors: list[BaseException], fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # the test inspects it
        errors.append(e)


# --- deploy edge cases, against the store-only daemon (its memory and limits can be faked) -------

def test_tcp_needs_the_token(bundles: dict[str, Path], config: Path, start: Any, tmp_path: Path) -> None:
    port = free_port()
    start(tcp=f"127.0.0.1:{port}", token_file=token_file(tmp_path))
    dp.add_device("net", f"tcp://127.0.0.1:{port}")
    with pytest.raises(ToolkitError, match="401.*token|token"):
        dp.deploy(bundles["a"], "net")


def test_incompatible_bundles_are_refused_before_any_byte(bundles: dict[str, Path], config: Path,
                                                          start: Any, tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock, memory_total=256 << 20)  # a 256 MiB board
    dp.add_device("small", f"unix://{sock}")
    with pytest.raises(ToolkitError, match="TensorRT") as e:
        dp.deploy(bundles["trt"], "small")
    assert "nothing was sent" in str(e.value)
    with pytest.raises(ToolkitError, match="does not fit"):
        dp.deploy(bundles["a"], "small")
    assert list((daemon.store / "staging").iterdir()) == []
    # the device checks too, whatever the host says
    from host.transfer import HttpDeployClient, RemoteError

    with pytest.raises(RemoteError) as r:
        HttpDeployClient(f"unix://{sock}").begin((bundles["trt"] / MANIFEST).read_bytes())
    assert r.value.code == "incompatible"


def test_hostile_manifests_and_oversized_uploads_are_refused(bundles: dict[str, Path], config: Path,
                                                             start: Any, tmp_path: Path) -> None:
    from host.transfer import HttpDeployClient, RemoteError

    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock, limits=StoreLimits(max_bundle_bytes=1 << 20))
    client = HttpDeployClient(f"unix://{sock}")
    data = json.loads((bundles["a"] / MANIFEST).read_text())
    for evil in ("../../etc/cron.d/x", "/etc/passwd", "tokenizer/../../x"):
        hostile = {**data, "files": {evil: {"sha256": "0" * 64, "bytes": 1}}}
        with pytest.raises(RemoteError) as e:
            client.begin(json.dumps(hostile).encode())
        # the manifest codec refuses it before the store's own name check (bad_name) would
        assert e.value.status == 400 and e.value.code == "bad_manifest"
        assert "only name files inside" in str(e.value)
    dp.add_device("local", f"unix://{sock}")
    with pytest.raises(ToolkitError, match="accepts bundles up to"):
        dp.deploy(bundles["b"], "local")  # 12 MiB declared, 1 MiB allowed: refused at begin
    assert list((daemon.store / "staging").iterdir()) == []


# --- the CLI ----------------------------------------------------------------------------------------

def test_cli_devices_deploy_rollback(bundles: dict[str, Path], config: Path, start: Any,
                                     tmp_path: Path) -> None:
    from toolkit.cli import main

    sock = tmp_path / "d.sock"
    start(socket_path=sock)
    runner = CliRunner()
    r = runner.invoke(main, ["devices", "add", "local", f"unix://{sock}"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["devices", "add", "local", "unix:///elsewhere.sock"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(main, ["devices", "add", "x", "ftp://host"])
    assert r.exit_code == 1 and "tcp://HOST:PORT" in r.output
    r = runner.invoke(main, ["devices", "list"])
    assert "local" in r.output and "unix" in r.output
    assert json.loads((config / "devices.json").read_text()) == {"local": {"uri": f"unix://{sock}"}}
    assert (config / "devices.json").stat().st_mode & 0o077 == 0
    r = runner.invoke(main, ["devices", "ping", "local"])
    assert r.exit_code == 0 and "active   none" in r.output and "rtt" in r.output
    r = runner.invoke(main, ["deploy", str(bundles["a"]), "--device", "local"])
    assert r.exit_code == 0, r.output
    assert "smoke test passed" in r.output and "MB/s" in r.output
    r = runner.invoke(main, ["deploy", str(bundles["broken"]), "--device", "local"])
    assert r.exit_code == 1 and "rolled back" in r.output
    r = runner.invoke(main, ["rollback", "--device", "local"])
    assert r.exit_code == 1 and "no previous bundle" in r.output
    r = runner.invoke(main, ["deploy", str(bundles["b"]), "--device", "local"])
    r = runner.invoke(main, ["rollback", "--device", "local"])
    assert r.exit_code == 0 and "active tiny-a-" in r.output
    r = runner.invoke(main, ["devices", "remove", "local"])
    assert r.exit_code == 0
    r = runner.invoke(main, ["deploy", str(bundles["a"]), "--device", "local"])
    assert r.exit_code == 1 and "unknown" in r.output


def test_a_refused_install_says_what_to_do(config: Path, start: Any, tmp_path: Path) -> None:
    from toolkit.cli import main

    sock = tmp_path / "d.sock"
    start(socket_path=sock)
    runner = CliRunner()
    assert runner.invoke(main, ["devices", "add", "local", f"unix://{sock}"]).exit_code == 0
    # the install job's error carries the device's hint; the host used to drop it
    r = runner.invoke(main, ["rollback", "--device", "local"])
    assert r.exit_code == 1 and "no previous bundle" in r.output
    assert "hint: deploy a bundle instead" in r.output


def test_rollback_from_a_folder_that_is_not_a_bundle_is_a_clear_error(config: Path, tmp_path: Path) -> None:
    from toolkit.cli import main

    runner = CliRunner()
    assert runner.invoke(main, ["devices", "add", "local", f"unix://{tmp_path}/d.sock"]).exit_code == 0
    (tmp_path / "notabundle").mkdir()
    r = runner.invoke(main, ["rollback", "--device", "local", "--from", str(tmp_path / "notabundle")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)  # not a FileNotFoundError
    assert "is not a bundle" in r.output


def test_a_hand_edited_serial_baud_is_a_clear_error(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config.mkdir(parents=True)
    (config / "devices.json").write_text(json.dumps({"board": "serial:///dev/ttyUSB0?baud=fast"}))
    monkeypatch.setenv("TOOLKIT_TOKEN", "s3cret-token-for-tests-0123456789")
    with pytest.raises(ToolkitError, match="baud 'fast'"):  # was a ValueError traceback
        dp.ping("board")


def test_chunks_follow_the_grid_from_an_off_grid_resume_point(tmp_path):
    """A resume point off the chunk grid (the device held bytes sent in other-sized chunks)
    first sends the piece up to the next grid line; every CRC32, taken from the verification
    pass or computed for that piece, is the CRC of exactly the bytes the chunk names."""
    from device.store.checksum import crc32
    from device.store.store import FileProgress, UploadState
    from host.deploy import _send_missing, _Sent
    from host.transfer import DeployClient

    data = os.urandom(10_000)
    (tmp_path / "w.bin").write_bytes(data)
    chunk = 4096
    grid = {"w.bin": [crc32(data[i:i + chunk]) for i in range(0, len(data), chunk)]}

    class Recorder(DeployClient):
        sent: list[tuple[int, int, int]] = []

        def chunk(self, upload_id, path, offset, crc, payload):  # type: ignore[override]
            assert crc == zlib.crc32(payload) and payload == data[offset:offset + len(payload)]
            self.sent.append((offset, len(payload), crc))
            return offset + len(payload)

    state = UploadState("u", "n", {"w.bin": FileProgress(len(data), 1000)})
    _send_missing(Recorder(), tmp_path, state, chunk, grid, _Sent(), None)
    assert [(o, n) for o, n, _ in Recorder.sent] == [(1000, 3096), (4096, 4096), (8192, 1808)]
    assert [c for o, _, c in Recorder.sent if o % chunk == 0] == grid["w.bin"][1:]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_http_chunks_written_as_they_arrive_keep_only_good_bytes(bundles: dict[str, Path], start: Any,
                                                                  tmp_path: Path, transport: str) -> None:
    """Over HTTP the next chunk goes into the staged file as it arrives: a chunk with
    a wrong CRC32 is refused and cut off again, the connection stays usable, and the bytes of a
    good chunk and of the pipelined ones after it arrive exactly."""
    from host.transfer import Chunk, HttpDeployClient, RemoteError

    if transport == "unix":
        start(socket_path=tmp_path / "d.sock")
        client = HttpDeployClient(f"unix://{tmp_path / 'd.sock'}")
    else:
        port, token = free_port(), token_file(tmp_path)
        start(tcp=f"127.0.0.1:{port}", token_file=token)
        client = HttpDeployClient(f"tcp://127.0.0.1:{port}", token="s3cret-token-for-tests-0123456789")
    bundle = bundles["a"]
    state = client.begin((bundle / MANIFEST).read_bytes())
    rel = max(state.files, key=lambda r: state.files[r].size)
    data = (bundle / rel).read_bytes()
    with pytest.raises(RemoteError) as e:
        client.chunk(state.upload_id, rel, 0, zlib.crc32(data[:5000]) ^ 1, data[:5000])
    assert e.value.code == "bad_crc"
    assert client.begin((bundle / MANIFEST).read_bytes()).files[rel].held == 0
    assert client.chunk(state.upload_id, rel, 0, zlib.crc32(data[:5000]), data[:5000]) == 5000
    chunks = [Chunk(rel, o, min(7000, len(data) - o), zlib.crc32(data[o:o + 7000]), bundle / rel)
              for o in range(5000, len(data), 7000)]
    held = [h for _, h in client.send_chunks(state.upload_id, chunks)]
    assert held[-1] == len(data)
    client.close()


def test_tcp_replies_do_not_wait_for_delayed_acks(start: Any, tmp_path: Path) -> None:
    """Each reply leaves in one send with TCP_NODELAY: with Nagle on, the body of every small
    reply waited ~40 ms for the client's delayed ACK. Compared with the same calls over the Unix
    socket (a ratio, not a time: the bug made it ~50x)."""
    from host.transfer import HttpDeployClient

    port, token = free_port(), token_file(tmp_path)
    start(socket_path=tmp_path / "d.sock", tcp=f"127.0.0.1:{port}", token_file=token)
    clients = {"unix": HttpDeployClient(f"unix://{tmp_path / 'd.sock'}"),
               "tcp": HttpDeployClient(f"tcp://127.0.0.1:{port}", token="s3cret-token-for-tests-0123456789")}
    took = {}
    for name, client in clients.items():
        client.status()  # connect
        t0 = time.perf_counter()
        for _ in range(10):
            client.status()
        took[name] = time.perf_counter() - t0
        client.close()
    assert took["tcp"] < 8 * took["unix"] + 0.05, took


def test_a_404_names_a_store_less_daemon_only_when_the_daemon_said_it() -> None:
    """The daemon's own 404 (its JSON error, code not_found) means it serves no store; a 404 from
    anything else at that address (another web server, a proxy) must not blame --store."""
    from host.transfer import _remote_error

    ours = _remote_error({"error": {"message": "no route POST /v1/deploy/begin", "code": "not_found"}},
                         404, "tcp://board:8443")
    assert "--store" in ours.message and ours.code == "not_found"
    other = _remote_error("<html>Not Found</html>", 404, "tcp://board:8443")
    assert "--store?" not in other.message and "404" in other.message, other.message
    assert "address" in other.message
    store = _remote_error({"error": {"message": "no upload abc in progress", "code": "unknown_upload",
                                     "hint": "begin the upload again"}}, 404, "tcp://board:8443")
    assert store.message == "no upload abc in progress" and store.hint == "begin the upload again"
