"""The host's end of the deploy protocol (device/serve/deploy.py describes the messages): one
client per transport, HTTP over a Unix socket or TCP, and the serial link.

    client = HttpDeployClient(Endpoint.parse("https://orin.local:8443?pin=sha256:...", token))
    hello = client.hello(); state = client.begin(manifest_bytes); ...
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from bundle.errors import ToolkitError
from device.serve.deploy import PREFIX, SERIAL_CHUNK, DeviceFacts, pack, unpack
from device.serve.serial_link import Link, LinkConfig, LinkDown, open_port
from device.store.store import (
    FileProgress,
    InstallResult,
    UploadInfo,
    UploadState,
    install_result_from_json,
)
from host.endpoint import Endpoint

PIPELINE = 2  # chunk requests in flight on HTTP


# --- one client per transport -------------------------------------------------------

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
    """The device refused a request; `code` says why (see the module docstring), `extra` holds
    the error's other fields (507 "no_space": needed_bytes, free_bytes)."""

    def __init__(self, message: str, status: int, code: str, extra: dict[str, Any] | None = None,
                 hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.status, self.code = status, code
        self.extra = extra or {}


@dataclass(frozen=True)
class InstallPhase:
    """Where the device's install is (device/store/jobs.py), as the host polls it."""

    op: str
    phase: str  # verify | build | smoke | switch
    state: str  # running | done | failed
    elapsed_s: float
    phase_s: float
    phases: tuple[tuple[str, float], ...] = field(default=())  # finished: (phase, seconds)

    @classmethod
    def from_json(cls, rec: dict[str, Any]) -> InstallPhase:
        done = tuple((str(p["phase"]), float(p["seconds"])) for p in rec.get("phases") or [])
        return cls(str(rec.get("op", "commit")), str(rec.get("phase")), str(rec.get("state")),
                   float(rec.get("elapsed_s", 0.0)), float(rec.get("phase_s", 0.0)), done)


OnPhase = Callable[[InstallPhase], None]
POLL_S = (0.05, 0.5)  # first and longest wait between status polls (the longest is the most a
# finished install waits to be noticed; a poll is one small message, cheap even over serial)
INSTALL_LIMIT_S = 3 * 3600.0  # an engine build on a slow board takes minutes, not hours


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

    def commit(self, upload_id: str, on_phase: OnPhase | None = None,
               limit_s: float = INSTALL_LIMIT_S) -> InstallResult:
        """Start the install (the device answers 202 at once) and follow it through status
        until it is done: the connection never sits idle through an engine build, and each
        poll reports the device's phase to `on_phase`."""
        return self._follow(self._call("commit", {"id": upload_id}), on_phase, limit_s)

    def rollback(self, on_phase: OnPhase | None = None, limit_s: float = INSTALL_LIMIT_S) -> InstallResult:
        return self._follow(self._call("rollback", {}), on_phase, limit_s)

    def _follow(self, accepted: Any, on_phase: OnPhase | None, limit_s: float) -> InstallResult:
        if isinstance(accepted, dict) and "job" not in accepted:  # a device that answers at the end
            return install_result_from_json(accepted)
        job, rec = accepted["job"], accepted
        deadline = time.monotonic() + limit_s
        wait = POLL_S[0]
        while True:
            phase = InstallPhase.from_json(rec)
            if on_phase:
                on_phase(phase)
            if phase.state == "done":
                return install_result_from_json(rec["result"])
            if phase.state == "failed":
                err = dict(rec.get("error") or {})
                message, status, code = (str(err.pop("message", "the install failed")),
                                         int(err.pop("status", 500)), str(err.pop("code", "internal_error")))
                # the device's hint says what to do ("deploy a bundle instead"): keep it
                hint = err.pop("hint", None)
                raise RemoteError(message, status, code, err, str(hint) if hint else None)
            if time.monotonic() > deadline:
                raise ToolkitError(f"the device is still installing ({phase.phase}, "
                                   f"{phase.elapsed_s:.0f} s) after {limit_s:.0f} s",
                                   hint="`toolkit devices uploads DEVICE` shows its state; the "
                                        "daemon log says what it is doing")
            time.sleep(wait)
            wait = min(wait * 2, POLL_S[1])
            rec = self._call("status", {}).get("install")
            if not isinstance(rec, dict) or rec.get("job") != job:
                raise LinkDown("the device no longer knows the install (did the daemon restart?)",
                               hint="deploy again: the device resumes from what it holds")

    def status(self) -> dict[str, Any]:
        return dict(self._call("status", {}))

    def uploads(self) -> list[UploadInfo]:
        return [_upload_info(u) for u in self._call("uploads", {})]

    def remove_uploads(self, ids: list[str] | None = None, every: bool = False,
                       older_than_s: float | None = None) -> list[UploadInfo]:
        fields: dict[str, Any] = {"ids": ids} if ids else ({"all": True} if every else {})
        if older_than_s is not None:
            fields["older_than_s"] = older_than_s
        return [_upload_info(u) for u in self._call("remove_uploads", fields)]

    def reconnect(self) -> None:
        """Drop the connection; the next call opens a new one."""

    def close(self) -> None:
        self.reconnect()


def _upload_info(u: dict[str, Any]) -> UploadInfo:
    return UploadInfo(str(u["upload_id"]), str(u["name"]), int(u["held_bytes"]), int(u["total_bytes"]),
                      float(u["age_s"]))


class HttpDeployClient(DeployClient):
    """One keep-alive HTTP/1.1 connection (Unix socket or TCP), reopened after a failure."""

    transport = "http"

    def __init__(self, endpoint: Endpoint | str, token: str | None = None) -> None:
        self.endpoint = endpoint if isinstance(endpoint, Endpoint) else Endpoint.parse(endpoint, token)
        self.uri, self.token = str(self.endpoint), self.endpoint.token
        self._conn: http.client.HTTPConnection | None = None
        self._timeout = 60.0

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = self.endpoint.connection(timeout)
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
            "uploads": ("GET", "/uploads"), "remove_uploads": ("POST", "/uploads/remove"),
        }[op]
        if op == "remove_uploads":  # the fields travel as a JSON body (serial: in the header)
            payload = json.dumps(fields).encode()
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
            raise LinkDown(f"the connection to {self.uri} failed: {e or type(e).__name__}",
                           hint=self.endpoint.failure_hint(e)) from e
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
            return self.endpoint.socket(60.0)
        except OSError as e:
            raise LinkDown(f"cannot connect to {self.uri}: {e}") from e

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
    extra: dict[str, Any] = {}
    hint = None
    if isinstance(err, dict):
        message, code = str(err.get("message") or err), str(err.get("code") or status)
        extra = {k: v for k, v in err.items() if k not in ("message", "code", "type", "param", "hint")}
        hint = str(err["hint"]) if err.get("hint") else None  # the device says what to do: keep it
    else:
        message, code = str(err or obj), str(status)
    if status == 401:
        message += " (check the device's token file: `toolkit devices add NAME tcp://...?token-file=F`)"
    elif status == 404 and code == "not_found":  # the daemon's own answer: it serves no store
        message = f"{where} has no deploy routes (is the daemon started with --store?)"
    elif status == 404 and not isinstance(err, dict):  # not our error shape: another server answers
        message = (f"{where} answered 404 without a daemon's error ({message[:80]!r}): is it a toolkit "
                   "daemon (`toolkit serve --store`), and the device's address right?")
    # (the store's own 404s, unknown_upload / unknown_file, keep their message and hint)
    return RemoteError(message, status, code, extra, hint)


class SerialDeployClient(DeployClient):
    """The messages over a serial link (device/serve/serial_link.py), authenticated with `token`
    (a line of the daemon's --token-file); the link is reconnected (a new session, a new
    handshake; the frame size it learned is kept) after it drops. A wrong token raises
    AuthRefused (a ToolkitError, never retried)."""

    transport = "serial"

    def __init__(self, port: str, baud: int, token: str, config: LinkConfig | None = None) -> None:
        if not token:
            raise ToolkitError(f"the serial device {port} needs its token (the daemon's --token-file)",
                               hint="add the device with serial://PORT?token-file=F, or set $TOOLKIT_TOKEN")
        self.port_path, self.baud, self.config = port, baud, config
        self._token = token.encode()
        self._port: Any = None
        self._link: Link | None = None
        self._rid = 0

    def _ensure(self) -> Link:
        if self._port is None:
            self._port = open_port(self.port_path, self.baud)
        if self._link is None:
            self._link = Link(self._port, "host", self.config, tokens=[self._token])
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
        if not header.get("ok"):  # the same error object as over HTTP (a 507's byte counts too)
            raise _remote_error(header, int(header.get("status", 400)), self.port_path)
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
