"""The HTTP layer (device/serve/httpd.py) under requests and clients that break the rules:
HTTP/0.9 request lines, Content-Length sent twice with different values, clients gone before an
error is sent, a socket path under a file.
(The routes' own refusals: test_validation.py and test_fuzz.py.)"""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bundle.errors import ToolkitError
from device.serve import httpd


def test_a_socket_path_under_a_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ToolkitError, match="cannot listen on"):
        httpd.claim_socket_path(tmp_path / "f" / "toolkit.sock")


class StatusApp:
    def dispatch(self, h: httpd.Handler) -> None:
        h.send_json(200, {"ok": True})


class EchoApp:
    """Answers with the body's length, or the error read_body raised."""

    def dispatch(self, h: httpd.Handler) -> None:
        try:
            h.send_json(200, {"read": len(h.read_body())})
        except httpd.HTTPError as e:
            h.send_json(e.status, {"error": {"message": e.message, "code": e.code}})


def serving(app: Any) -> Iterator[httpd.UnixServer]:
    folder = Path(tempfile.mkdtemp(prefix="tka-", dir="/tmp"))
    srv = httpd.UnixServer(folder / "s.sock", app)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def unix_server() -> Iterator[httpd.UnixServer]:
    yield from serving(StatusApp())


def exchange(srv: httpd.UnixServer, raw: bytes, to_eof: bool = False) -> bytes:
    """Send `raw`; read until the server closes the connection, or (not to_eof) until the first
    answer's head when the server keeps the connection open."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(srv.path))
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if not to_eof and b"\r\n\r\n" in data and b"Connection: close" not in data:
                break
        return data


def test_an_http_0_9_request_gets_400_with_a_status_line(unix_server: httpd.UnixServer) -> None:
    """`GET /path` without a version reached the routes, whose answer needs headers http.server
    does not keep for 0.9: the App's 500 path, a traceback in the log, and nothing sent."""
    assert exchange(unix_server, b"GET /v1/status\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert b" 200 " in exchange(unix_server, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize("raw", [
    b'GARBAGE "quoted" \\ line\r\n\r\n',  # a bad request line, quotes and a backslash echoed back
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",  # 414
    b"GET /v1/status HTTP/1.1\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",  # 431: too many headers
    b"GET /v1/status HTTP/2.0\r\n\r\n",  # a version it does not speak
], ids=["request-line", "uri-too-long", "too-many-headers", "http-2.0"])
def test_http_servers_own_errors_are_json(unix_server: httpd.UnixServer, raw: bytes) -> None:
    """http.server's own refusals (before any route runs) were an HTML page: every error the
    daemon sends is a JSON body saying what was wrong."""
    head, _, body = exchange(unix_server, raw).partition(b"\r\n\r\n")
    assert head.split(b" ")[1].startswith(b"4"), head
    assert b"Content-Type: application/json" in head, head
    error = json.loads(body)["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error


def test_a_client_gone_before_an_error_leaves_no_traceback(unix_server: httpd.UnixServer,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    def gone(self: Any, data: bytes) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    with monkeypatch.context() as m:
        m.setattr(httpd._Writer, "write", gone)
        assert exchange(unix_server, b"NONSENSE\r\n\r\n") == b""
    assert b" 200 " in exchange(unix_server, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "Traceback" not in capfd.readouterr().err


class StreamApp:
    """One server-sent event, then [DONE], as the streaming routes send them."""

    def dispatch(self, h: httpd.Handler) -> None:
        sse = h.start_sse()
        sse.send({"n": 1})
        sse.done()


def test_an_http_1_0_client_gets_its_stream_unchunked_ending_at_the_close() -> None:
    """HTTP/1.0 has no chunked transfer coding (RFC 9112 §7.1: not to be sent to a 1.0
    client): the hex sizes and the 0-chunk ended up inside the client's event stream. A 1.0
    stream is the raw events, its end the closed connection; 1.1 stays chunked."""
    for srv in serving(StreamApp()):
        head, _, body = exchange(srv, b"POST /v1/completions HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
                                 to_eof=True).partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower(), head
        assert body == b'data: {"n": 1}\n\ndata: [DONE]\n\n', body
        chunked = exchange(srv, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                b"Content-Length: 0\r\n\r\n", to_eof=True)
        assert b"Transfer-Encoding: chunked" in chunked and chunked.endswith(b"0\r\n\r\n"), chunked


@pytest.fixture
def echo_server() -> Iterator[httpd.UnixServer]:
    yield from serving(EchoApp())


def test_two_differing_content_lengths_are_a_400_and_a_close(echo_server: httpd.UnixServer) -> None:
    """RFC 9112 §6.3: which one frames the body is unknowable (request smuggling); the first one
    was used, and the rest of the body was parsed as the next request."""
    post = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: %s\r\n\r\nabcGET /"
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(echo_server.path))
        s.sendall(post % b"5")
        reply = b""
        while chunk := s.recv(65536):  # to EOF: the daemon hangs up after the 400
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"different values" in reply
    assert b"\r\nConnection: close\r\n" in reply.split(b"\r\n\r\n")[0] + b"\r\n"
    assert reply.count(b"HTTP/1.1") == 1  # nothing after it was read as a next request
    reply = exchange(echo_server, post[:-5] % b"3")  # the same value repeated counts once
    assert reply.startswith(b"HTTP/1.1 200") and b'{"read": 3}' in reply


@pytest.mark.parametrize("value", [b"-5", b"+3", b" 3_0"])
def test_a_content_length_that_is_not_a_digit_string_is_a_400(echo_server: httpd.UnixServer,
                                                               value: bytes) -> None:
    """RFC 9110 §8.6: Content-Length is 1*DIGIT. int() took -5 (read as no body, so the route
    answered "not valid JSON: Expecting value", and the body that followed became the next
    request), +3 and 3_0."""
    raw = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\nabc" % value
    reply = exchange(echo_server, raw, to_eof=True)
    assert reply.startswith(b"HTTP/1.1 400") and b"Content-Length" in reply, reply
    assert reply.count(b"HTTP/1.1") == 1, reply


def test_a_deploy_chunk_with_differing_content_lengths_is_a_400(tmp_path: Path) -> None:
    from device.serve.deploy import DeployApp, DeployService
    from device.store.store import Store, smoke_test

    store = Store.open(tmp_path / "store")
    try:
        for srv in serving(DeployApp(DeployService(store, smoke_test))):
            reply = exchange(srv, b"PUT /v1/deploy/uploads/" + b"0" * 64 + b"?path=a&offset=0&crc32=0 "
                             b"HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab")
            assert reply.startswith(b"HTTP/1.1 400") and b"different values" in reply
    finally:
        store.close()
