"""Host side of deploy: ping, deploy (verify, check, upload, resume,
commit) and rollback. The CLI (toolkit devices / deploy / rollback) is a thin layer over this.

    result = deploy(Path("bundles/smollm2-cpu"), "jetson", progress=print_progress)

The devices registry (`add_device`, `get_device`, ...) is host/devices.py; its names are
importable from here too.

Deploy order: every file of the bundle is hashed against its manifest first (a damaged bundle
never leaves the host); `hello` tells what the device is, and a bundle it cannot run (TensorRT on
a CPU device, a plan that does not fit its memory) is refused before any bundle byte is sent;
`begin` reports what the device already holds (a re-run, or a retry after a dropped connection,
sends only the rest); chunks go out in order with their CRC32; `commit` is accepted at once and
the host follows the install through status (verify, build, smoke, switch: `on_phase`) until it
reports. A device whose disk is full (507) is one clear error with both figures and what to do,
never retried: `uploads` lists and clears what abandoned uploads hold there. A dropped
connection is retried `retries` times in a row (the counter resets whenever bytes got through),
each time resuming from the device's offsets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, Manifest, check_intact, read_manifest
from device.serve.deploy import compatibility_problems
from device.serve.serial_link import DEFAULT_BAUD, LinkDown
from device.store.checksum import crc32
from device.store.store import InstallResult, UploadInfo, UploadState

# the registry lives in host/devices.py; these names stay importable from here
from host.devices import (  # noqa: E402,F401 - re-exported
    DEVICE_NAME_RE,
    Device,
    add_device,
    config_dir,
    get_device,
    load_devices,
    registry_path,
    remove_device,
    save_devices,
    token_of,
)
from host.transfer import (
    Chunk,
    DeployClient,
    Hello,
    HttpDeployClient,
    OnPhase,
    RemoteError,
    SerialDeployClient,
    read_range,
)

RETRY_CODES = ("gap", "unknown_upload", "bad_crc")  # answered by beginning again
# ... and, for a chunk only, "busy": the device still holds the file open for a connection that
# just dropped (its handler has not yet read the EOF; seen under load in CI), so the resumed
# upload is refused for a moment. A commit's "busy" (another install running) is not retried.
CHUNK_RETRY_CODES = (*RETRY_CODES, "busy")

Progress = Callable[[int, int], None]  # (bytes the device holds, bundle bytes)


def open_client(device: Device) -> DeployClient:
    parts = urlsplit(device.uri)
    if parts.scheme == "serial":
        baud_text = parse_qs(parts.query).get("baud", [str(DEFAULT_BAUD)])[0]
        if not baud_text.isdigit() or int(baud_text) <= 0:  # `devices add` checks it; a hand edit did not
            raise ToolkitError(f"device {device.name!r}: baud {baud_text!r} in {registry_path()} is not "
                               "a positive number",
                               hint=f"re-add it: toolkit devices add {device.name} "
                                    f"serial://{parts.path}?baud=921600&token-file=F --replace")
        baud = int(baud_text)
        token = token_of(device)
        if not token:
            raise ToolkitError(f"device {device.name!r} has no token for its serial link",
                               hint="re-add it with the daemon's token file: toolkit devices add "
                                    f"{device.name} serial://{parts.path}?token-file=F --replace (or set "
                                    "$TOOLKIT_TOKEN)")
        return SerialDeployClient(parts.path, baud, token)
    return HttpDeployClient(device.endpoint())


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
           on_retry: Callable[[str], None] | None = None, on_phase: OnPhase | None = None) -> DeployResult:
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
                       retries, on_retry, on_phase)
    finally:
        client.close()


ChunkCrcs = dict[str, list[int]]  # file -> CRC32 of each chunk-sized block from offset 0


def _upload(client: DeployClient, device: Device, bundle: Path, manifest: Manifest,
            manifest_bytes: bytes, chunk: int, crcs: ChunkCrcs, progress: Progress | None, retries: int,
            on_retry: Callable[[str], None] | None, on_phase: OnPhase | None = None) -> DeployResult:
    failures, attempts = 0, 1
    held_at_start: int | None = None
    held: list[int] = []
    counter = _Sent()
    t0 = time.perf_counter()
    while True:
        before = counter.bytes
        retry_codes: tuple[str, ...] = CHUNK_RETRY_CODES
        try:
            state = client.begin(manifest_bytes)
            held.append(state.held_bytes)
            if held_at_start is None:
                held_at_start = state.held_bytes
            _send_missing(client, bundle, state, chunk, crcs, counter, progress)
            retry_codes = RETRY_CODES
            upload_s = time.perf_counter() - t0
            install = client.commit(state.upload_id, on_phase)
            return DeployResult(device, bundle, state.upload_id, state.total_bytes, held_at_start,
                                counter.bytes, upload_s, attempts, install, tuple(held))
        except (LinkDown, RemoteError) as e:
            if isinstance(e, RemoteError) and e.code == "no_space":
                raise no_space_error(device, e) from e
            if isinstance(e, RemoteError) and e.code not in retry_codes:
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


def no_space_error(device: Device, e: RemoteError) -> ToolkitError:
    """A 507 as one line: what the device needs, what it has, and what to do (not a retry:
    the disk does not empty itself)."""
    needed, free = e.extra.get("needed_bytes"), e.extra.get("free_bytes")
    if isinstance(needed, int) and isinstance(free, int):
        mib = 1 << 20
        figures = (f"it needs {needed / mib:.1f} MiB ({needed} bytes) and has {free / mib:.1f} MiB "
                   f"({free} bytes) free")
    else:  # a transport that carries only the message: the device's sentence has both figures
        figures = e.message.splitlines()[0]
    return ToolkitError(f"device {device.name!r} is out of disk space: {figures}; what it received "
                        "is kept",
                        hint=f"`toolkit devices uploads {device.name}` lists abandoned uploads and "
                             f"`--remove ID` / `--remove-all` clears them; or free space on the "
                             "device; then run the same deploy again (it resumes)")


def rollback(name: str, on_phase: OnPhase | None = None) -> InstallResult:
    device = get_device(name)
    client = open_client(device)
    try:
        try:
            return client.rollback(on_phase)
        except RemoteError as e:
            raise ToolkitError(f"device {name!r} refused the rollback: {e.message}", hint=e.hint) from e
    finally:
        client.close()


# --- uploads in progress on a device ------------------------------------------------------------------

DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '12h', '7d' -> seconds; ToolkitError otherwise."""
    m = DURATION_RE.fullmatch(text.strip())
    if not m:
        raise ToolkitError(f"{text!r} is not a duration", hint="e.g. 90s, 30m, 12h or 7d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def uploads(name: str, remove: list[str] | None = None, remove_all: bool = False,
            older_than_s: float | None = None) -> tuple[list[UploadInfo], list[UploadInfo]]:
    """(uploads in progress on the device, the ones removed). `remove` takes ids or unique
    prefixes of them (the listing shows 12 characters); with `older_than_s` alone, or with
    remove_all, the idle ones (or all) are removed."""
    device = get_device(name)
    client = open_client(device)
    try:
        try:
            found = client.uploads()
            removed: list[UploadInfo] = []
            if remove:
                removed = client.remove_uploads([_resolve(p, found, name) for p in remove])
            elif remove_all or older_than_s is not None:
                removed = client.remove_uploads(None, every=True, older_than_s=older_than_s)
        except RemoteError as e:
            raise ToolkitError(f"device {name!r} refused: {e.message}") from e
        gone = {u.upload_id for u in removed}
        return [u for u in found if u.upload_id not in gone], removed
    finally:
        client.close()


def _resolve(prefix: str, found: list[UploadInfo], device: str) -> str:
    matches = [u.upload_id for u in found if u.upload_id.startswith(prefix.lower())]
    if len(matches) != 1:
        what = "no upload" if not matches else f"{len(matches)} uploads"
        raise ToolkitError(f"{what} on {device!r} match {prefix!r}",
                           hint=f"`toolkit devices uploads {device}` lists them")
    return matches[0]
