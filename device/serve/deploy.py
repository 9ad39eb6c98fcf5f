"""The deploy protocol: the same messages over HTTP (Unix socket or TCP) and over a serial link.

    hello                       -> device facts: target family, TensorRT, backend, active bundle,
                                   free memory and disk, limits, chunk sizes (the host measures RTT)
    begin(manifest.json bytes)  -> upload id (SHA-256 of those bytes) + bytes held per file (resume)
    chunk(id, path, offset, crc32, data) -> bytes now held of that file
    commit(id)                  -> accepted (202): the install's job record; it runs in the
                                   background (verify, build, smoke, switch) and the host polls
                                   status until its `install` record is done (result:
                                   InstallResult) or failed (error: status, code, message)
    rollback                    -> accepted (202), the same way, going back to the previous bundle
    status                      -> the store: active, previous, bundles, uploads in progress and
                                   the running (or last) install with its phase and timings
    uploads                     -> uploads in progress: id, name, bytes held / total, age
    remove_uploads(ids | all | older_than_s) -> the uploads removed

An install holds no lock while the bundle loads (a TensorRT engine build takes minutes), so
status and chunks keep answering; a second commit or rollback meanwhile gets 409 "busy".

Over HTTP (routes the daemon mounts beside its own; over TCP they need its bearer token):

    GET  /v1/deploy/hello                                     hello
    GET  /v1/deploy/status                                    status
    POST /v1/deploy/uploads              body: manifest.json  begin
    PUT  /v1/deploy/uploads/{id}?path=P&offset=N&crc32=C      body: the chunk's bytes
    POST /v1/deploy/uploads/{id}/commit                       commit (202)
    POST /v1/deploy/rollback                                  rollback (202)
    GET  /v1/deploy/uploads                                   uploads
    POST /v1/deploy/uploads/remove  body: {"ids": [...] | "all": true | "older_than_s": N}

Errors are JSON {"error": {"message", "code", ...}} with the HTTP status (409 "gap": ask begin for
the offsets again; 422 "bad_crc": send the chunk again; 422 "verify_failed"; 413 "too_large";
404 "unknown_upload"; 409 "busy"; 507 "no_space" with needed_bytes and free_bytes; 400
"incompatible"). Extra fields of a StoreError travel beside message and code.

Over the serial link (device/serve/serial_link.py) each message is one link message:

    u32 little-endian header length | header JSON {"op": ..., fields} | binary payload

and the reply is the same envelope with header {"ok": true, "result": {...}} or {"ok": false,
"status": N, "error": {"message", "code"}}. The link does its own framing, authentication (the
daemon's --token-file; a message reaches handle_message only from a session that proved it) and
retransmission; the chunk's own CRC32 is checked by the store either way, end to end.

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

import json
import logging
import math
import platform
import re
import shutil
import struct
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bundle.errors import ToolkitError
from bundle.manifest import Manifest, read_manifest
from bundle.records import encode
from device.serve.serial_link import DEFAULT_BAUD, open_port
from device.store.jobs import InstallJob
from device.store.store import (
    Activate,
    ChunkAck,
    InstallResult,
    Store,
    StoreError,
    StoreLimits,
    UploadInfo,
    UploadState,
    to_json,
)

log = logging.getLogger("toolkit.deploy")

PROTOCOL = 1
PREFIX = "/v1/deploy"
HTTP_CHUNK = 8 << 20
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

    from device.runtime.engine_identity import _tensorrt_version
    from device.runtime.runner import device_family

    vm = psutil.virtual_memory()
    disk = shutil.disk_usage(store_root).free if store_root else None
    return DeviceFacts(device_family(), platform.machine(), _tensorrt_version(),
                       int(memory_total or vm.total), int(vm.available), disk)


def compatibility_problems(manifest: Manifest, facts: DeviceFacts) -> list[str]:
    """Why this device cannot run the bundle, as sentences (empty: it can). Checked by the host
    before any byte is sent, and again by the device on begin."""
    from bundle.contract import DECODER_CONTRACT, ENCODER_CONTRACT

    problems = []
    name = manifest.target.name
    if manifest.target.runtime == "tensorrt" and not facts.tensorrt:
        problems.append(f"the bundle is for {name} (TensorRT) but the device is a {facts.family} "
                        f"({facts.arch}) without TensorRT; convert it with --target cpu for this "
                        "device, or deploy it to the Jetson it was made for")
    if manifest.contract.name not in (DECODER_CONTRACT, ENCODER_CONTRACT):
        problems.append(f"bundle contract {manifest.contract.name!r} cannot be served")
    fit = plan_problem(manifest, facts.memory_total)
    if fit:
        problems.append(fit)
    return problems


def plan_problem(manifest: Manifest, memory_total: int) -> str | None:
    """The bundle's fit plan checked against the device's real memory; None when it fits or
    the bundle carries no plan (encoders). The plan's row for the bundle's precision holds what
    the bundle needs by component (targets/plan.py computed it on the host at convert time; the
    components do not depend on the memory they are compared with)."""
    if manifest.kind != "decoder" or manifest.plan is None:
        return None
    row = manifest.plan.row(manifest.precision)
    if row is None:
        return None  # a plan made for other precisions: nothing recorded to check
    need, gib = row.components, 1 << 30
    if need.total <= memory_total:
        return None
    return (f"the bundle does not fit the device's {memory_total / gib:.2f} GiB of memory: "
            f"{manifest.precision} with max_seq {manifest.max_seq} x {manifest.batch} slot(s) "
            f"needs {need.total / gib:.2f} GiB (weights {need.weights / gib:.2f}, KV cache "
            f"{need.kv_cache / gib:.2f}, activations {need.activations / gib:.2f}, runtime "
            f"{need.runtime / gib:.2f}, OS reserve {need.os_reserve / gib:.2f}); convert it with "
            f"a smaller --max-seq or --batch, or a lower --precision (`toolkit plan` shows what fits)")


# --- the device side ---------------------------------------------------------------------------

@dataclass
class DeployService:
    """The operations over a Store; transports (HTTP routes, serial) call these.

    activate(path): load + smoke-test the bundle and start serving it (the daemon swaps its
    engine); info(): the daemon's own hello fields (backend, state)."""

    store: Store
    activate: Activate
    info: Callable[[], dict[str, Any]] = field(default=lambda: {})
    memory_total: int | None = None  # overrides MemTotal in hello and begin's fit check (tests)
    http_chunk: int = HTTP_CHUNK  # the chunk size hello asks HTTP clients to use
    _buffers: threading.local = field(default_factory=threading.local)  # one chunk buffer per thread

    def facts(self) -> DeviceFacts:
        return local_facts(self.store.root, self.memory_total)

    def hello(self) -> dict[str, Any]:
        active = self.store.active
        backend = None
        if active is not None:
            try:  # the active bundle's target record (a schema-1 manifest comes out migrated)
                backend = encode(read_manifest(self.store.path_of(active)).target)
            except ToolkitError:
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
        """Install and wait for the result (in-process callers); the wire uses start_commit."""
        return self.store.commit(upload_id, self.activate)

    def rollback(self) -> InstallResult:
        return self.store.rollback(self.activate)

    def start_commit(self, upload_id: str) -> dict[str, Any]:
        """Claim the install now (409 busy / 404 unknown answer at once) and run it in the
        background; returns the job record the host then follows through status."""
        job = self.store.claim("commit", upload_id)
        return self._start(job, lambda: self.store.commit(upload_id, self.activate, job))

    def start_rollback(self) -> dict[str, Any]:
        job = self.store.claim("rollback")
        return self._start(job, lambda: self.store.rollback(self.activate, job))

    def _start(self, job: InstallJob, run: Callable[[], InstallResult]) -> dict[str, Any]:
        def body() -> None:
            try:
                run()
            except StoreError as e:  # recorded in the job: the host reads it from status
                log.warning("%s %s failed: %s", job.op, job.job, e.message)
            except Exception:  # noqa: BLE001 - recorded in the job as internal_error; the daemon lives
                log.exception("%s %s failed", job.op, job.job)

        threading.Thread(target=body, name=f"install-{job.job}", daemon=True).start()
        return {"accepted": True, **job.to_json()}

    def uploads(self) -> list[UploadInfo]:
        return self.store.list_uploads()

    def remove_uploads(self, fields: dict[str, Any]) -> list[UploadInfo]:
        ids, every, older = fields.get("ids"), fields.get("all"), fields.get("older_than_s")
        if ids is not None and (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)):
            raise StoreError("'ids' must be a list of upload ids")
        if every is not None and not isinstance(every, bool):  # bool("no") would remove them all
            raise StoreError("'all' must be true or false")
        if older is not None and (isinstance(older, bool) or not isinstance(older, (int, float))
                                  or not 0 <= older < math.inf):  # NaN fails both; a 400-digit
            # int compares exactly (math.isfinite raised OverflowError converting it)
            raise StoreError("'older_than_s' must be a number of seconds >= 0")
        return self.store.remove_uploads(ids or None, bool(every), older)

    def status(self) -> dict[str, Any]:
        return to_json(self.store.status())

    # -- the serial transport --

    def handle_message(self, message: bytes) -> bytes:
        """One serial request -> its reply (never raises: errors are replies)."""
        try:
            header, payload = unpack(message)
        except ValueError as e:  # the sender's fault: not a message of this protocol
            return pack({"ok": False, "status": 400, "error": {"message": f"not a deploy message: {e}",
                                                               "code": "bad_message"}})
        try:
            result = self._dispatch(header, payload)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except StoreError as e:
            reply = {"ok": False, "status": e.status,
                     "error": {"message": str(e), "code": e.code, **e.extra}}
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
            return to_json(self.chunk(_field(h, "id", str), _field(h, "path", str), _field(h, "offset", int),
                                      _field(h, "crc32", int), payload))
        if op == "commit":
            return self.start_commit(_field(h, "id", str))
        if op == "rollback":
            return self.start_rollback()
        if op == "uploads":
            return [to_json(u) for u in self.uploads()]
        if op == "remove_uploads":
            return [to_json(u) for u in self.remove_uploads(h)]
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
            ("GET", re.compile(PREFIX + r"/uploads"), self._http_uploads),
            ("POST", re.compile(PREFIX + r"/uploads/remove"), self._http_remove_uploads),
        ]

    def _http_hello(self, h: Any) -> None:
        h.send_json(200, self.hello())

    def _http_status(self, h: Any) -> None:
        h.send_json(200, self.status())

    def _http_begin(self, h: Any) -> None:
        with _as_http_error():
            h.send_json(200, to_json(self.begin(h.read_body())))

    def _http_chunk(self, h: Any, upload_id: str) -> None:
        from device.serve.httpd import HTTPError

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
        from device.serve.httpd import HTTPError

        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            h.close_connection = True
            raise HTTPError(411, "send chunks with Content-Length, not chunked encoding")
        n = h.content_length()  # a 400 (and the connection closed) when not one number
        limit = self.store.limits.max_chunk_bytes
        if not 0 <= n <= limit:
            h.close_connection = True  # the unread body would be parsed as the next request
            raise HTTPError(413, f"chunk of {n} bytes exceeds the {limit}-byte limit", "too_large")
        return n

    def _read_chunk(self, h: Any, n: int) -> memoryview:
        """The request body, read into this connection thread's reusable buffer (a fresh 8 MiB
        bytes per chunk costs page faults and a copy)."""
        from device.serve.httpd import HTTPError

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
            h.send_json(202, self.start_commit(upload_id))

    def _http_rollback(self, h: Any) -> None:
        with _as_http_error():
            h.send_json(202, self.start_rollback())

    def _http_uploads(self, h: Any) -> None:
        h.send_json(200, [to_json(u) for u in self.uploads()])

    def _http_remove_uploads(self, h: Any) -> None:
        from device.serve.httpd import HTTPError
        from device.serve.validate import JSONRefused, loads_bounded

        body = h.read_body()
        try:  # the bounded parser every other JSON body goes through (depth, big ints, NaN, ...)
            fields = loads_bounded(body) if body.strip() else {}
        except JSONRefused as e:
            raise HTTPError(e.status, e.message, e.code) from e
        if not isinstance(fields, dict):
            raise HTTPError(400, "the body must be a JSON object")
        with _as_http_error():
            h.send_json(200, [to_json(u) for u in self.remove_uploads(fields)])


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
            from device.serve.httpd import HTTPError

            err = HTTPError(exc.status, str(exc), exc.code)
            err.extra = dict(exc.extra)  # type: ignore[attr-defined]  # e.g. 507's byte counts
            raise err from exc


def _field(h: dict[str, Any], name: str, kind: type) -> Any:
    """A header field an op needs, converted: a missing or malformed one is the peer's mistake,
    a 400 that names it (not a 500 with a KeyError traceback in the daemon's log)."""
    try:
        if h[name] is None:  # str(None) would be the id "None"
            raise ValueError(name)
        return kind(h[name])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"the {h.get('op')!r} message needs a valid {name!r} field",
                         code="invalid_request") from e


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
    from device.serve.validate import loads_bounded

    # bounded as every HTTP body is (depth, big ints, NaN; JSONRefused is a ValueError): a
    # header 5,000 arrays deep was a RecursionError, answered 500
    header = loads_bounded(message[ENVELOPE.size:ENVELOPE.size + n], max_bytes=MAX_HEADER)
    if not isinstance(header, dict):
        raise ValueError("message header is not an object")
    return header, message[ENVELOPE.size + n:]


# --- a store-only daemon (tests, bench, and boards that only receive bundles) --------------------

class DeployApp:
    """A device/httpd App serving only the deploy routes (the full daemon mounts the same
    routes beside its own)."""

    def __init__(self, service: DeployService) -> None:
        self.service = service
        self.routes = service.routes()

    def dispatch(self, h: Any) -> None:
        from device.serve.httpd import ClientGone, HTTPError

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
                h.send_json(e.status, {"error": {"message": e.message, "code": e.code,
                                                 **getattr(e, "extra", {})}}, e.headers)
            except ClientGone:
                h.close_connection = True


def serve_store(store: Path, socket_path: Path | None = None, tcp: str | None = None,
                token_file: Path | None = None, serial: str | None = None, baud: int = DEFAULT_BAUD,
                memory_total: int | None = None, activate: Activate | None = None,
                stop: threading.Event | None = None, ready: Callable[[], None] | None = None,
                limits: StoreLimits | None = None, http_chunk: int = HTTP_CHUNK,
                tls_cert: Path | None = None, tls_key: Path | None = None) -> int:
    """Run a store-only daemon until `stop` (or SIGTERM/SIGINT/SIGHUP when run as a program)."""
    from device.serve.httpd import TCPServer, UnixServer, parse_tcp, read_tokens, stop_listening, tls_context
    from device.serve.serial_link import serve as serve_serial
    from device.store.store import smoke_test

    if serial and not token_file:  # anyone with a cable could deploy: refuse, as TCP does
        raise ToolkitError("--serial needs --token-file: the serial link authenticates every session "
                           "with the token", hint="write a random token to a file (chmod 600) and pass it")
    if (tls_cert is None) != (tls_key is None) or (tls_cert and not tcp):
        raise ToolkitError("--tls-cert and --tls-key go together, with --tcp")
    tokens = read_tokens(token_file) if token_file and (tcp or serial) else []
    st = Store.open(store, limits)
    service = DeployService(st, activate or (lambda path: smoke_test(path, st.enter_phase)),
                            memory_total=memory_total, http_chunk=http_chunk)
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
            tls = tls_context(tls_cert, tls_key) if tls_cert and tls_key else None
            servers.append(TCPServer(host, port, app, tokens, tls))
        for s in servers:
            threads.append(threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1},
                                            daemon=True))
        if serial:
            ports.append(open_port(serial, baud))
            threads.append(threading.Thread(target=serve_serial, daemon=True,
                                            args=(ports[0], service.handle_message, stop,
                                                  [t.encode() for t in tokens])))
        for t in threads:
            t.start()
        if ready:
            ready()
        stop.wait()
    finally:
        stop.set()
        stop_listening(servers, threads)  # threads[i] serves servers[i], the serial one last
        for t in threads:
            t.join(timeout=5.0)
        for port in ports:
            port.close()
        st.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m device.serve.deploy --store DIR [--socket P] [--tcp H:P [--tls-cert C --tls-key K]]
    [--serial PORT] --token-file F"""
    import argparse

    from device.serve.stop_signal import StopOnSignal

    ap = argparse.ArgumentParser(prog="python -m device.serve.deploy", description=main.__doc__)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--socket", type=Path)
    ap.add_argument("--tcp")
    ap.add_argument("--token-file", type=Path)
    ap.add_argument("--tls-cert", type=Path)
    ap.add_argument("--tls-key", type=Path)
    ap.add_argument("--serial")
    ap.add_argument("--baud", type=int, default=DEFAULT_BAUD)
    ap.add_argument("--memory-bytes", type=int, help="pretend the device has this much memory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    try:
        with StopOnSignal(stop):
            return serve_store(args.store, args.socket, args.tcp, args.token_file, args.serial, args.baud,
                               args.memory_bytes, stop=stop, ready=lambda: print("ready", flush=True),
                               tls_cert=args.tls_cert, tls_key=args.tls_key)
    except ToolkitError as e:
        print(f"error: {e}", flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
