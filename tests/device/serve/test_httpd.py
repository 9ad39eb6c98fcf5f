"""The HTTP layer under attack and misuse (device/serve/httpd.py): deadlines, the connection cap,
keep-alive after early answers, pipelining, odd methods, token strength, TLS and pinning.

Most tests run a listener in this process with a small App and shortened deadlines (the
constants are module globals, read on every use); the connection flood runs the real daemon.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import psutil
import pytest
from daemon_fixtures import REPO, llama_bundle, start_daemon  # noqa: F401 - fixture

from bundle.errors import ToolkitError
from device.serve import httpd
from device.serve.httpd import HTTPError, TCPServer, UnixServer, cert_fingerprint, tls_context, token_problem
from host.client import DaemonClient, DaemonError
from host.endpoint import Endpoint, Trust

TOKEN = "test-token-" + "k9Qx2LmZ7pR4vW8n"


@dataclass
class RecordingApp:
    """Answers by path, reading the body only where a real route would: /echo reads it, every
    other path answers without reading it (like a 401/404/405 does)."""

    seen: list[str] = field(default_factory=list)

    def dispatch(self, h: httpd.Handler) -> None:
        self.seen.append(f"{h.command} {h.path}")
        try:
            if not h.authorized():
                raise HTTPError(401, "no token")
            if h.command not in ("GET", "POST"):
                raise HTTPError(405, f"{h.command} is not allowed")
            if h.route_path == "/echo":
                body = h.read_body()
                h.send_bytes(200, body, "application/octet-stream", {"X-Path": h.path})
            elif h.route_path == "/missing":
                raise HTTPError(404, "no such route")
            else:
                h.send_bytes(200, b"", "text/plain", {"X-Path": h.path})
        except HTTPError as e:
            h.send_json(e.status, {"error": e.message}, {"X-Path": h.path})


@pytest.fixture
def listen() -> Iterator[Any]:
    started: list[Any] = []

    def run(kind: str = "tcp", **kw: Any) -> tuple[Any, RecordingApp]:
        app = RecordingApp()
        if kind == "tcp":
            srv = TCPServer("127.0.0.1", 0, app, [TOKEN], **kw)
        else:
            srv = UnixServer(kw.pop("path"), app, **kw)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        return srv, app

    yield run
    for srv in started:
        srv.shutdown()
        srv.server_close()


def connect(srv: Any) -> socket.socket:
    return socket.create_connection(srv.server_address[:2], timeout=10)


def request(path: str, method: str = "GET", body: bytes = b"", token: str | None = TOKEN) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
            .encode() + body)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def getheader(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def responses(sock: socket.socket) -> Iterator[Response]:
    """Read HTTP responses (Content-Length framed) off one connection in order, until it closes."""
    reader = sock.makefile("rb")
    while True:
        try:
            status_line = reader.readline(65537)
        except ConnectionError:
            return
        if not status_line:
            return
        headers = {}
        while (line := reader.readline(65537)) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        body = reader.read(int(headers.get("content-length", 0)))
        yield Response(int(status_line.split()[1]), headers, body)


def closed_by_peer(sock: socket.socket, within: float = 8.0) -> bool:
    """True when the server closes the connection (EOF) before `within` seconds pass."""
    sock.settimeout(within)
    try:
        while data := sock.recv(4096):
            del data
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- keep-alive after an early answer ---------------------------------------------------------

@pytest.mark.parametrize("early", ["/missing", "unauthenticated"])
def test_an_unread_body_is_not_parsed_as_the_next_request(listen: Any, early: str) -> None:
    """The body of a request answered before its body was read (404, 401) used to stay in the
    stream and run as the next request: request smuggling past the token check."""
    srv, app = listen()
    smuggled = request("/smuggled")
    first = (request("/missing", "POST", smuggled) if early == "/missing"
             else request("/ok", "POST", smuggled, token=None))
    with connect(srv) as sock:
        sock.sendall(first + request("/second"))
        got = [(r.status, r.getheader("X-Path")) for r in islice(responses(sock), 2)]
    assert got[0][0] in (401, 404)
    assert got[1] == (200, "/second")
    assert not any("/smuggled" in s for s in app.seen), app.seen


def test_a_large_unread_body_closes_the_connection(listen: Any) -> None:
    srv, app = listen()
    junk = b"x" * (httpd.DRAIN_LIMIT + 1000)
    with connect(srv) as sock:
        sock.sendall(request("/missing", "POST", junk))
        got = [r.status for r in responses(sock)]
    assert got == [404]  # then EOF: the junk was never parsed as a request
    assert len(app.seen) == 1


def test_pipelined_requests_are_answered_in_order(listen: Any) -> None:
    srv, _ = listen()
    batch = b"".join([request("/p0"), request("/echo?n=1", "POST", b"body-1"),
                      request("/missing", "POST", b"zz"), request("/p3"),
                      request("/echo?n=4", "POST", b"body-4")])
    with connect(srv) as sock:
        sock.sendall(batch)
        sock.shutdown(socket.SHUT_WR)
        got = [(r.status, r.getheader("X-Path")) for r in responses(sock)]
    assert got == [(200, "/p0"), (200, "/echo?n=1"), (404, "/missing"), (200, "/p3"), (200, "/echo?n=4")]


def test_odd_methods_and_versions_get_4xx_not_5xx(listen: Any) -> None:
    srv, _ = listen()
    for raw, want in ((b"BREW /ok HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + TOKEN.encode()
                       + b"\r\n\r\n", 405),
                      (b"GET /ok HTTP/2.0\r\nHost: t\r\n\r\n", 400),
                      (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400)):
        with connect(srv) as sock:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
            statuses = [r.status for r in responses(sock)]
        assert statuses[:1] == [want], raw


def test_a_client_that_resets_a_keepalive_connection_is_gone_not_a_traceback(
        listen: Any, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    """A client that closes without reading its answer (a timeout, a cancelled call) resets the
    connection: the handler, waiting for the next request on it, read ECONNRESET, and
    socketserver printed "Exception occurred during processing of request" and a traceback to
    the daemon's log, for what is a client going away (found by test_concurrent_traffic.py)."""
    import select
    import struct

    srv, app = listen()
    caplog.set_level(logging.INFO, logger="toolkit.daemon")
    for _ in range(3):
        sock = connect(srv)
        sock.sendall(request("/x"))
        assert select.select([sock], [], [], 10)[0]  # the answer is there, unread
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    deadline = time.monotonic() + 10
    while srv.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.open_connections == 0 and app.seen == ["GET /x"] * 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
    assert "connection reset" in caplog.text


# --- deadlines -----------------------------------------------------------------------------------

def test_a_connection_that_sends_nothing_is_closed(listen: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "FIRST_BYTE_TIMEOUT_S", 0.3)
    srv, _ = listen()
    with connect(srv) as sock:
        assert closed_by_peer(sock)


def test_trickled_headers_are_cut_at_the_header_deadline(listen: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Slowloris: one header byte every 50 ms keeps every read short of the idle limit; the
    deadline counts the whole header block."""
    monkeypatch.setattr(httpd, "HEADER_TIMEOUT_S", 0.5)
    srv, app = listen()
    header = b"X-Slow: " + b"a" * 400
    sent = 0
    with connect(srv) as sock:
        sock.sendall(b"GET /ok HTTP/1.1\r\nHost: t\r\n")
        try:
            for byte in header:
                sock.sendall(bytes([byte]))
                sent += 1
                time.sleep(0.05)
        except OSError:
            pass  # the server hung up: what we want
        assert sent < len(header), "the server waited out the whole trickle"
        assert closed_by_peer(sock, within=2.0)
    assert app.seen == []


def test_a_trickled_body_is_cut_at_the_body_deadline(listen: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "BODY_GRACE_S", 0.3)
    srv, _ = listen()
    with connect(srv) as sock:
        sock.sendall(request("/echo", "POST", b"x" * 1000)[:-990])  # headers + 10 of 1000 bytes
        assert closed_by_peer(sock)


def test_a_keepalive_connection_idle_past_its_limit_is_closed(listen: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "IDLE_TIMEOUT_S", 0.3)
    srv, _ = listen()
    with connect(srv) as sock:
        sock.sendall(request("/ok"))
        assert closed_by_peer(sock)  # the answer arrives, then the idle limit closes it


# --- the connection cap ------------------------------------------------------------------------

def test_connections_over_the_cap_are_refused_at_once_without_a_thread(listen: Any) -> None:
    srv, _ = listen(max_connections=4)
    idle = [connect(srv) for _ in range(4)]
    deadline = time.monotonic() + 5
    while srv.open_connections < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    threads = threading.active_count()
    with connect(srv) as extra:
        got = [r.status for r in responses(extra)]
    assert got == [503]
    assert threading.active_count() == threads and srv.refused_connections == 1
    idle.pop().close()  # a place frees up: the next connection is served
    deadline = time.monotonic() + 5
    while srv.open_connections > 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    with connect(srv) as sock:
        sock.sendall(request("/ok"))
        sock.shutdown(socket.SHUT_WR)
        assert [r.status for r in responses(sock)] == [200]
    for s in idle:
        s.close()


def test_300_half_open_tcp_connections_do_not_starve_the_unix_socket(llama_bundle: Path) -> None:  # noqa: F811
    """The issue's flood: 300 TCP connections that never finish their headers. The daemon
    keeps at most --max-connections (64) of them, refuses the rest at once, and a chat
    request over the Unix socket is answered normally; threads and descriptors stay under the cap."""
    daemon = start_daemon(llama_bundle, tcp=True)
    try:
        proc = psutil.Process(daemon.proc.pid)
        base_threads, base_fds = proc.num_threads(), proc.num_fds()
        assert daemon.tcp is not None
        flood = []
        for _ in range(300):
            s = socket.create_connection(daemon.tcp, timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
            flood.append(s)
        time.sleep(0.5)  # let the accept loop take them all
        reply = daemon.client(timeout=60).post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0})
        assert reply["choices"][0]["message"]["content"] is not None
        threads, fds = proc.num_threads(), proc.num_fds()
        print(f"\n300 half-open TCP connections: threads {base_threads} -> {threads}, "
              f"open files {base_fds} -> {fds} (cap {httpd.MAX_CONNECTIONS})")
        assert threads <= base_threads + httpd.MAX_CONNECTIONS + 2, (base_threads, threads)
        assert fds <= base_fds + httpd.MAX_CONNECTIONS + 4, (base_fds, fds)
        refused = 0
        for s in flood:
            s.settimeout(0.01)
            try:
                refused += s.recv(12).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
            s.close()
        assert refused >= 300 - httpd.MAX_CONNECTIONS - 8
    finally:
        assert daemon.stop() == 0


# --- tokens -------------------------------------------------------------------------------------

@pytest.mark.parametrize("token,ok", [("abc", False), ("s3cret-token", False), ("a" * 40, False),
                                      ("has space " + "k9Qx2LmZ7pR4vW8n", False),
                                      ("Zq3kV8xN2mP7wR4tY6uB1c", True), (TOKEN, True)])
def test_weak_tokens_are_refused(token: str, ok: bool) -> None:
    assert (token_problem(token) is None) == ok


@pytest.mark.parametrize("content,message", [(b"abc\n", "at least 22"),
                                             (b"\x9c\xff binary, not a token\n", "not UTF-8 text")])
def test_the_daemon_refuses_a_weak_token_file_in_one_line(llama_bundle: Path, tmp_path: Path,  # noqa: F811
                                                          content: bytes, message: str) -> None:
    token = tmp_path / "token"  # a binary file (a key given in place of the token) was a traceback
    token.write_bytes(content)
    token.chmod(0o600)
    run = subprocess.run([sys.executable, "-m", "toolkit", "serve", str(llama_bundle), "--socket",
                          str(tmp_path / "d.sock"), "--tcp", "127.0.0.1:1", "--token-file", str(token)],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 1
    assert message in run.stderr and "Traceback" not in run.stderr


# --- TLS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and a second, unrelated one."""
    out = tmp_path_factory.mktemp("certs")
    paths = {}
    for name in ("board", "impostor"):
        cert, key = out / f"{name}.pem", out / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        paths[name], paths[f"{name}.key"] = cert, key
    return paths


def test_tls_with_a_pin_or_a_ca_and_nothing_sent_to_an_impostor(listen: Any, certs: dict[str, Path]) -> None:
    srv, app = listen(tls=tls_context(certs["board"], certs["board.key"]))
    host, port = srv.server_address[:2]
    pin = cert_fingerprint(certs["board"])
    for trust in (Trust(pin=pin), Trust(ca_file=str(certs["board"]))):
        reply = DaemonClient(Endpoint.tls(host, port, TOKEN, trust), timeout=10).request("GET", "/ok")
        assert reply.status == 200
    assert len(app.seen) == 2
    wrong = Trust(pin=cert_fingerprint(certs["impostor"]))
    with pytest.raises(ToolkitError, match="not the pinned one"):
        DaemonClient(Endpoint.tls(host, port, TOKEN, wrong), timeout=10).request("GET", "/ok")
    with pytest.raises(DaemonError, match="CERTIFICATE_VERIFY_FAILED"):
        DaemonClient(Endpoint.tls(host, port, TOKEN, Trust(ca_file=str(certs["impostor"]))),
                     timeout=10).request("GET", "/ok")
    with connect(srv) as sock:  # plain HTTP to the TLS port: no answer, and no request reaches the app
        sock.sendall(request("/ok"))
        assert closed_by_peer(sock)
    assert len(app.seen) == 2
    reply = DaemonClient(Endpoint.tls(host, port, TOKEN, Trust(pin=pin)), timeout=10).request("GET", "/ok")
    assert reply.status == 200  # and the listener is still serving


def test_an_address_of_the_wrong_form_gets_a_hint(listen: Any, certs: dict[str, Path]) -> None:
    """https:// without a pin to a self-signed board, and tcp:// to a TLS listener: both fail
    (nothing reaches the app) and the error says which address would work, for the daemon's
    client and the deploy client alike."""
    from host.transfer import HttpDeployClient, LinkDown

    srv, app = listen(tls=tls_context(certs["board"], certs["board.key"]))
    host, port = srv.server_address[:2]
    for endpoint, hint in ((Endpoint.tls(host, port, TOKEN, Trust()), "pin it, https://HOST:PORT?pin=sha256:"),
                           (Endpoint.tcp(host, port, TOKEN), "speaks TLS: address it as https://")):
        with pytest.raises(DaemonError) as e:
            DaemonClient(endpoint, timeout=10).request("GET", "/ok")
        assert hint in (e.value.hint or ""), e.value
        with pytest.raises(LinkDown) as link:
            HttpDeployClient(endpoint).hello()
        assert hint in (link.value.hint or ""), link.value
    assert app.seen == []
    assert Endpoint.tls(host, port, TOKEN, Trust(pin=cert_fingerprint(certs["board"]))).failure_hint(
        ConnectionResetError()) is None  # a pinned https:// address is not the mistake


def test_a_deploy_over_tls_with_a_generated_token(listen: Any, certs: dict[str, Path], tiny_bundle: Any,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`toolkit devices add --new-token` + a pinned https:// address: the whole deploy path
    (hello, begin, pipelined chunks on a raw TLS socket, commit) over TLS."""
    from click.testing import CliRunner

    from device.serve.deploy import DeployApp, DeployService
    from device.store.store import Store, smoke_test
    from host import deploy as dp
    from toolkit.cli import main as cli

    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path / "config"))
    pin = cert_fingerprint(certs["board"])
    store = Store.open(tmp_path / "store")
    srv = TCPServer("127.0.0.1", 0, DeployApp(DeployService(store, smoke_test)), [TOKEN],
                    tls=tls_context(certs["board"], certs["board.key"]))
    port = srv.server_address[1]
    out = CliRunner().invoke(cli, ["devices", "add", "board", f"https://127.0.0.1:{port}?pin={pin}",
                                   "--new-token"])
    assert out.exit_code == 0, out.output
    token = out.output.strip().splitlines()[-1].strip()
    assert token_problem(token) is None
    token_file = tmp_path / "config" / "tokens" / "board.token"
    assert token_file.read_text().strip() == token and token_file.stat().st_mode & 0o777 == 0o600
    srv.tokens = (token.encode(),)  # what the user puts on the board
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        result = dp.deploy(Path(tiny_bundle("llama", "cpu")), "board")
        assert result.install.ok and result.sent_bytes == result.total_bytes
        assert json.loads((tmp_path / "config" / "devices.json").read_text())["board"]["uri"].endswith(pin)
    finally:
        srv.shutdown()
        srv.server_close()
        store.close()


@pytest.mark.parametrize("uri,error", [("https://h:1?pin=md5:00", "is not sha256"),
                                       ("https://h:1?pin=sha256:" + "0" * 64 + "&ca=/x", "not both"),
                                       ("https://h:1?ca=/no/such.pem", "does not exist"),
                                       ("https://h", "no valid port")])
def test_bad_tls_addresses_are_refused(uri: str, error: str, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from host.devices import add_device

    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path))
    with pytest.raises(ToolkitError, match=error):
        add_device("x", uri)


@pytest.mark.parametrize("where", ["missing/folder/d.sock", "x" * 120 + ".sock"])
def test_a_socket_path_that_cannot_be_bound_is_a_user_error(tmp_path: Path, where: str) -> None:
    # both used to end `toolkit serve` with an OSError traceback
    with pytest.raises(ToolkitError, match="cannot listen on") as e:
        UnixServer(tmp_path / where, RecordingApp())
    assert "--socket" in (e.value.hint or "")


def test_devices_add_pins_the_certificate_of_a_pem_file(certs: dict[str, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`toolkit devices add NAME https://HOST:PORT --pin-cert PEM`: the controller computes the
    pin from its copy of the board's certificate (the fleet role registers TLS boards so)."""
    from click.testing import CliRunner

    from toolkit.cli import main as cli

    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path / "config"))
    token = tmp_path / "token"
    token.write_text("x" * 32 + "\n")
    out = CliRunner().invoke(cli, ["devices", "add", "board", f"https://127.0.0.1:8443?token-file={token}",
                                   "--pin-cert", str(certs["board"])])
    assert out.exit_code == 0, out.output
    entry = json.loads((tmp_path / "config" / "devices.json").read_text())["board"]
    assert entry == {"uri": f"https://127.0.0.1:8443?pin={cert_fingerprint(certs['board'])}",
                     "token_file": str(token)}
    for uri, says in [("tcp://127.0.0.1:8443", "must be https://"),
                      (f"https://127.0.0.1:8443?pin={cert_fingerprint(certs['impostor'])}", "not both")]:
        out = CliRunner().invoke(cli, ["devices", "add", "other", uri, "--pin-cert", str(certs["board"])])
        assert out.exit_code != 0 and says in out.output, out.output
    out = CliRunner().invoke(cli, ["devices", "add", "other", "https://h:1",
                                   "--pin-cert", str(certs["board.key"])])
    assert out.exit_code != 0 and "cannot read the certificate" in out.output, out.output
