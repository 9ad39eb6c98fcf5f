"""The deploy protocol: the same six messages over HTTP (Unix socket or TCP) and over a serial link.

    hello                       -> device facts: target family, TensorRT, backend, active bundle,
                                   free memory and disk, limits, chunk sizes (the host measures RTT)
    begin(manifest.json bytes)  -> upload id (SHA-256 of those bytes) + bytes held per file (resume)
    chunk(id, path, offset, crc32, data) -> bytes now held of that file
    commit(id)                  -> InstallResult: verify, switch, smoke test, rollback info
    rollback                    -> InstallResult of going back to the previous bundle
    status                      -> the store: active, previous, bundles, uploads in progress

Over HTTP (routes the daemon mounts beside its own; over TCP they need its bearer token):

    GET  /v1/deploy/hello                                     hello
    GET  /v1/deploy/status                                    status
    POST /v1/deploy/uploads              body: manifest.json  begin
    PUT  /v1/deploy/uploads/{id}?path=P&offset=N&crc32=C      body: the chunk's bytes
    POST /v1/deploy/uploads/{id}/commit                       commit
    POST /v1/deploy/rollback                                  rollback

Errors are JSON {"error": {"message", "code", ...}} with the HTTP status (409 "gap": ask begin for
the offsets again; 422 "bad_crc": send the chunk again; 422 "verify_failed"; 413 "too_large";
404 "unknown_upload"; 507 "no_space"; 400 "incompatible").

Over the serial link (device/serial_link.py) each message is one link message:

    u32 little-endian header length | header JSON {"op": ..., fields} | binary payload

and the reply is the same envelope with header {"ok": true, "result": {...}} or {"ok": false,
"status": N, "error": {"message", "code"}}. The link does its own framing, CRC and retransmission;
the chunk's own CRC32 is checked by the store either way, end to end.

Chunk sizes: 8 MiB over HTTP, two requests in flight (HTTP/1.1 pipelining on one connection:
the next chunk travels while the device checks and writes the previous one). A request costs
~0.5 ms of Python and syscalls on each side, so bigger chunks go faster on a fast link (loopback:
8 MiB +10 % over 4 MiB); 8 MiB is the store's body limit (max_chunk_bytes) and 67 ms of a
gigabit link, the most a dropped connection sends again. Both sides move a chunk in 1 MiB
pieces through one reused buffer: the host reads a piece of the file and sends it, the device
reads a piece, takes its CRC32 while it is in cache and writes it (Store.receive_chunk). On
loopback, where the device's thread is the bottleneck, this beats sendfile + splice by ~1.27x
(sendfile hands the device the host's page-cache pages to copy cold from memory; splice needs
the piece read back for its CRC). 64 KiB over
serial, one at a time (0.7 s at 921600 baud: the reply's turnaround is < 1 % of that, and the
link below keeps its own window of frames full). The device announces both in hello. Resume is
per file: `begin` reports the bytes the store holds of each file (a file's length on disk; every
byte below it passed its chunk's CRC) and the host continues from there, on a new connection
after a drop, or in a new `toolkit deploy` run.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import platform
import re
import shutil
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, urlsplit

from device.client import UnixHTTPConnection, connect_unix
from device.serial_link import Link, LinkConfig, LinkDown, open_port
from device.store import (
    Activate,
    ChunkAck,
    FileProgress,
    InstallResult,
    Store,
    StoreError,
    StoreLimits,
    UploadState,
    install_result_from_json,
    to_json,
)
from toolkit.errors import ToolkitError
from toolkit.manifest import Manifest

log = logging.getLogger("toolkit.deploy")

PROTOCOL = 1
PREFIX = "/v1/deploy"
HTTP_CHUNK = 8 << 20
PIPELINE = 2  # chunk requests in flight on HTTP
SERIAL_CHUNK = 64 << 10
ENVELOPE = struct.Struct("<I")
MAX_HEADER = 1 << 20


# --- device facts and compatibility --------------------------------------------------------------

@dataclass(frozen=True)
class DeviceFacts:
    """What the host needs to know before sending a byte: can this device run the bundle?"""

    family: str  # "jetson" | "cpu"
    arch: str
    tensorrt: str | None  # TensorRT version, None without one
    memory_total: int  # bytes
    memory_available: int | None
    disk_free: int | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DeviceFacts:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def local_facts(store_root: Path | None = None, memory_total: int | None = None) -> DeviceFacts:
    """This machine's facts (the daemon's hello). memory_total overrides MemTotal (tests)."""
    import psutil

    from device.engine_identity import _tensorrt_version
    from device.runner import device_family

    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(store_root).free if store_root else None
    return DeviceFacts(device_family(), platform.machine(), _tensorrt_version(),
                       int(memory_total or vm.total), int(vm.available), disk)


def compatibility_problems(manifest: Manifest, facts: DeviceFacts) -> list[str]:
    """Why this device cannot run the bundle, as sentences (empty: it can). Checked by the host
    before any byte is sent, and again by the device on begin."""
    from toolkit.contract import DECODER_CONTRACT, ENCODER_CONTRACT

    problems = []
    target = manifest.target
    name = target.get("name", "?")
    if target.get("runtime") == "tensorrt" and not facts.tensorrt:
        problems.append(f"the bundle is for {name} (TensorRT) but the device is a {facts.family} "
                        f"({facts.arch}) without TensorRT; convert it with --target cpu for this "
                        "device, or deploy it to the Jetson it was made for")
    if manifest.contract.get("name") not in (DECODER_CONTRACT, ENCODER_CONTRACT):
        problems.append(f"bundle contract {manifest.contract.get('name')!r} cannot be served")
    fit = plan_problem(manifest, facts.memory_total)
    if fit:
        problems.append(fit)
    return problems


def plan_problem(manifest: Manifest, memory_total: int) -> str | None:
    """The bundle's fit plan (targets/plan.py) redone against the device's real memory; None
    when it fits or the bundle carries no plan (encoders)."""
    if manifest.kind != "decoder" or not manifest.plan:
        return None
    from models.dims import ModelDims
    from targets import load_target
    from targets.plan import plan_fit

    try:
        dims = ModelDims(**manifest.architecture["dims"])
        target = load_target(str(manifest.target.get("name")))
        result = plan_fit(dims, target, manifest.precision, manifest.max_seq, manifest.batch,
                          prefill_chunk=manifest.plan.get("prefill_chunk"), memory_bytes=memory_total)
    except (KeyError, TypeError) as e:
        return f"the bundle's manifest has no usable dims for a fit check ({e})"
    except ToolkitError as e:
        return f"the bundle's plan cannot be checked on this device: {e.message}"
    if result.fits:
        return None
    return (f"the bundle does not fit the device's {memory_total / (1 << 30):.2f} GiB of memory: "
            f"{result.explain()}")


# --- the device side ---------------------------------------------------------------------------

@dataclass
class DeployService:
    """The six operations over a Store; transports (HTTP routes, serial) call these.

    activate(path): load + smoke-test the bundle and start serving it (the daemon swaps its
    engine); info(): the daemon's own hello fields (backend, state)."""

    store: Store
    activate: Activate
    info: Callable[[], dict[str, Any]] = field(default=lambda: {})
    memory_total: int | None = None  # overrides MemTotal in hello and begin's fit check (tests)
    http_chunk: int = HTTP_CHUNK  # the chunk size hello asks HTTP clients to use
    _commit_lock: threading.Lock = field(default_factory=threading.Lock)
    _buffers: threading.local = field(default_factory=threading.local)  # one chunk buffer per thread

    def facts(self) -> DeviceFacts:
        return local_facts(self.store.root, self.memory_total)

    def hello(self) -> dict[str, Any]:
        active = self.store.active
        backend = None
        if active is not None:
            try:
                backend = json.loads((self.store.path_of(active) / "manifest.json").read_text())["target"]
            except (OSError, ValueError, KeyError):
                backend = None
        limits = self.store.limits
        return {"protocol": PROTOCOL, "facts": asdict(self.facts()),
                "active": asdict(active) if active else None,
                "previous": asdict(self.store.previous) if self.store.previous else None,
                "target": backend, "limits": asdict(limits),
                "chunk": {"http": min(self.http_chunk, limits.max_chunk_bytes), "serial": SERIAL_CHUNK},
                **self.info()}

    def begin(self, manifest_bytes: bytes) -> UploadState:
        facts = self.facts()

        def check(manifest: Manifest) -> None:
            problems = compatibility_problems(manifest, facts)
            if problems:
                raise StoreError("this device cannot run the bundle: " + "; ".join(problems),
                                 code="incompatible", status=400)

        return self.store.begin(manifest_bytes, check)

    def chunk(self, upload_id: str, path: str, offset: int, crc32: int, data: bytes | memoryview) -> ChunkAck:
        return self.store.write_chunk(upload_id, path, offset, data, crc32)

    def commit(self, upload_id: str) -> InstallResult:
        with self._commit_lock:  # one install at a time, whatever the transport
            return self.store.commit(upload_id, self.activate)

    def rollback(self) -> InstallResult:
        with self._commit_lock:
            return self.store.rollback(self.activate)

    def status(self) -> dict[str, Any]:
        return to_json(self.store.status())

    # -- the serial transport --

    def handle_message(self, message: bytes) -> bytes:
        """One serial request -> its reply (never raises: errors are replies)."""
        try:
            header, payload = unpack(message)
            result = self._dispatch(header, payload)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except StoreError as e:
            reply = {"ok": False, "status": e.status, "error": {"message": str(e), "code": e.code}}
        except ToolkitError as e:
            reply = {"ok": False, "status": 400, "error": {"message": str(e), "code": "refused"}}
        except Exception:  # noqa: BLE001 - a bug answers 500 with a logged traceback; the daemon lives
            log.exception("deploy message failed")
            reply = {"ok": False, "status": 500,
                     "error": {"message": "internal error; the daemon log has the details",
                               "code": "internal_error"}}
        if isinstance(header_rid := _rid(message), int):
            reply["rid"] = header_rid
        return pack(reply)

    def _dispatch(self, h: dict[str, Any], payload: bytes) -> Any:
        op = h.get("op")
        if op == "hello":
            return self.hello()
        if op == "status":
            return self.status()
        if op == "begin":
            return to_json(self.begin(payload))
        if op == "chunk":
            return to_json(self.chunk(str(h["id"]), str(h["path"]), int(h["offset"]), int(h["crc32"]),
                                      payload))
        if op == "commit":
            return to_json(self.commit(str(h["id"])))
        if op == "rollback":
            return to_json(self.rollback())
        raise StoreError(f"unknown operation {op!r}", code="unknown_op")

    # -- the HTTP transport --

    def routes(self) -> list[tuple[str, re.Pattern[str], Callable[..., None]]]:
        """(method, path pattern, handler(h, **groups)) in the daemon's route-table shape."""
        return [
            ("GET", re.compile(PREFIX + r"/hello"), self._http_hello),
            ("GET", re.compile(PREFIX + r"/status"), self._http_status),
            ("POST", re.compile(PREFIX + r"/uploads"), self._http_begin),
            ("PUT", re.compile(PREFIX + r"/uploads/(?P<upload_id>[0-9a-f]{64})"), self._http_chunk),
            ("POST", re.compile(PREFIX + r"/uploads/(?P<upload_id>[0-9a-f]{64})/commit"), self._http_commit),
            ("POST", re.compile(PREFIX + r"/rollback"), self._http_rollback),
        ]

    def _http_hello(self, h: Any) -> None:
        h.send_json(200, self.hello())

    def _http_status(self, h: Any) -> None:
        h.send_json(200, self.status())

    def _http_begin(self, h: Any) -> None:
        with _as_http_error():
            h.send_json(200, to_json(self.begin(h.read_body())))

    def _http_chunk(self, h: Any, upload_id: str) -> None:
        from device.httpd import HTTPError

        query = parse_qs(urlsplit(h.path).query)
        try:
            path, offset, crc = query["path"][0], int(query["offset"][0]), int(query["crc32"][0])
        except (KeyError, IndexError, ValueError) as e:
            raise HTTPError(400, "a chunk needs ?path=P&offset=N&crc32=C", "invalid_request") from e
        n = self._body_length(h)
        body = _Body(h)
        try:
            with _as_http_error():  # the next chunk of a file goes into the file as it arrives
                ack = self.store.receive_chunk(upload_id, path, offset, n, crc, body.read_into)
                if ack is None:  # anything else: the whole body first, then write_chunk
                    ack = self.chunk(upload_id, path, offset, crc, self._read_chunk(h, n))
                    body.consumed = n
        finally:
            if body.consumed < n:  # an unread body would be parsed as the next request
                h.close_connection = True
        h.send_json(200, to_json(ack))

    def _body_length(self, h: Any) -> int:
        """The chunk's Content-Length, checked against the store's limit before reading."""
        from device.httpd import HTTPError

        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            h.close_connection = True
            raise HTTPError(411, "send chunks with Content-Length, not chunked encoding")
        try:
            n = int(h.headers.get("Content-Length") or 0)
        except ValueError as e:
            h.close_connection = True
            raise HTTPError(400, "Content-Length is not a number") from e
        limit = self.store.limits.max_chunk_bytes
        if not 0 <= n <= limit:
            h.close_connection = True  # the unread body would be parsed as the next request
            raise HTTPError(413, f"chunk of {n} bytes exceeds the {limit}-byte limit", "too_large")
        return n

    def _read_chunk(self, h: Any, n: int) -> memoryview:
        """The request body, read into this connection thread's reusable buffer (a fresh 8 MiB
        bytes per chunk costs page faults and a copy)."""
        from device.httpd import HTTPError

        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < n:
            buf = self._buffers.buf = bytearray(max(n, HTTP_CHUNK))
        view = memoryview(buf)[:n]
        got = 0
        while got < n:
            k = h.rfile.readinto(view[got:])
            if not k:
                h.close_connection = True
                raise HTTPError(400, f"the chunk ended after {got} of {n} bytes")
            got += k
        return view

    def _http_commit(self, h: Any, upload_id: str) -> None:
        with _as_http_error():
            h.send_json(200, to_json(self.commit(upload_id)))

    def _http_rollback(self, h: Any) -> None:
        with _as_http_error():
            h.send_json(200, to_json(self.rollback()))


class _Body:
    """A request body for Store.receive_chunk, read piece by piece into its buffer (the request
    reader's own buffered bytes first, then straight from the socket), counting what was read."""

    def __init__(self, h: Any) -> None:
        self.h, self.consumed = h, 0

    def read_into(self, view: memoryview) -> int:
        n = self.h.rfile.readinto(view) or 0  # fills the view unless the body ends early
        self.consumed += n
        return n


class _as_http_error:
    """StoreError -> the daemon's HTTPError (its dispatcher writes the JSON error body)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, StoreError):
            from device.httpd import HTTPError

            raise HTTPError(exc.status, str(exc), exc.code) from exc


def _rid(message: bytes) -> Any:
    try:
        return unpack(message)[0].get("rid")
    except ValueError:
        return None


def pack(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return ENVELOPE.pack(len(head)) + head + payload


def unpack(message: bytes) -> tuple[dict[str, Any], bytes]:
    """Envelope -> (header, payload); ValueError when it is not one."""
    if len(message) < ENVELOPE.size:
        raise ValueError("message shorter than its envelope")
    (n,) = ENVELOPE.unpack_from(message)
    if n > MAX_HEADER or ENVELOPE.size + n > len(message):
        raise ValueError("message header length is out of range")
    header = json.loads(message[ENVELOPE.size:ENVELOPE.size + n])
    if not isinstance(header, dict):
        raise ValueError("message header is not an object")
    return header, message[ENVELOPE.size + n:]


# --- the host side: one client per transport -------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    """A piece of one bundle file: its bytes stay in the file until a transport sends them."""

    path: str  # the manifest path of its file
    offset: int
    length: int
    crc32: int
    file: Path  # where the bytes are on the host

    @property
    def data(self) -> bytes:
        return read_range(self.file, self.offset, self.length)


def read_range(path: Path, offset: int, length: int) -> bytes:
    """`length` bytes of a file from `offset`; a file that got shorter is a ToolkitError."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), length, offset)
    except OSError as e:
        raise ToolkitError(f"cannot read {path}: {e}") from e
    if len(data) != length:
        raise ToolkitError(f"{path} is shorter than its manifest says; it changed after verification",
                           hint="deploy again")
    return data


class RemoteError(ToolkitError):
    """The device refused a request; `code` says why (see the module docstring)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Hello:
    facts: DeviceFacts
    active: dict[str, Any] | None
    previous: dict[str, Any] | None
    target: dict[str, Any] | None  # the active bundle's target record
    chunk: int  # the chunk size to use on this transport
    rtt_s: float
    raw: dict[str, Any]

    @property
    def backend(self) -> str:
        backend = self.raw.get("backend")
        if isinstance(backend, dict):  # the daemon's backend.describe()
            return str(backend.get("backend") or backend.get("kind") or backend)
        if isinstance(backend, str):
            return backend
        return str((self.target or {}).get("runtime") or "none")


class DeployClient:
    """Transport-independent calls; subclasses implement `_call`."""

    transport = "?"

    def _call(self, op: str, fields: dict[str, Any], payload: bytes | memoryview = b"",
              timeout: float = 60.0) -> Any:
        raise NotImplementedError

    def hello(self) -> Hello:
        t0 = time.perf_counter()
        raw = self._call("hello", {})
        rtt = time.perf_counter() - t0
        chunk = int(raw.get("chunk", {}).get(self.transport, SERIAL_CHUNK))
        return Hello(DeviceFacts.from_json(raw["facts"]), raw.get("active"), raw.get("previous"),
                     raw.get("target"), chunk, rtt, raw)

    def begin(self, manifest_bytes: bytes) -> UploadState:
        r = self._call("begin", {}, manifest_bytes)
        files = {k: FileProgress(int(v["size"]), int(v["held"])) for k, v in r["files"].items()}
        return UploadState(r["upload_id"], r["name"], files, bool(r.get("installed")))

    def chunk(self, upload_id: str, path: str, offset: int, crc32: int, data: bytes | memoryview) -> int:
        r = self._call("chunk", {"id": upload_id, "path": path, "offset": offset, "crc32": crc32}, data)
        return int(r["held"])

    def send_chunks(self, upload_id: str, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, int]]:
        """Send chunks in order; yields (chunk, bytes the device now holds of its file). This
        one waits for each answer; HttpDeployClient keeps two requests in flight."""
        for c in chunks:
            yield c, self.chunk(upload_id, c.path, c.offset, c.crc32, c.data)

    def commit(self, upload_id: str, timeout: float = 900.0) -> InstallResult:
        return install_result_from_json(self._call("commit", {"id": upload_id}, timeout=timeout))

    def rollback(self, timeout: float = 900.0) -> InstallResult:
        return install_result_from_json(self._call("rollback", {}, timeout=timeout))

    def status(self) -> dict[str, Any]:
        return dict(self._call("status", {}))

    def reconnect(self) -> None:
        """Drop the connection; the next call opens a new one."""

    def close(self) -> None:
        self.reconnect()


class HttpDeployClient(DeployClient):
    """One keep-alive HTTP/1.1 connection (Unix socket or TCP), reopened after a failure."""

    transport = "http"

    def __init__(self, uri: str, token: str | None = None) -> None:
        parts = urlsplit(uri)
        self.uri, self.token = uri, token
        self.scheme = parts.scheme
        if parts.scheme == "unix" and parts.path:
            self.path = parts.path
        elif parts.scheme == "tcp" and parts.hostname and parts.port:
            self.host, self.port = parts.hostname, parts.port
        else:
            raise ToolkitError(f"{uri!r} is not a daemon address", hint="use unix:///path.sock or tcp://host:port")
        self._conn: http.client.HTTPConnection | None = None
        self._timeout = 60.0

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = (UnixHTTPConnection(Path(self.path), timeout) if self.scheme == "unix"
                          else http.client.HTTPConnection(self.host, self.port, timeout=timeout))
        if self._conn.sock is not None and timeout != self._timeout:
            self._conn.sock.settimeout(timeout)
        self._conn.timeout = self._timeout = timeout
        return self._conn

    def _call(self, op: str, fields: dict[str, Any], payload: bytes | memoryview = b"",
              timeout: float = 60.0) -> Any:
        method, path = {
            "hello": ("GET", "/hello"), "status": ("GET", "/status"), "begin": ("POST", "/uploads"),
            "chunk": ("PUT", f"/uploads/{fields.get('id')}?path={quote(str(fields.get('path')), safe='')}"
                             f"&offset={fields.get('offset')}&crc32={fields.get('crc32')}"),
            "commit": ("POST", f"/uploads/{fields.get('id')}/commit"), "rollback": ("POST", "/rollback"),
        }[op]
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(payload))}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection(timeout)
        try:
            conn.request(method, PREFIX + path, body=payload if method != "GET" else None, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.reconnect()
            if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
                raise LinkDown(f"no daemon is listening at {self.uri}",
                               hint="start it on the device (`toolkit serve ... --store DIR`)") from e
            raise LinkDown(f"the connection to {self.uri} failed: {e or type(e).__name__}") from e
        if resp.will_close:
            self.reconnect()
        try:
            obj = json.loads(body) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RemoteError(f"the device at {self.uri} answered {resp.status} with non-JSON "
                              f"{body[:200]!r}", resp.status, "bad_reply") from e
        if resp.status >= 400:
            raise _remote_error(obj, resp.status, self.uri)
        return obj

    def reconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- pipelined chunks --

    def send_chunks(self, upload_id: str, chunks: Iterable[Chunk]) -> Iterator[tuple[Chunk, int]]:
        """HTTP/1.1 pipelining, PIPELINE requests deep: the next chunk travels while the device
        checks and writes the previous one (the daemon answers a connection's requests in
        order). http.client cannot pipeline, so this speaks HTTP on a raw socket; the first
        error answer ends the batch (the later ones answer a stream that no longer matters)."""
        sock = self._raw_socket()
        reader = sock.makefile("rb")
        pending: deque[Chunk] = deque()
        files = _OpenFiles()
        piece = memoryview(bytearray(SEND_PIECE))
        try:
            for c in chunks:
                head = (f"PUT {PREFIX}/uploads/{upload_id}?path={quote(c.path, safe='')}&offset={c.offset}"
                        f"&crc32={c.crc32} HTTP/1.1\r\nHost: device\r\nContent-Type: application/"
                        f"octet-stream\r\nContent-Length: {c.length}\r\n")
                if self.token:
                    head += f"Authorization: Bearer {self.token}\r\n"
                try:
                    sock.sendall(head.encode() + b"\r\n")
                    _send_range(sock, files.get(c.file), c, piece)
                except OSError as e:
                    raise LinkDown(f"the connection to {self.uri} failed: {e}") from e
                pending.append(c)
                if len(pending) >= PIPELINE:
                    done = pending.popleft()
                    yield done, self._chunk_reply(reader)
            while pending:
                done = pending.popleft()
                yield done, self._chunk_reply(reader)
        finally:
            files.close()
            reader.close()
            sock.close()

    def _raw_socket(self) -> socket.socket:
        try:
            if self.scheme == "unix":
                sock = connect_unix(self.path, 60.0)
            else:
                sock = socket.create_connection((self.host, self.port), timeout=60.0)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise LinkDown(f"cannot connect to {self.uri}: {e}") from e
        return sock

    def _chunk_reply(self, reader: Any) -> int:
        """Read one HTTP response (status, headers, Content-Length body) -> held."""
        try:
            status_line = reader.readline(65537)
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[1].isdigit():
                raise LinkDown(f"the connection to {self.uri} broke off (reply {status_line[:80]!r})")
            status, length = int(parts[1]), 0
            while (line := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = reader.read(length) if length else b""
        except (OSError, ValueError) as e:
            raise LinkDown(f"the connection to {self.uri} failed: {e}") from e
        try:
            obj = json.loads(body) if body else None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RemoteError(f"the device answered {status} with non-JSON {body[:200]!r}", status,
                              "bad_reply") from e
        if status >= 400:
            raise _remote_error(obj, status, self.uri)
        if not isinstance(obj, dict) or "held" not in obj:
            raise RemoteError(f"the device answered a chunk with {body[:200]!r}", status, "bad_reply")
        return int(obj["held"])


class _OpenFiles:
    """The bundle file being sent, kept open from one chunk to the next."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._file: BinaryIO | None = None

    def get(self, path: Path) -> BinaryIO:
        if path != self.path or self._file is None:
            self.close()
            try:
                self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
            except OSError as e:
                raise ToolkitError(f"cannot read {path}: {e}") from e
            self.path = path
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.path = None, None


SEND_PIECE = 1 << 20  # the host reads and sends a chunk this much at a time


def _send_range(sock: socket.socket, file: BinaryIO, c: Chunk, buf: memoryview) -> None:
    """The chunk's bytes from the file to the socket, a piece at a time through `buf` (not
    sendfile: see the module notes). A file that ends early leaves the request short: an
    error, and the connection is dropped."""
    pos, end = c.offset, c.offset + c.length
    while pos < end:
        k = os.preadv(file.fileno(), [buf[:min(len(buf), end - pos)]], pos)
        if k <= 0:
            raise ToolkitError(f"{c.file} is shorter than its manifest says; it changed after "
                               "verification", hint="deploy again")
        sock.sendall(buf[:k])
        pos += k


def _remote_error(obj: Any, status: int, where: str) -> RemoteError:
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict):
        message, code = str(err.get("message") or err), str(err.get("code") or status)
    else:
        message, code = str(err or obj), str(status)
    if status == 401:
        message += " (check the device's token file: `toolkit devices add NAME tcp://...?token-file=F`)"
    elif status == 404 and code in ("not_found", "404"):
        message = f"{where} has no deploy routes (is the daemon started with --store?)"
    return RemoteError(message, status, code)


class SerialDeployClient(DeployClient):
    """The messages over a serial link (device/serial_link.py); the link is reconnected (a new
    session; the frame size it learned is kept) after it drops."""

    transport = "serial"

    def __init__(self, port: str, baud: int, config: LinkConfig | None = None) -> None:
        self.port_path, self.baud, self.config = port, baud, config
        self._port: Any = None
        self._link: Link | None = None
        self._rid = 0

    def _ensure(self) -> Link:
        if self._port is None:
            self._port = open_port(self.port_path, self.baud)
        if self._link is None:
            self._link = Link(self._port, "host", self.config)
        if not self._link.connected or self._link._failed:
            self._link.connect()
        return self._link

    def _call(self, op: str, fields: dict[str, Any], payload: bytes | memoryview = b"",
              timeout: float = 60.0) -> Any:
        link = self._ensure()
        self._rid += 1
        data = link.request(pack({"op": op, "rid": self._rid, **fields}, bytes(payload)), timeout)
        try:
            header, _ = unpack(data)
        except ValueError as e:
            raise LinkDown(f"the device sent a malformed reply: {e}") from e
        if header.get("rid") != self._rid:
            raise LinkDown("the device answered another request (a stale reply)")
        if not header.get("ok"):
            err = header.get("error") or {}
            raise RemoteError(str(err.get("message")), int(header.get("status", 400)), str(err.get("code")))
        return header.get("result")

    def reconnect(self) -> None:
        if self._link is not None:
            self._link.connected = False  # the next call starts a new session on the same port

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
        if self._port is not None:
            self._port.close()
            self._port = None


# --- a store-only daemon (tests, bench, and boards that only receive bundles) --------------------

class DeployApp:
    """A device/httpd App serving only the deploy routes (the full daemon mounts the same
    routes beside its own)."""

    def __init__(self, service: DeployService) -> None:
        self.service = service
        self.routes = service.routes()

    def dispatch(self, h: Any) -> None:
        from device.httpd import ClientGone, HTTPError

        path = h.route_path
        try:
            if not h.authorized():
                raise HTTPError(401, "missing or invalid bearer token", "invalid_api_key")
            for verb, pattern, route in self.routes:
                m = pattern.fullmatch(path)
                if m and verb == h.command:
                    route(h, **m.groupdict())
                    return
            raise HTTPError(404, f"no route {h.command} {path}", "not_found")
        except ClientGone:
            h.close_connection = True
        except HTTPError as e:
            h.close_connection = e.status == 413 or h.close_connection
            try:
                h.send_json(e.status, {"error": {"message": e.message, "code": e.code}}, e.headers)
            except ClientGone:
                h.close_connection = True


def serve_store(store: Path, socket_path: Path | None = None, tcp: str | None = None,
                token_file: Path | None = None, serial: str | None = None, baud: int = 921600,
                memory_total: int | None = None, activate: Activate | None = None,
                stop: threading.Event | None = None, ready: Callable[[], None] | None = None,
                limits: StoreLimits | None = None, http_chunk: int = HTTP_CHUNK) -> int:
    """Run a store-only daemon until `stop` (or SIGTERM/SIGINT when run as a program)."""
    from device.httpd import TCPServer, UnixServer, parse_tcp, read_tokens
    from device.serial_link import serve as serve_serial
    from device.store import smoke_test

    st = Store.open(store, limits)
    service = DeployService(st, activate or smoke_test, memory_total=memory_total, http_chunk=http_chunk)
    app = DeployApp(service)
    stop = stop or threading.Event()
    servers: list[Any] = []
    ports: list[Any] = []
    threads: list[threading.Thread] = []
    try:
        if socket_path:
            servers.append(UnixServer(socket_path, app))
        if tcp:
            host, port = parse_tcp(tcp)
            tokens = read_tokens(token_file) if token_file else []
            servers.append(TCPServer(host, port, app, tokens))
        for s in servers:
            threads.append(threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1},
                                            daemon=True))
        if serial:
            ports.append(open_port(serial, baud))
            threads.append(threading.Thread(target=serve_serial, daemon=True,
                                            args=(ports[0], service.handle_message, stop)))
        for t in threads:
            t.start()
        if ready:
            ready()
        stop.wait()
    finally:
        stop.set()
        for s in servers:
            s.shutdown()
            s.server_close()
            if hasattr(s, "remove"):
                s.remove()
        for t in threads:
            t.join(timeout=5.0)
        for port in ports:
            port.close()
        st.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m device.transfer --store DIR [--socket P] [--tcp H:P --token-file F] [--serial PORT]"""
    import argparse
    import signal

    ap = argparse.ArgumentParser(prog="python -m device.transfer", description=main.__doc__)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--socket", type=Path)
    ap.add_argument("--tcp")
    ap.add_argument("--token-file", type=Path)
    ap.add_argument("--serial")
    ap.add_argument("--baud", type=int, default=921600)
    ap.add_argument("--memory-bytes", type=int, help="pretend the device has this much memory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        return serve_store(args.store, args.socket, args.tcp, args.token_file, args.serial, args.baud,
                           args.memory_bytes, stop=stop, ready=lambda: print("ready", flush=True))
    except ToolkitError as e:
        print(f"error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
