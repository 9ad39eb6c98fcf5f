"""HTTP/1.1 plumbing for the daemon, standard library only.

Why not a web framework: the device should need nothing beyond the runtime and the tokenizer
(a Jetson image is small and pip may not reach it), and the daemon's concurrency lives in the
engine thread anyway. http.server gives HTTP/1.1 with keep-alive, a thread per connection is
plenty for a handful of slots, and SSE is a chunked response whose chunks are `data: {...}\\n\\n`.

Transports (protocols.md §1f, §4):
  UnixServer   AF_UNIX, the default. The socket file is created 0600 (umask around bind, then
               chmod, both before listen). A path that holds a live socket is refused, a stale
               one is removed, anything else at the path is refused.
  TCPServer    only when asked, loopback by default; every route then needs a bearer token,
               compared in constant time.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import logging
import os
import select
import socket
import socketserver
import stat
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

from bundle.errors import ToolkitError

log = logging.getLogger("toolkit.daemon")

MAX_BODY = 8 << 20  # bytes; a chat prompt that fits any cache we serve is far smaller
IDLE_TIMEOUT_S = 120.0  # a keep-alive connection with no request for this long is closed


def default_socket_path() -> Path:
    """$XDG_RUNTIME_DIR/toolkit.sock (a per-user 0700 tmpfs), else /tmp/toolkit-$UID.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir():
        return Path(runtime) / "toolkit.sock"
    return Path(f"/tmp/toolkit-{os.getuid()}.sock")


class HTTPError(Exception):
    """An error response to send (status + message); the route family decides the body shape."""

    def __init__(self, status: int, message: str, code: str = "invalid_request",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}
        self.retry_after: int | None = None


class ClientGone(Exception):
    """The client closed the connection (a write failed, or the socket reads EOF)."""


class App(Protocol):
    def dispatch(self, handler: Handler) -> None: ...


# --- listening sockets -----------------------------------------------------------------------

def claim_socket_path(path: Path) -> None:
    """Make `path` free for bind: remove a stale socket, refuse a live one or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ToolkitError(f"{path} exists and is not a socket; refusing to replace it",
                           hint="pass another --socket path, or remove that file yourself")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s (nothing listens on it)", path)
        path.unlink(missing_ok=True)
        return
    except OSError as e:
        raise ToolkitError(f"cannot probe the socket {path}: {e}") from e
    finally:
        probe.close()
    raise ToolkitError(f"another daemon is already listening on {path}",
                       hint="stop it first (`toolkit status --socket ...` shows what it serves), "
                            "or pass another --socket path")


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True  # idle keep-alive connections must not hold the process at exit
    # listen() backlog: socketserver's default of 5 overflows when a burst of clients connects
    # at once (a full Unix-socket backlog refuses with EAGAIN rather than waiting)
    request_queue_size = 128
    block_on_close = False
    app: App
    tokens: tuple[bytes, ...] | None = None  # bearer tokens; None: no auth (the Unix socket)


class UnixServer(_Server, socketserver.UnixStreamServer):
    def __init__(self, path: Path, app: App) -> None:
        self.path = Path(path)
        self.app = app
        self.inode: int | None = None
        claim_socket_path(self.path)
        super().__init__(str(self.path), Handler)

    def server_bind(self) -> None:
        old = os.umask(0o177)  # the node is born 0600: no window where others could connect
        try:
            self.socket.bind(self.server_address)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.inode = os.stat(self.path).st_ino

    def remove(self) -> None:
        """Unlink the socket file, if it is still ours."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()


class TCPServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, host: str, port: int, app: App, tokens: list[str]) -> None:
        if not tokens:
            raise ToolkitError("TCP needs a bearer token", hint="pass --token-file FILE")
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            hint = "pick another port" if e.errno == errno.EADDRINUSE else None
            raise ToolkitError(f"cannot listen on {host}:{port}: {e.strerror}", hint=hint) from e


def parse_tcp(value: str) -> tuple[str, int]:
    """'8080', ':8080' or 'HOST:PORT' ('[::1]:8080' for IPv6); the host defaults to loopback."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ToolkitError(f"--tcp {value!r} is not HOST:PORT", hint="e.g. --tcp 127.0.0.1:8080")
    return host, int(port)


def read_tokens(path: Path) -> list[str]:
    """Bearer tokens, one per line (several allow rotation). The file must not be readable by
    other users: a token in a world-readable file is no secret."""
    try:
        st = os.stat(path)
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ToolkitError(f"cannot read the token file {path}: {e.strerror}") from e
    if st.st_mode & 0o077:
        raise ToolkitError(f"the token file {path} is readable by other users "
                           f"(mode {stat.S_IMODE(st.st_mode):o})", hint=f"chmod 600 {path}")
    tokens = [t.strip() for t in lines if t.strip() and not t.startswith("#")]
    if not tokens:
        raise ToolkitError(f"the token file {path} holds no token")
    return tokens


# --- the request handler ---------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """One thread per connection. Routing and error shapes belong to the App; this class reads
    bodies, writes JSON / text / SSE, checks the bearer token and notices vanished clients."""

    protocol_version = "HTTP/1.1"
    server_version = "toolkit-daemon"
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's own (send_header fills it; typeshed omits it)
    timeout = IDLE_TIMEOUT_S
    server: _Server  # type: ignore[assignment]
    response_started = False  # once a status line is out, an error can only close the connection
    status_sent: int | None = None  # for the access log

    def setup(self) -> None:
        super().setup()
        # http.server writes a response's headers and body in two sends; with Nagle on, the
        # small second one waits for the client's delayed ACK (40 ms on Linux) on every reply
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status_sent, self.response_started = code, True
        super().send_response(code, message)

    # BaseHTTPRequestHandler calls do_<METHOD>
    def do_GET(self) -> None:
        self.server.app.dispatch(self)

    do_POST = do_DELETE = do_PUT = do_HEAD = do_GET

    def address_string(self) -> str:
        return "unix" if isinstance(self.client_address, (str, bytes)) else str(self.client_address[0])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base signature
        log.debug("%s %s", self.address_string(), format % args)

    @property
    def route_path(self) -> str:
        return self.path.split("?", 1)[0]

    def authorized(self) -> bool:
        tokens = self.server.tokens
        if tokens is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer":
            return False
        value_b = value.strip().encode()
        ok = False
        for token in tokens:  # no early exit: the time taken does not say which token matched
            ok |= hmac.compare_digest(value_b, token)
        return ok

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as e:
            raise HTTPError(400, "Content-Length is not a number") from e
        if length > MAX_BODY:
            self.close_connection = True  # the unread body would be parsed as the next request
            raise HTTPError(413, f"request body of {length} bytes exceeds the {MAX_BODY}-byte limit")
        if length <= 0:
            return b""
        try:
            body = self.rfile.read(length)
        except OSError as e:  # the idle timeout, or a reset, in the middle of the body
            raise ClientGone() from e
        if len(body) < length:  # the peer closed before sending what it announced
            raise ClientGone()
        return body

    def read_json(self) -> Any:
        # bounded: depth, UTF-8, no NaN/Infinity, big ints, lone surrogates (device/serve/validate.py)
        from device.serve.validate import JSONRefused, loads_bounded

        try:
            return loads_bounded(self.read_body())
        except JSONRefused as e:
            raise HTTPError(e.status, e.message, e.code) from e

    def send_bytes(self, status: int, body: bytes, content_type: str,
                   headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.command != "HEAD" and body:
                # end_headers() and the body in ONE send: two small sends per reply were ~5 % of
                # a deploy's receiving thread (each chunk is answered)
                self._headers_buffer.append(b"\r\n" + body)
                self.flush_headers()
            else:
                self.end_headers()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClientGone() from e

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode(), "application/json", headers)

    def send_empty(self, status: int) -> None:
        self.send_bytes(status, b"", "text/plain")

    def client_gone(self) -> bool:
        """True when the peer has closed its end: the socket is readable and reads EOF. (A
        client does not send more bytes while it waits for this response, so readable means
        EOF, or a pipelined next request, which MSG_PEEK leaves in place.)"""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def start_sse(self) -> SSEStream:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Accel-Buffering", "no")  # proxies must not buffer the stream
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClientGone() from e
        return SSEStream(self)


class SSEStream:
    """Server-sent events over chunked transfer: one chunk per event, written at once."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.last_write = time.monotonic()
        self.closed = False

    def _chunk(self, payload: bytes) -> None:
        try:
            self.handler.wfile.write(b"%X\r\n%s\r\n" % (len(payload), payload))
        except (BrokenPipeError, ConnectionResetError, TimeoutError, OSError) as e:
            raise ClientGone() from e
        self.last_write = time.monotonic()

    def send(self, obj: Any) -> None:
        self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def ping(self) -> None:
        """An SSE comment: keeps proxies from timing out a silent stream, and finds a dead peer."""
        self._chunk(b": ping\n\n")

    def done(self) -> None:
        """`data: [DONE]`, then the zero-length chunk that ends the response."""
        self._chunk(b"data: [DONE]\n\n")
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.handler.wfile.write(b"0\r\n\r\n")
            except OSError as e:
                raise ClientGone() from e
