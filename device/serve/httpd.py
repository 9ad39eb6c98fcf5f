"""HTTP/1.1 plumbing for the daemon, standard library only.

Why not a web framework: the device should need nothing beyond the runtime and the tokenizer
(a Jetson image is small and pip may not reach it), and the daemon's concurrency lives in the
engine thread anyway. http.server gives HTTP/1.1 with keep-alive, a thread per connection is
plenty for a handful of slots, and SSE is a chunked response whose chunks are `data: {...}\\n\\n`.

Transports (protocols.md §1f, §4):
  UnixServer   AF_UNIX, the default. The socket file is created 0600 (umask around bind, then
               chmod, both before listen). A path that holds a live socket is refused, a stale
               one is removed, anything else at the path is refused.
  TCPServer    only when asked, loopback by default; every route then needs a bearer token
               (at least 16 random bytes), compared in constant time; with a certificate and
               key the connection is TLS (the handshake runs in the connection's thread, under
               the header deadline, so a slow handshake holds no one else up).

Limits (protocols.md §2; nginx's limit_conn, client_header_timeout and client_body_timeout are
the model). Each listener admits at most `max_connections` connections; one more is refused at
once in the accepting thread (a canned 503, or a bare close under TLS) without a thread, so
idle TCP connections cannot use up the threads and descriptors the Unix socket's clients need.
Every read runs under a deadline: a new connection sends its first byte within
FIRST_BYTE_TIMEOUT_S, a keep-alive connection its next request within IDLE_TIMEOUT_S, the
request line and headers arrive within HEADER_TIMEOUT_S of their first byte, and a body within
BODY_GRACE_S + length / BODY_MIN_RATE (a trickle that would hold a thread for hours is cut).
A response answered before its body was read (401, 404, 405, a bad query) must not leave that
body in the stream, where it would be parsed as the next request: up to DRAIN_LIMIT unread
bytes are read and dropped, more closes the connection. Pipelined requests are answered in
order (one reader per connection, one request at a time).

Why harden http.server rather than move to h11/uvicorn: the board's install stays free of an
HTTP stack (one fewer thing to cross-compile or vendor for JetPack's Python), the hardening is
the ~150 lines below, and the daemon's cost is in the engine thread, not here: a keep-alive
round trip over the Unix socket costs ~0.3 ms (the same before and after these limits) against
~30 ms per token of SmolLM2-135M on 2 cores (README "Hardening").
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import io
import json
import logging
import os
import select
import socket
import socketserver
import ssl
import stat
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

from bundle.errors import ToolkitError

log = logging.getLogger("toolkit.daemon")

MAX_BODY = 8 << 20  # bytes; a chat prompt that fits any cache we serve is far smaller
MAX_CONNECTIONS = 64  # per listener; an edge daemon decodes a handful of requests at once
FIRST_BYTE_TIMEOUT_S = 10.0  # a new connection that sends nothing for this long is closed
IDLE_TIMEOUT_S = 60.0  # a keep-alive connection with no next request for this long is closed
HEADER_TIMEOUT_S = 10.0  # request line + headers, from their first byte
BODY_GRACE_S = 10.0  # a body's deadline: BODY_GRACE_S + length / BODY_MIN_RATE
BODY_MIN_RATE = 16 << 10  # bytes/s: 8 MiB may take ~9 minutes, a trickle may not take hours
WRITE_TIMEOUT_S = 60.0  # a send that makes no progress for this long: the client is gone
DRAIN_LIMIT = 64 << 10  # unread body an early answer reads and drops to keep the connection
MIN_TOKEN_CHARS = 22  # 16 random bytes in base64 (token_urlsafe(16)); hex needs 32


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
    except NotADirectoryError as e:  # a file where the socket's folder should be
        raise ToolkitError(f"cannot listen on {path}: {e.strerror}",
                           hint="pass --socket with a path in an existing folder") from e
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


# what a connection over the cap gets: written in the accepting thread without waiting
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 70\r\n\r\n"
            b'{"error": {"message": "too many connections", "code": "overloaded"}}\n\n')
assert len(_REFUSAL.split(b"\r\n\r\n", 1)[1]) == 70


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True  # idle keep-alive connections must not hold the process at exit
    # listen() backlog: socketserver's default of 5 overflows when a burst of clients connects
    # at once (a full Unix-socket backlog refuses with EAGAIN rather than waiting)
    request_queue_size = 128
    block_on_close = False
    app: App
    tokens: tuple[bytes, ...] | None = None  # bearer tokens; None: no auth (the Unix socket)
    tls: ssl.SSLContext | None = None
    max_connections = MAX_CONNECTIONS
    open_connections = 0
    refused_connections = 0
    _count_lock = threading.Lock()  # replaced per instance in _limit_init

    def _limit_init(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ToolkitError(f"--max-connections must be at least 1 (got {max_connections})")
        self.max_connections = max_connections
        self._count_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Runs in the accepting thread: over the cap, refuse now, without a thread."""
        with self._count_lock:
            full = self.open_connections >= self.max_connections
            if full:
                self.refused_connections += 1
            else:
                self.open_connections += 1
        if full:
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # type: ignore[misc]
        except Exception:  # e.g. RuntimeError: can't start new thread
            self._release()
            self.shutdown_request(request)  # type: ignore[attr-defined]
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._release()

    def _release(self) -> None:
        with self._count_lock:
            self.open_connections -= 1

    def _refuse(self, request: socket.socket) -> None:
        log.warning("refusing a connection: %d open, the cap is %d (--max-connections)",
                    self.open_connections, self.max_connections)
        with contextlib.suppress(OSError):
            if self.tls is None:  # under TLS a plain-text answer would be noise: just close
                request.setblocking(False)
                request.send(_REFUSAL)
        self.shutdown_request(request)  # type: ignore[attr-defined]

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (under the header deadline), then
        the handler."""
        if self.tls is None:
            super().finish_request(request, client_address)  # type: ignore[misc]
            return
        request.settimeout(HEADER_TIMEOUT_S)
        try:
            conn = self.tls.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:  # a port scan, plain HTTP, a wrong CA, a timeout
            log.info("%s: TLS handshake failed: %s", client_address[0], e)
            return
        try:
            super().finish_request(conn, client_address)  # type: ignore[misc]
        finally:
            with contextlib.suppress(OSError):
                conn.close()


class UnixServer(_Server, socketserver.UnixStreamServer):
    def __init__(self, path: Path, app: App, max_connections: int = MAX_CONNECTIONS,
                 group: int | None = None) -> None:
        self.path = Path(path)
        self.app = app
        self.group = group  # a gid: the socket is 0660 for that group (`--socket-group`)
        self.inode: int | None = None
        self._limit_init(max_connections)
        claim_socket_path(self.path)
        try:
            super().__init__(str(self.path), Handler)
        except OSError as e:  # no such folder, not ours to write, a path over AF_UNIX's 107 bytes
            raise ToolkitError(f"cannot listen on {self.path}: {e.strerror or e}",
                               hint="pass --socket with a path in an existing folder this user "
                                    "can write (at most 107 bytes long)") from e

    def server_bind(self) -> None:
        old = os.umask(0o177)  # the node is born 0600: no window where others could connect
        try:
            self.socket.bind(self.server_address)
        finally:
            os.umask(old)
        if self.group is not None:
            # the group is set while the node is still 0600, then opened to it; listen() comes
            # after server_bind, so no client can connect before both are done
            try:
                os.chown(self.path, -1, self.group)
            except PermissionError as e:
                raise ToolkitError(f"cannot give the socket {self.path} to group {self.group}: "
                                   f"{e.strerror}", hint="the daemon's user must be a member of "
                                   "the --socket-group (SupplementaryGroups= in a unit)") from e
        os.chmod(self.path, 0o660 if self.group is not None else 0o600)
        self.inode = os.stat(self.path).st_ino

    def remove(self) -> None:
        """Unlink the socket file, if it is still ours."""
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == self.inode:
                self.path.unlink()


class TCPServer(_Server, socketserver.TCPServer):
    allow_reuse_address = True

    def __init__(self, host: str, port: int, app: App, tokens: list[str],
                 tls: ssl.SSLContext | None = None, max_connections: int = MAX_CONNECTIONS) -> None:
        if not tokens:
            raise ToolkitError("TCP needs a bearer token", hint="pass --token-file FILE")
        self.app = app
        self.tokens = tuple(t.encode() for t in tokens)
        self.tls = tls
        self._limit_init(max_connections)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            hint = "pick another port" if e.errno == errno.EADDRINUSE else None
            raise ToolkitError(f"cannot listen on {host}:{port}: {e.strerror}", hint=hint) from e


def stop_listening(servers: Sequence[socketserver.BaseServer], threads: Sequence[threading.Thread]) -> None:
    """Stop and close the daemon's listeners (servers[i]'s serve_forever runs in threads[i]) and
    remove their Unix socket files. Only the started ones are shut down: socketserver's
    shutdown() waits for serve_forever to end, forever for one that never started (a --tcp port
    in use fails after the Unix listener exists)."""
    for i, s in enumerate(servers):
        if i < len(threads) and threads[i].ident is not None:  # ident: set once started
            s.shutdown()
        s.server_close()
        if isinstance(s, UnixServer):
            s.remove()


def parse_tcp(value: str) -> tuple[str, int]:
    """'8080', ':8080' or 'HOST:PORT' ('[::1]:8080' for IPv6); the host defaults to loopback."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit():
        raise ToolkitError(f"--tcp {value!r} is not HOST:PORT", hint="e.g. --tcp 127.0.0.1:8080")
    if not 0 < int(port) < 65536:
        raise ToolkitError(f"--tcp {value!r}: port {int(port)} is out of range (1 to 65535)",
                           hint="e.g. --tcp 127.0.0.1:8080")
    return host, int(port)


def read_tokens(path: Path) -> list[str]:
    """Bearer tokens, one per line (several allow rotation). The file must not be readable by
    other users: a token in a world-readable file is no secret."""
    try:
        st = os.stat(path)
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ToolkitError(f"cannot read the token file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:  # a key or other binary file given in its place
        raise ToolkitError(f"the token file {path} is not UTF-8 text (byte {e.start})",
                           hint=TOKEN_HINT) from e
    if st.st_mode & 0o077:
        raise ToolkitError(f"the token file {path} is readable by other users "
                           f"(mode {stat.S_IMODE(st.st_mode):o})", hint=f"chmod 600 {path}")
    tokens = [t.strip() for t in lines if t.strip() and not t.startswith("#")]
    if not tokens:
        raise ToolkitError(f"the token file {path} holds no token")
    for i, token in enumerate(tokens, 1):
        if problem := token_problem(token):
            raise ToolkitError(f"token {i} in {path} {problem}", hint=TOKEN_HINT)
    return tokens


TOKEN_HINT = ("generate one: `toolkit devices add NAME URI --new-token` prints it, or "
              "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")


def token_problem(token: str) -> str | None:
    """Why a bearer token is too weak to guard a port, or None. Randomness cannot be measured,
    so this refuses what is surely not random: too short, whitespace, or few distinct
    characters (a 22-character token_urlsafe has ~19 distinct characters on average)."""
    if len(token) < MIN_TOKEN_CHARS:
        return (f"is {len(token)} characters; a token must have at least {MIN_TOKEN_CHARS} "
                "(16 random bytes)")
    if any(c.isspace() for c in token):
        return "contains whitespace"
    if len(set(token)) < 8:
        return f"uses only {len(set(token))} distinct characters; it is not random"
    return None


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context: TLS 1.2 at least, the certificate chain and its key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise ToolkitError(f"cannot load the TLS certificate {cert} with the key {key}: {e}",
                           hint="pass a PEM certificate (chain) and its PEM private key") from e
    return ctx


def cert_fingerprint(cert: Path) -> str:
    """'sha256:<hex>' of a PEM certificate's DER bytes: what a client pins (`--pin`)."""
    try:
        der = ssl.PEM_cert_to_DER_cert(Path(cert).read_text(encoding="ascii"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ToolkitError(f"cannot read the certificate {cert}: {e}") from e
    return "sha256:" + hashlib.sha256(der).hexdigest()


# --- the request handler ---------------------------------------------------------------------

class _DeadlineReader(io.RawIOBase):
    """The connection's raw reads, each bounded by the phase it serves.

    Waiting for a request (`expect_request(idle_s)`): the first byte may take idle_s; it starts
    the header deadline. Otherwise every read must finish before `deadline`. After each read
    the socket's timeout goes back to WRITE_TIMEOUT_S, which bounds the sends."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.waiting_s: float | None = None
        self.deadline = time.monotonic() + HEADER_TIMEOUT_S

    def readable(self) -> bool:
        return True

    def expect_request(self, idle_s: float) -> None:
        self.waiting_s = idle_s

    def readinto(self, b: Any) -> int:
        if self.waiting_s is not None:
            timeout = self.waiting_s
        else:
            timeout = self.deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError("the request took longer than its deadline")
        self.sock.settimeout(timeout)
        try:
            n = self.sock.recv_into(b)
        finally:
            self.sock.settimeout(WRITE_TIMEOUT_S)
        if n and self.waiting_s is not None:
            self.waiting_s = None
            self.deadline = time.monotonic() + HEADER_TIMEOUT_S
        return n


class _CountingReader(io.BufferedReader):
    """A buffered reader that counts the bytes it hands out, so the handler knows how much of
    a request body its route read (routes read bodies their own way: json, chunks into
    files)."""

    delivered = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.delivered += len(data)
        return data

    def read1(self, size: int = -1) -> bytes:
        data = super().read1(size)
        self.delivered += len(data)
        return data

    def readinto(self, b: Any) -> int:
        n = super().readinto(b)
        self.delivered += n
        return n

    def readline(self, size: int | None = -1) -> bytes:
        data = super().readline(size)
        self.delivered += len(data)
        return data


class _Writer:
    """wfile: every write is sent whole (sendall), like socketserver's own private writer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> int:
        self.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Handler(BaseHTTPRequestHandler):
    """One thread per connection. Routing and error shapes belong to the App; this class reads
    bodies under deadlines, writes JSON / text / SSE, checks the bearer token and notices
    vanished clients."""

    protocol_version = "HTTP/1.1"
    server_version = "toolkit-daemon"
    _headers_buffer: list[bytes]  # BaseHTTPRequestHandler's own (send_header fills it; typeshed omits it)
    server: _Server  # type: ignore[assignment]
    rfile: _CountingReader  # type: ignore[assignment]  # setup() installs it
    response_started = False  # once a status line is out, an error can only close the connection
    status_sent: int | None = None  # for the access log
    requests_served = 0
    body_length = 0  # this request's Content-Length (0 when absent or invalid)
    _body_start = 0  # rfile.delivered when the body began
    gone_checked_at = 0.0  # time.monotonic() of the last client_gone() look while events flow

    def setup(self) -> None:
        self.connection = self.request
        # http.server writes a response's headers and body in two sends; with Nagle on, the
        # small second one waits for the client's delayed ACK (40 ms on Linux) on every reply
        if self.connection.family in (socket.AF_INET, socket.AF_INET6):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = _DeadlineReader(self.connection)
        self.rfile = _CountingReader(self.raw, 1 << 16)
        self.wfile = _Writer(self.connection)  # type: ignore[assignment]

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            self.rfile.close()

    def handle_one_request(self) -> None:
        self.raw.expect_request(IDLE_TIMEOUT_S if self.requests_served else FIRST_BYTE_TIMEOUT_S)
        self.requests_served += 1
        try:
            super().handle_one_request()
        except ConnectionError as e:  # reset or closed under us outside a route (which answers
            # ClientGone): a client that left without reading its answer resets the connection
            # this thread waits on for the next request. Not an error of ours: socketserver
            # would print a traceback for it
            log.info("%s: connection reset by the client (%s)", self.address_string(), e)
            self.close_connection = True

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status_sent, self.response_started = code, True
        super().send_response(code, message)

    # BaseHTTPRequestHandler calls do_<METHOD> once the request line and headers are read
    def do_GET(self) -> None:
        try:
            self.body_length = max(0, self.content_length())
        except HTTPError:
            self.body_length = 0  # read_body answers 400; the connection closes after it
        self._body_start = self.rfile.delivered
        self.raw.deadline = time.monotonic() + BODY_GRACE_S + self.body_length / BODY_MIN_RATE
        try:
            self.server.app.dispatch(self)
        finally:
            self._settle_body()

    do_POST = do_DELETE = do_PUT = do_HEAD = do_PATCH = do_OPTIONS = do_GET

    def __getattr__(self, name: str) -> Any:
        # any other method reaches the app too, which answers 405 with Allow (http.server's
        # own answer would be 501, a 5xx for a client's mistake)
        if name.startswith("do_"):
            return self.do_GET
        raise AttributeError(name)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, HTTP/2.0 sent as text, headers
        too long): a client's mistake is a 4xx; 505 and 501 become 400."""
        if code >= 500 and code != 503:
            code = 400
        if self.request_version == "HTTP/0.9":  # an unparsable version: answer with a status
            self.request_version = "HTTP/1.0"  # line anyway (no 0.9 client exists to serve)
        self.close_connection = True
        # JSON like every other error the daemon sends, not http.server's HTML page (whose
        # template would also not escape quotes echoed from the request line)
        text = message or self.responses.get(code, ("bad request",))[0]
        body = json.dumps({"error": {"message": text, "type": "invalid_request_error", "param": None,
                                     "code": "bad_request"}}).encode()
        log.debug("%s: answered %d: %s", self.address_string(), code, text)
        try:
            self.send_bytes(code, body, "application/json")
        except (ClientGone, OSError) as e:  # the client hung up before the error went out
            log.info("could not send %d (%s): %s", code, message, e.__cause__ or e)

    def parse_request(self) -> bool:
        """http.server's parse, minus HTTP/0.9: a request line without a version would be
        answered without a status line or headers, which the routes cannot write."""
        if not super().parse_request():
            return False
        if self.request_version == "HTTP/0.9":
            self.send_error(400, "a request line needs a version (HTTP/1.0 or HTTP/1.1)")
            return False
        return True

    def _settle_body(self) -> None:
        """The body the route did not read must not become the next request: read and drop a
        little of it, or hang up."""
        if self.close_connection:
            return
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # refused (411) unread: its end cannot be found
            return
        left = self.body_length - (self.rfile.delivered - self._body_start)
        if left <= 0:
            return
        if left > DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            while left > 0:
                got = self.rfile.read(min(left, 1 << 16))
                if not got:
                    self.close_connection = True
                    return
                left -= len(got)
        except OSError:
            self.close_connection = True

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

    def content_length(self) -> int:
        """The request's Content-Length, 0 when absent: the one reading of it (body_length, the
        body readers). Not a number, or sent twice with different values (RFC 9112 §6.3: where
        the body ends is unknown), is a 400 and the connection closes; a repeated value is one."""
        values = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        # 1*DIGIT (RFC 9110 §8.6): int() also takes -5 (read as no body, the rest then parsed
        # as the next request), +3 and 3_0
        if not all(v.isascii() and v.isdigit() for v in values if v):
            self.close_connection = True
            raise HTTPError(400, "Content-Length is not a byte count (digits only); send the body's "
                                 "length in bytes")
        lengths = {int(v or 0) for v in values}
        if len(lengths) > 1:
            self.close_connection = True
            raise HTTPError(400, "Content-Length is sent more than once with different values; send one")
        return lengths.pop() if lengths else 0

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        length = self.content_length()
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
            if self.close_connection and "Connection" not in (headers or {}):
                # decided before this reply (a 400/413 whose body cannot be framed or is left
                # unread): say so, or an HTTP/1.1 client sends its next request into the hang-up
                self.send_header("Connection", "close")
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
        EOF, or a pipelined next request, which the peek below keeps in the reader's buffer
        for its turn. TLS cannot MSG_PEEK, so the peek goes through the buffered reader.)"""
        try:
            pending = isinstance(self.connection, ssl.SSLSocket) and self.connection.pending() > 0
            if not pending and not select.select([self.connection], [], [], 0)[0]:
                return False
            saved_wait, saved_deadline = self.raw.waiting_s, self.raw.deadline
            self.raw.waiting_s, self.raw.deadline = None, time.monotonic() + 0.05
            try:
                return self.rfile.peek(1) == b""
            finally:
                self.raw.waiting_s, self.raw.deadline = saved_wait, saved_deadline
        except TimeoutError:  # readable, but only part of a TLS record yet: someone is there
            return False
        except (OSError, ValueError):
            return True

    def start_sse(self) -> SSEStream:
        # HTTP/1.0 has no chunked coding (RFC 9112 §7.1): its stream is the bare events, ended
        # by closing the connection
        chunked = self.request_version != "HTTP/1.0"
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            if chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.send_header("X-Accel-Buffering", "no")  # proxies must not buffer the stream
            self.end_headers()
        except (BrokenPipeError, ConnectionResetError) as e:
            raise ClientGone() from e
        return SSEStream(self, chunked)


class SSEStream:
    """Server-sent events over chunked transfer: one chunk per event, written at once (bare
    events, not chunks, for an HTTP/1.0 client; the connection's close ends them)."""

    def __init__(self, handler: Handler, chunked: bool = True) -> None:
        self.handler = handler
        self.chunked = chunked
        self.last_write = time.monotonic()
        self.closed = False

    def _chunk(self, payload: bytes) -> None:
        try:
            self.handler.wfile.write(b"%X\r\n%s\r\n" % (len(payload), payload) if self.chunked
                                     else payload)
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
        if self.closed:
            return
        self.closed = True
        if not self.chunked:
            return  # the handler closes the connection: that ends a 1.0 stream
        try:
            self.handler.wfile.write(b"0\r\n\r\n")
        except OSError as e:
            raise ClientGone() from e
