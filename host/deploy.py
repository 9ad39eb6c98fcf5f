"""Host side of deploy: the devices registry, ping, deploy (verify, check, upload, resume,
commit) and rollback. The CLI (toolkit devices / deploy / rollback) is a thin layer over this.

    add_device("jetson", "tcp://192.168.1.20:8080?token-file=~/.config/toolkit/jetson.token")
    result = deploy(Path("bundles/smollm2-cpu"), "jetson", progress=print_progress)

The registry is ~/.config/toolkit/devices.json ($TOOLKIT_CONFIG_DIR, else $XDG_CONFIG_HOME/toolkit,
overrides the folder), the format host/client.py reads for `--device NAME`:

    {"jetson": {"uri": "tcp://192.168.1.20:8080", "token_file": "/home/me/.config/toolkit/jetson.token"},
     "local":  {"uri": "unix:///run/user/1000/toolkit.sock"},
     "board":  {"uri": "serial:///dev/ttyUSB0?baud=921600", "token_file": "/home/me/.config/toolkit/b.token"}}

(a bare string value is read as {"uri": value}). The file is written 0600 by rename.

Deploy order: every file of the bundle is hashed against its manifest first (a damaged bundle
never leaves the host); `hello` tells what the device is, and a bundle it cannot run (TensorRT on
a CPU device, a plan that does not fit its memory) is refused before any bundle byte is sent;
`begin` reports what the device already holds (a re-run, or a retry after a dropped connection,
sends only the rest); chunks go out in order with their CRC32; `commit` verifies, installs,
smoke-tests and reports. A dropped connection is retried `retries` times in a row (the counter
resets whenever bytes got through), each time resuming from the device's offsets.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bundle.atomic import write_atomic
from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, Manifest, check_intact, read_manifest
from device.serve.deploy import compatibility_problems
from device.serve.serial_link import DEFAULT_BAUD, LinkDown
from device.store.checksum import crc32
from device.store.store import InstallResult, UploadState
from host.transfer import (
    Chunk,
    DeployClient,
    Hello,
    HttpDeployClient,
    RemoteError,
    SerialDeployClient,
    read_range,
)

DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RETRY_CODES = ("gap", "unknown_upload", "bad_crc")  # answered by beginning again

Progress = Callable[[int, int], None]  # (bytes the device holds, bundle bytes)


# --- the registry ----------------------------------------------------------------------------------

def config_dir() -> Path:
    if os.environ.get("TOOLKIT_CONFIG_DIR"):
        return Path(os.environ["TOOLKIT_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "toolkit"


def registry_path() -> Path:
    return config_dir() / "devices.json"


@dataclass(frozen=True)
class Device:
    name: str
    uri: str  # unix:///path | tcp://host:port | serial:///dev/ttyX?baud=N
    token_file: str | None = None

    @property
    def transport(self) -> str:
        return urlsplit(self.uri).scheme

    def to_json(self) -> dict[str, str]:
        return {"uri": self.uri, **({"token_file": self.token_file} if self.token_file else {})}


def parse_uri(uri: str) -> tuple[str, str | None]:
    """A device URI -> (the URI to store, token file); ToolkitError with the accepted forms."""
    parts = urlsplit(uri)
    forms = ("unix:///path/to.sock, tcp://HOST:PORT[?token-file=FILE] or "
             "serial:///dev/ttyUSB0[?baud=921600&token-file=FILE]")
    query = parse_qs(parts.query)
    if parts.scheme == "unix" and parts.path.startswith("/") and not parts.netloc:
        return f"unix://{parts.path}", None
    if parts.scheme == "tcp" and parts.hostname:
        try:
            port = parts.port
        except ValueError:
            port = None
        if not port:
            raise ToolkitError(f"{uri!r} has no valid port", hint=f"use one of: {forms}")
        token = query.get("token-file", [None])[0]
        if token:
            token = str(Path(token).expanduser().absolute())
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        return f"tcp://{host}:{port}", token
    if parts.scheme == "serial" and parts.path.startswith("/") and not parts.netloc:
        baud = query.get("baud", [str(DEFAULT_BAUD)])[0]
        if not baud.isdigit() or int(baud) <= 0:
            raise ToolkitError(f"{uri!r}: baud {baud!r} is not a number", hint="e.g. ?baud=921600")
        token = query.get("token-file", [None])[0]  # the serial link is authenticated like TCP
        if token:
            token = str(Path(token).expanduser().absolute())
        return f"serial://{parts.path}?baud={int(baud)}", token
    raise ToolkitError(f"{uri!r} is not a device address", hint=f"use one of: {forms}")


def load_devices() -> dict[str, Device]:
    path = registry_path()
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"cannot read the devices registry {path}: {e}",
                           hint="fix or remove the file") from e
    if not isinstance(data, dict):
        raise ToolkitError(f"the devices registry {path} is not a JSON object", hint="fix or remove the file")
    devices = {}
    for name, entry in data.items():
        if isinstance(entry, str):
            devices[name] = Device(name, entry)
        elif isinstance(entry, dict) and isinstance(entry.get("uri"), str):
            devices[name] = Device(name, entry["uri"], entry.get("token_file"))
        else:
            raise ToolkitError(f"device {name!r} in {path} is neither a URI nor an object with 'uri'",
                               hint="fix the entry, or `toolkit devices remove` and add it again")
    return devices


def save_devices(devices: dict[str, Device]) -> Path:
    """Write the registry by rename (readers never see half a file), mode 0600."""
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {}
    if path.is_file():  # keep entries other tools wrote in forms we do not model
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
    data = {k: v for k, v in data.items() if k in devices}
    data.update({name: d.to_json() for name, d in devices.items()})
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), mode=0o600)
    return path


def add_device(name: str, uri: str, replace: bool = False) -> Device:
    if not DEVICE_NAME_RE.fullmatch(name):
        raise ToolkitError(f"device name {name!r} is not allowed",
                           hint="use letters, digits, '.', '_' and '-' (64 at most)")
    stored, token = parse_uri(uri)
    if token and not Path(token).is_file():
        raise ToolkitError(f"the token file {token} does not exist",
                           hint="write the daemon's token there (chmod 600) first")
    devices = load_devices()
    if name in devices and not replace:
        raise ToolkitError(f"device {name!r} already exists ({devices[name].uri})",
                           hint="pass --replace to change it, or remove it first")
    devices[name] = Device(name, stored, token)
    save_devices(devices)
    return devices[name]


def remove_device(name: str) -> Device:
    devices = load_devices()
    if name not in devices:
        raise _unknown(name, devices)
    gone = devices.pop(name)
    save_devices(devices)
    return gone


def get_device(name: str) -> Device:
    devices = load_devices()
    if name not in devices:
        raise _unknown(name, devices)
    return devices[name]


def _unknown(name: str, devices: dict[str, Device]) -> ToolkitError:
    known = ", ".join(sorted(devices)) or "none"
    return ToolkitError(f"device {name!r} is unknown (registered: {known})",
                        hint=f"add it: toolkit devices add {name} tcp://HOST:PORT (or unix:// or serial://)")


def _token(device: Device) -> str | None:
    if device.token_file:
        path = Path(device.token_file).expanduser()
        try:
            return path.read_text(encoding="utf-8").split()[0]
        except (OSError, IndexError) as e:
            raise ToolkitError(f"device {device.name!r}: cannot read its token file {path}",
                               hint="check the path and permissions, or re-add the device") from e
    return os.environ.get("TOOLKIT_TOKEN")


def open_client(device: Device) -> DeployClient:
    parts = urlsplit(device.uri)
    if parts.scheme == "serial":
        baud = int(parse_qs(parts.query).get("baud", [str(DEFAULT_BAUD)])[0])
        token = _token(device)
        if not token:
            raise ToolkitError(f"device {device.name!r} has no token for its serial link",
                               hint=f"re-add it with the daemon's token file: toolkit devices add "
                                    f"{device.name} serial://{parts.path}?token-file=F --replace (or set "
                                    "$TOOLKIT_TOKEN)")
        return SerialDeployClient(parts.path, baud, token)
    return HttpDeployClient(device.uri, _token(device) if parts.scheme == "tcp" else None)


# --- ping ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PingResult:
    device: Device
    hello: Hello


def ping(name: str) -> PingResult:
    device = get_device(name)
    client = open_client(device)
    try:
        client.hello()  # the first call opens the connection (a serial SYNC handshake)
        return PingResult(device, client.hello())
    finally:
        client.close()


# --- deploy ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployResult:
    device: Device
    bundle: Path
    upload_id: str
    total_bytes: int
    held_at_start: int  # what the device already had (a resumed upload)
    sent_bytes: int  # chunk bytes sent by this run (retransmitted ones included)
    upload_s: float
    attempts: int  # connections used (1 when nothing dropped)
    install: InstallResult
    held_per_attempt: tuple[int, ...] = ()  # what the device held at each begin (resume points)

    @property
    def mb_per_s(self) -> float:
        return self.sent_bytes / self.upload_s / 1e6 if self.upload_s > 0 else 0.0


def check_against_device(manifest: Manifest, hello: Hello, bundle: Path, device: Device) -> None:
    problems = compatibility_problems(manifest, hello.facts)
    if problems:
        listed = "\n  - ".join(problems)
        raise ToolkitError(f"{bundle} cannot run on device {device.name!r}; nothing was sent:\n  - {listed}",
                           hint="convert the model for this device's target (`toolkit targets` lists them)")


def deploy(bundle: Path, name: str, progress: Progress | None = None, retries: int = 3,
           on_retry: Callable[[str], None] | None = None) -> DeployResult:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    manifest_bytes = (bundle / MANIFEST).read_bytes()
    device = get_device(name)
    client = open_client(device)
    try:
        hello = client.hello()
        check_against_device(manifest, hello, bundle, device)  # refused before any hashing
        # every hash, before anything is sent; the same pass computes each chunk's CRC32 (the
        # upload then only reads each piece to send it, with no second pass for its CRC)
        crcs: ChunkCrcs = {}
        check_intact(bundle, manifest, hello.chunk,
                     lambda rel, block: crcs.setdefault(rel, []).append(crc32(block)))
        return _upload(client, device, bundle, manifest, manifest_bytes, hello.chunk, crcs, progress,
                       retries, on_retry)
    finally:
        client.close()


ChunkCrcs = dict[str, list[int]]  # file -> CRC32 of each chunk-sized block from offset 0


def _upload(client: DeployClient, device: Device, bundle: Path, manifest: Manifest,
            manifest_bytes: bytes, chunk: int, crcs: ChunkCrcs, progress: Progress | None, retries: int,
            on_retry: Callable[[str], None] | None) -> DeployResult:
    failures, attempts = 0, 1
    held_at_start: int | None = None
    held: list[int] = []
    counter = _Sent()
    t0 = time.perf_counter()
    while True:
        before = counter.bytes
        try:
            state = client.begin(manifest_bytes)
            held.append(state.held_bytes)
            if held_at_start is None:
                held_at_start = state.held_bytes
            _send_missing(client, bundle, state, chunk, crcs, counter, progress)
            upload_s = time.perf_counter() - t0
            install = client.commit(state.upload_id)
            return DeployResult(device, bundle, state.upload_id, state.total_bytes, held_at_start,
                                counter.bytes, upload_s, attempts, install, tuple(held))
        except (LinkDown, RemoteError) as e:
            if isinstance(e, RemoteError) and e.code not in RETRY_CODES:
                raise ToolkitError(f"device {device.name!r} refused the bundle: {e.message}",
                                   hint=e.hint) from e
            failures = 1 if counter.bytes > before else failures + 1  # progress resets the count
            if failures > retries:
                raise ToolkitError(
                    f"the upload to {device.name!r} failed {failures} times in a row without "
                    f"progress ({e.message}); the device keeps what it received",
                    hint="re-run the same `toolkit deploy` command: it resumes where it stopped") from e
            attempts += 1
            if on_retry:
                on_retry(f"{e.message}; resuming (retry {failures}/{retries})")
            client.reconnect()
            time.sleep(min(0.25 * 2 ** (failures - 1), 4.0))


class _Sent:
    bytes = 0


def _send_missing(client: DeployClient, bundle: Path, state: UploadState, chunk: int, crcs: ChunkCrcs,
                  counter: _Sent, progress: Progress | None) -> None:
    """Send every file from the offset the device holds, in chunks on the `chunk` grid (a resume
    point off that grid first sends the piece up to the next grid line). A chunk names its bytes
    (file, offset, length) rather than carrying them: each client reads them from the file as it
    sends them (HTTP a 1 MiB piece at a time). The CRC32 comes from the verification pass,
    or is computed here for an off-grid piece."""
    total = state.total_bytes
    done = state.held_bytes
    if progress:
        progress(done, total)

    def chunks() -> Iterator[Chunk]:
        for rel, fp in state.files.items():
            offset = fp.held
            while offset < fp.size:
                n = min(chunk - offset % chunk, fp.size - offset)
                known = crcs.get(rel, [])
                i = offset // chunk
                crc = (known[i] if offset % chunk == 0 and i < len(known)
                       else crc32(read_range(bundle / rel, offset, n)))
                yield Chunk(rel, offset, n, crc, bundle / rel)
                offset += n

    for c, held in client.send_chunks(state.upload_id, chunks()):
        counter.bytes += c.length
        if held != c.offset + c.length:  # the device holds something else: begin again
            raise RemoteError(f"{c.path}: the device holds {held} bytes, expected "
                              f"{c.offset + c.length}", 409, "gap")
        done += c.length
        if progress:
            progress(done, total)


def rollback(name: str) -> InstallResult:
    device = get_device(name)
    client = open_client(device)
    try:
        try:
            return client.rollback()
        except RemoteError as e:
            raise ToolkitError(f"device {name!r} refused the rollback: {e.message}") from e
    finally:
        client.close()
