"""The daemon's bundle store: uploads land here, are verified, installed atomically and rolled back.

Layout (one folder the daemon owns; nothing outside it is ever written by an upload):

    <store>/lock                   flock held by the one process using the store
    <store>/active                 JSON BundleRef of the bundle being served (written by rename)
    <store>/previous               JSON BundleRef of the one before it (what rollback goes back to)
    <store>/switch.json            the install journal, present only while a switch is in flight
    <store>/last-install.json      the last InstallResult (answers a repeated commit)
    <store>/limits.json            optional: StoreLimits fields (sizes, file count, staging TTL)
    <store>/bundles/<name>-<sha12>/       installed bundles: complete and verified, never written
    <store>/staging/<upload-id>/          an upload in progress; upload-id = SHA-256 of manifest.json

An upload is identified by the SHA-256 of its manifest.json bytes (mcumgr's `sha`, protocols.md
§3.2): the manifest lists every file's SHA-256 and size, so that one hash names the whole bundle.
`begin` writes the manifest into the staging folder and reports, per file, how many bytes are
already there; the host resumes each file from that offset (ZMODEM's ZRPOS). The offset is the
file's length on disk: a chunk is CRC-checked before it is written, so every byte below the
length was accepted. A chunk that is written as it arrives (the HTTP path, checked afterwards)
is announced first in staging/.<upload-id>-<file>.inflight; if the daemon dies before the
check ends, recovery cuts the file back to where that chunk began. The SHA-256 check at commit
catches anything a power cut garbled (the damaged file is then truncated so that the next
deploy resends it).

Install (`commit`), each step durable before the next (protocols.md §3.2):
  1. verify every file against the manifest (size and SHA-256); fsync every file and folder
  2. rename staging/<id> -> bundles/<name>-<sha12> (atomic, same filesystem); fsync bundles/
  3. write switch.json {phase: switching, new, old active, old previous}
  4. previous := old active, active := new (each a temp file + fsync + rename + dir fsync)
  5. activate(new): the daemon loads it (a TensorRT engine build on a Jetson) and smoke-tests it
     (a few tokens / one embedding). Steps 1-4 and 6 hold the store lock; this one does not, so
     status, begin and chunks keep answering; the InstallJob (device/store/jobs.py) keeps a
     second commit or rollback out (409) and is what status reports (phase, timings, result)
  6. passed: switch.json removed (the records already name the new bundle); unreferenced
     bundles are deleted
     failed (anything activate raises counts): active/previous restored from the journal, the
     new bundle deleted, journal removed
A folder is deleted by renaming it to a dot-name first, so a kill mid-delete never leaves a
bundle folder that looks installed. Free space is checked at begin and a full disk anywhere is a
507 (device/store/space.py).

Crash recovery (`Store.open` runs it before anything else): a journal in phase `switching` means
the smoke test never passed, so the old records are restored (the previous bundle is what the
restarted daemon serves; the new one stays installed and verified, so deploying it again only
switches and smoke-tests); phase `committed` is completed. Staging folders that are not a valid
upload (no manifest, wrong name, stray temp files) are removed; valid ones are kept for resume
until `staging_ttl_s` old. A bundle folder only ever appears complete (rename), so none is
half-written.

Names (protocols.md §4): every manifest path is checked component by component against
^[A-Za-z0-9._-]{1,128}$ (never "." or ".."), relative, at most 8 deep, not manifest.json and not
under engines/. Files are opened beneath the staging folder one component at a time with
O_NOFOLLOW (dir_fd chains, no path string is ever resolved), so a symlink planted anywhere on the
way, a FIFO or a device node is refused rather than followed or written through.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundle.atomic import fsync_dir, fsync_tree, write_all, write_atomic
from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, UNHASHED_DIRS, Manifest, sha256_file, verify_files
from bundle.manifest import parse_manifest as parse_bundle_manifest
from device.store.checksum import crc32 as checksum_crc32
from device.store.errors import StoreError
from device.store.jobs import InstallJob, JobError
from device.store.space import DISK_MARGIN, engine_estimate, free_bytes, full_disk_as_507, is_full, no_space

log = logging.getLogger("toolkit.store")

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
SHA_RE = re.compile(r"[0-9a-f]{64}")
MAX_DEPTH = 8
MAX_PATH = 512


@dataclass(frozen=True)
class StoreLimits:
    """What one upload may be. Sizes are checked against the manifest's declared sizes at begin
    (before any byte is accepted) and again on every chunk."""

    max_file_bytes: int = 8 << 30
    max_bundle_bytes: int = 16 << 30
    max_files: int = 4096
    max_manifest_bytes: int = 1 << 20
    max_chunk_bytes: int = 8 << 20  # also what the HTTP layer allows a body to be
    staging_ttl_s: float = 7 * 24 * 3600.0  # a partial upload is kept this long for resume


def read_limits(path: Path) -> StoreLimits:
    """StoreLimits from a JSON file (absent: the defaults), e.g. {"max_bundle_bytes": 34359738368}."""
    if not path.is_file():
        return StoreLimits()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        limits = StoreLimits(**data)
    except (OSError, ValueError, TypeError) as e:
        fields = ", ".join(StoreLimits.__dataclass_fields__)
        raise ToolkitError(f"cannot use the store limits {path}: {e}",
                           hint=f"fix it (fields: {fields}) or remove it") from e
    if any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 for v in asdict(limits).values()):
        raise ToolkitError(f"the store limits in {path} must be positive numbers",
                           hint=f"set each to a number of bytes or files, e.g. {{\"max_bundle_bytes\": "
                                f"{StoreLimits().max_bundle_bytes}}}, or remove the file for the defaults")
    return limits


# --- records ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class BundleRef:
    """What `active` / `previous` point at."""

    dir: str  # folder name under bundles/
    name: str  # manifest.name
    manifest_sha256: str
    installed_at: str = ""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BundleRef:
        folder = str(data["dir"])
        # one folder name under bundles/: an absolute path or "../x" would make path_of (a join)
        # point outside the store
        if not folder or folder in (".", "..") or "/" in folder or "\\" in folder:
            raise ValueError(f"dir {folder!r} is not a folder name under bundles/")
        return cls(folder, str(data["name"]), str(data["manifest_sha256"]),
                   str(data.get("installed_at", "")))


@dataclass(frozen=True)
class FileProgress:
    """One file of an upload: its declared size and the bytes the device holds."""

    size: int  # declared in the manifest
    held: int  # bytes on disk; the host resumes here


@dataclass(frozen=True)
class UploadState:
    """An upload: its files' progress (begin's answer: the host resumes from it)."""

    upload_id: str
    name: str
    files: dict[str, FileProgress]
    installed: bool = False  # already in bundles/: nothing to send, commit just switches

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @property
    def held_bytes(self) -> int:
        return sum(f.held for f in self.files.values())


@dataclass(frozen=True)
class ChunkAck:
    """One chunk written: where its file now ends."""

    path: str
    held: int  # the file's length after this chunk: where the next chunk starts
    size: int

    @property
    def complete(self) -> bool:
        return self.held == self.size


@dataclass(frozen=True)
class SmokeResult:
    """The smoke test of a bundle being installed: it loads and generates."""

    ok: bool
    detail: str  # what ran ("generated 4 tokens: ..."), or why it failed
    seconds: float = 0.0


@dataclass(frozen=True)
class InstallResult:
    """What an install (commit or rollback) did."""

    ok: bool  # the new bundle is active and passed its smoke test
    bundle: BundleRef
    verify_s: float
    smoke: SmokeResult | None
    active: BundleRef | None
    previous: BundleRef | None
    rolled_back: bool  # the smoke test failed and the old bundle is active again
    changed: bool = True  # False: the bundle was already active
    message: str = ""


@dataclass(frozen=True)
class StoreStatus:
    """The store: what is active, what came before, uploads and the install."""

    root: str
    active: BundleRef | None
    previous: BundleRef | None
    bundles: list[str]
    uploads: list[UploadState] = field(default_factory=list)
    install: dict[str, Any] | None = None  # the running or last InstallJob (device/store/jobs.py)


@dataclass(frozen=True)
class UploadInfo:
    """An upload in progress, as `toolkit devices uploads` lists it."""

    upload_id: str
    name: str
    held_bytes: int
    total_bytes: int
    age_s: float  # since its last byte arrived (the newest file in its staging folder)


Activate = Callable[[Path], SmokeResult]  # load + smoke-test a bundle, serve it if it passes


def to_json(obj: Any) -> Any:
    """Records -> plain JSON values (dataclasses nest; properties worth sending are added)."""
    if isinstance(obj, UploadState):
        return {**asdict(obj), "total_bytes": obj.total_bytes, "held_bytes": obj.held_bytes}
    if isinstance(obj, ChunkAck):
        return {**asdict(obj), "complete": obj.complete}
    if isinstance(obj, StoreStatus):
        return {**asdict(obj), "uploads": [to_json(u) for u in obj.uploads]}
    return asdict(obj)


# --- names -----------------------------------------------------------------------------------

def check_relpath(rel: str) -> list[str]:
    """A manifest path -> its components, or StoreError. Checked component by component: no
    absolute path, no '..', nothing but [A-Za-z0-9._-] (no spaces, no backslashes, no NUL)."""
    if not isinstance(rel, str) or not rel or len(rel) > MAX_PATH:
        raise StoreError(f"file name {rel!r} is empty or longer than {MAX_PATH} characters",
                         code="bad_name")
    if rel.startswith("/"):
        raise StoreError(f"file name {rel!r} is absolute; bundle paths are relative", code="bad_name")
    parts = rel.split("/")
    if len(parts) > MAX_DEPTH:
        raise StoreError(f"file name {rel!r} is nested deeper than {MAX_DEPTH} folders", code="bad_name")
    for part in parts:
        if part in (".", "..") or not NAME_RE.fullmatch(part):
            raise StoreError(f"file name {rel!r} has the component {part!r}; only "
                             "[A-Za-z0-9._-] names (not '.' or '..') are accepted", code="bad_name")
    if rel == MANIFEST or parts[0] in UNHASHED_DIRS:
        raise StoreError(f"file name {rel!r} is reserved (the manifest, or device-local "
                         f"{'/'.join(UNHASHED_DIRS)}/)", code="bad_name")
    return parts


def bundle_dir_name(name: str, manifest_sha256: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64].strip(".") or "bundle"
    return f"{safe}-{manifest_sha256[:12]}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --- durable small files -----------------------------------------------------------------------

def _check_chunk_bounds(rel: str, offset: int, length: int, size: int) -> None:
    if offset < 0 or offset + length > size:
        raise StoreError(f"chunk {rel}@{offset}+{length} runs past the declared size of "
                         f"{size} bytes", status=413, code="too_large")


ReadInto = Callable[[memoryview], int]  # fill the view from the request body -> bytes read (0: ended)


PIECE = 1 << 20  # a chunk arrives in pieces this size: read, CRC'd while in cache, written
_piece_buffers = threading.local()


def _piece_buffer() -> memoryview:
    buf = getattr(_piece_buffers, "buf", None)
    if buf is None:
        buf = _piece_buffers.buf = memoryview(bytearray(PIECE))
    return buf


def open_beneath(root: Path, parts: list[str], create: bool) -> int:
    """Open root/parts[0]/.../parts[-1] for writing without following any symlink: each folder
    is opened relative to its parent's fd with O_NOFOLLOW|O_DIRECTORY (created when missing and
    `create`), the file with O_NOFOLLOW|O_NONBLOCK (a FIFO must not block us) and then must be a
    regular file. Returns the fd; StoreError when anything on the way is not what it claims."""
    rel = "/".join(parts)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=dfd)
                nfd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
            except OSError as e:  # ELOOP (a symlink) or ENOTDIR (a file where a folder should be)
                raise StoreError(f"refusing to write {rel!r}: {part!r} in the staging folder is a "
                                 "symlink or not a folder", code="unsafe_path") from e
            os.close(dfd)
            dfd = nfd
        flags = (os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                 | (os.O_CREAT if create else 0))
        try:
            fd = os.open(parts[-1], flags, 0o644, dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.ENOTDIR):
                raise StoreError(f"refusing to write {rel!r}: it is a symlink, a folder or a special "
                                 "file in the staging folder", code="unsafe_path") from e
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(f"refusing to write {rel!r}: it is not a regular file", code="unsafe_path")
        os.set_blocking(fd, True)
        return fd
    finally:
        os.close(dfd)


def _cut(root: Path, parts: list[str], size: int) -> None:
    """Truncate a staged file to `size` bytes (opened beneath root, no symlink followed)."""
    fd = open_beneath(root, parts, create=False)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _held(root: Path, parts: list[str]) -> int:
    """Bytes on disk for a staged file (0 when absent); lstat per component, no symlink followed."""
    path = root
    for part in parts:
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return 0
        if stat.S_ISLNK(st.st_mode):
            raise StoreError(f"refusing {'/'.join(parts)!r}: {path.name!r} in the staging folder "
                             "is a symlink", code="unsafe_path")
    return st.st_size if stat.S_ISREG(st.st_mode) else 0


# --- the store ---------------------------------------------------------------------------------

@dataclass
class _Upload:
    upload_id: str
    manifest: Manifest
    parts: dict[str, list[str]]  # rel path -> checked components


class Store:
    """One process owns a store (flock on <store>/lock); its methods are thread-safe."""

    def __init__(self, root: Path, limits: StoreLimits | None = None) -> None:
        self.root = Path(root).absolute()
        self.limits = limits or StoreLimits()
        self.bundles = self.root / "bundles"
        self.staging = self.root / "staging"
        self._lock = threading.RLock()
        self._uploads: dict[str, _Upload] = {}
        self._open: tuple[str, str, int] | None = None  # (upload id, rel, fd) of the file being written
        # (upload id, rel) -> where the chunk arriving now on some connection began
        self._streams: dict[tuple[str, str], int] = {}
        self._lock_fd: int | None = None
        self._job: InstallJob | None = None  # the running (or last) commit/rollback

    @classmethod
    def open(cls, root: Path, limits: StoreLimits | None = None) -> Store:
        """Create the layout if needed, take the store's lock and run crash recovery. Limits
        not given come from <store>/limits.json when it exists (any StoreLimits field). A folder
        that holds manifest.json but no bundles/ (every store has one) is a bundle: refused."""
        if (Path(root) / MANIFEST).is_file() and not (Path(root) / "bundles").is_dir():
            raise ToolkitError(f"{root} is a bundle (it holds {MANIFEST}), not a store",
                               hint=f"serve it as the positional argument (`toolkit serve {root}`), "
                                    "or give --store an empty or new folder")
        store = cls(root, limits or read_limits(Path(root) / "limits.json"))
        for d in (store.root, store.bundles, store.staging):
            d.mkdir(parents=True, exist_ok=True)
        store._take_lock()
        store.recover()
        return store

    def _take_lock(self) -> None:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise ToolkitError(f"the store {self.root} is in use by another process",
                               hint="stop the other daemon, or give this one another --store") from e
        self._lock_fd = fd

    def close(self) -> None:
        with self._lock:
            self._close_open_file()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # the kernel drops the flock (it also does on SIGKILL)
                self._lock_fd = None

    # -- records --

    def _read_ref(self, name: str) -> BundleRef | None:
        path = self.root / name
        try:
            return BundleRef.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.error("store record %s is unreadable (%s); treating it as absent", path, e)
            return None

    def _write_ref(self, name: str, ref: BundleRef | None) -> None:
        path = self.root / name
        if ref is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                fsync_dir(self.root)
            return
        write_atomic(path, (json.dumps(asdict(ref), indent=1) + "\n").encode())

    @property
    def active(self) -> BundleRef | None:
        return self._read_ref("active")

    @property
    def previous(self) -> BundleRef | None:
        return self._read_ref("previous")

    def path_of(self, ref: BundleRef) -> Path:
        return self.bundles / ref.dir

    def active_path(self) -> Path | None:
        ref = self.active
        return self.path_of(ref) if ref else None

    def status(self) -> StoreStatus:
        with self._lock:
            uploads = self._uploads_in_progress()
            bundles = sorted(p.name for p in self.bundles.iterdir() if p.is_dir())
            job = self._job
            return StoreStatus(str(self.root), self.active, self.previous, bundles, uploads,
                               job.to_json() if job else None)

    # -- recovery --

    def recover(self) -> list[str]:
        """Bring the store to a consistent state after a crash; returns what was done."""
        done: list[str] = []
        with self._lock:
            for tmp in self.root.glob(".*.tmp-*"):
                tmp.unlink()
                done.append(f"removed the temp file {tmp.name}")
            journal = self._read_journal()
            if journal is not None:
                done.append(self._finish_switch(journal))
            done += self._settle_inflight()
            for entry in self.staging.iterdir():
                if not self._valid_staging(entry):
                    _remove(entry)
                    done.append(f"discarded the unfinished staging entry {entry.name}")
            for entry in self.bundles.iterdir():
                if entry.name.startswith("."):  # a rename target never starts with a dot
                    _remove(entry)
                    done.append(f"removed the stray entry bundles/{entry.name}")
            broken = self._active_broken()
            if broken is not None:
                prev = self.previous
                self._write_ref("active", prev if prev and self.path_of(prev).is_dir() else None)
                self._write_ref("previous", None)
                done.append(f"active {broken}; fell back to {prev.dir if prev else 'none'}")
            elif self.previous is None and (self.root / "previous").exists():
                # read as absent, and logged as an error on every read until something replaced it
                self._write_ref("previous", None)
                done.append("removed the unreadable previous record")
        for line in done:
            log.warning("store recovery: %s", line)
        return done

    def _active_broken(self) -> str | None:
        """Why the `active` record names nothing servable, or None. A file that does not parse
        is read as absent: the daemon would serve nothing ("no bundle yet") while `previous`
        could, so it falls back as for a record naming a missing folder."""
        active = self.active
        if active is None:
            return "record is unreadable" if (self.root / "active").exists() else None
        return None if self.path_of(active).is_dir() else f"bundle {active.dir} is missing"

    def _valid_staging(self, entry: Path) -> bool:
        if not SHA_RE.fullmatch(entry.name) or entry.is_symlink() or not entry.is_dir():
            return False
        manifest = entry / MANIFEST
        try:
            if hashlib.sha256(manifest.read_bytes()).hexdigest() != entry.name:
                return False
        except OSError:
            return False
        return time.time() - manifest.stat().st_mtime < self.limits.staging_ttl_s

    def _read_journal(self) -> dict[str, Any] | None:
        try:
            data = json.loads((self.root / "switch.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            # written by rename, so a torn journal cannot happen; an unreadable one is a disk
            # problem: keep whatever the records say and drop it
            log.error("install journal unreadable (%s); keeping the current records", e)
            (self.root / "switch.json").unlink()
            return None
        return data if isinstance(data, dict) else None

    def _finish_switch(self, journal: dict[str, Any]) -> str:
        new = BundleRef.from_json(journal["new"])
        old_active = BundleRef.from_json(journal["old_active"]) if journal.get("old_active") else None
        old_prev = BundleRef.from_json(journal["old_previous"]) if journal.get("old_previous") else None
        if journal.get("phase") == "committed":
            self._write_ref("previous", old_active if old_active != new else old_prev)
            self._write_ref("active", new)
            what = f"completed the switch to {new.dir}"
        else:  # the smoke test never passed: the old bundle is what must serve
            self._write_ref("active", old_active)
            self._write_ref("previous", old_prev)
            what = (f"undid the unfinished switch to {new.dir}; active is "
                    f"{old_active.dir if old_active else 'none'}")
        (self.root / "switch.json").unlink()
        fsync_dir(self.root)
        return what

    # -- upload --

    def begin(self, manifest_bytes: bytes, check: Callable[[Manifest], None] | None = None) -> UploadState:
        """Accept a manifest (every name and declared size checked before any file byte arrives)
        and report what the store already holds of it. `check` adds the device's own refusals
        (target, memory)."""
        limits = self.limits
        if len(manifest_bytes) > limits.max_manifest_bytes:
            raise StoreError(f"manifest of {len(manifest_bytes)} bytes exceeds the "
                             f"{limits.max_manifest_bytes}-byte limit", status=413, code="too_large")
        manifest = parse_manifest(manifest_bytes)
        upload_id = hashlib.sha256(manifest_bytes).hexdigest()
        parts = self._check_files(manifest)
        if check is not None:
            check(manifest)
        with self._lock:
            upload = _Upload(upload_id, manifest, parts)
            if self._installed_dir(upload).is_dir():
                self._uploads[upload_id] = upload
                files = {rel: FileProgress(e.bytes, e.bytes) for rel, e in manifest.files.items()}
                return UploadState(upload_id, manifest.name, files, installed=True)
            staging = self.staging / upload_id
            fresh = not (staging / MANIFEST).is_file()
            state = (UploadState(upload_id, manifest.name, {rel: FileProgress(e.bytes, 0) for rel, e
                                                            in manifest.files.items()})
                     if fresh else self._progress(upload))
            self._check_disk(upload, state)  # a resume too: the disk may have filled meanwhile
            if fresh:
                tmp = self.staging / f".{upload_id}.manifest.tmp"
                try:
                    with full_disk_as_507(self.root, state.total_bytes, "the manifest"):
                        staging.mkdir(exist_ok=True)
                        tmp.write_bytes(manifest_bytes)
                        os.replace(tmp, staging / MANIFEST)  # its presence marks a valid upload
                except BaseException:
                    tmp.unlink(missing_ok=True)  # nothing half-written: no folder without manifest
                    with contextlib.suppress(OSError):
                        staging.rmdir()
                    raise
            self._uploads[upload_id] = upload
            return state

    def _check_files(self, manifest: Manifest) -> dict[str, list[str]]:
        limits = self.limits
        if len(manifest.files) > limits.max_files:
            raise StoreError(f"the bundle lists {len(manifest.files)} files; the store accepts at "
                             f"most {limits.max_files}", status=413, code="too_large")
        parts: dict[str, list[str]] = {}
        total = 0
        for rel, entry in manifest.files.items():
            parts[rel] = check_relpath(rel)
            size = entry.bytes
            if size < 0:  # the manifest codec has made it an int already
                raise StoreError(f"{rel}: declared size {size!r} is not a byte count", code="bad_manifest")
            if size > limits.max_file_bytes:
                raise StoreError(f"{rel} declares {size} bytes; the store accepts files up to "
                                 f"{limits.max_file_bytes} bytes", status=413, code="too_large",
                                 hint="raise max_file_bytes in <store>/limits.json on the device if "
                                      "this is intended")
            if not isinstance(entry.sha256, str) or not SHA_RE.fullmatch(entry.sha256):
                raise StoreError(f"{rel}: {entry.sha256!r} is not a SHA-256", code="bad_manifest")
            total += size
        if total > limits.max_bundle_bytes:
            raise StoreError(f"the bundle declares {total} bytes; the store accepts bundles up to "
                             f"{limits.max_bundle_bytes} bytes", status=413, code="too_large",
                             hint="raise max_bundle_bytes in <store>/limits.json on the device if "
                                  "this is intended")
        dirs = {"/".join(p[:i]) for p in parts.values() for i in range(1, len(p))}
        if clash := sorted(dirs & set(parts)):
            raise StoreError(f"{clash[0]!r} is listed both as a file and as a folder", code="bad_manifest")
        return parts

    def _check_disk(self, upload: _Upload, state: UploadState) -> None:
        """Refuse (507) an upload the disk cannot finish: its own missing bytes, the bytes still
        owed to the other uploads in progress, the engine the board will build (device/store/
        space.py says how it is estimated) and a margin."""
        own = state.total_bytes - state.held_bytes
        others = [u for u in self._uploads_in_progress() if u.upload_id != upload.upload_id]
        owed = sum(u.total_bytes - u.held_bytes for u in others)
        engine = engine_estimate(upload.manifest)
        need = own + owed + engine + DISK_MARGIN
        free = free_bytes(self.root)
        if free < need:
            parts = [f"{own} bytes still to come"]
            if owed:
                parts.append(f"{owed} bytes owed to {len(others)} other upload(s) in progress")
            if engine:
                parts.append(f"a TensorRT engine estimated at {engine} bytes (the model files it is "
                             "built from)")
            parts.append(f"a {DISK_MARGIN >> 20} MiB margin")
            raise no_space(self.root, need, free, what="this upload (" + " + ".join(parts) + ")")

    def _uploads_in_progress(self) -> list[UploadState]:
        found = []
        for d in sorted(self.staging.iterdir()):
            if SHA_RE.fullmatch(d.name) and (d / MANIFEST).is_file():
                with contextlib.suppress(ToolkitError, OSError):
                    found.append(self._progress(self._load_upload(d.name)))
        return found

    def _installed_dir(self, upload: _Upload) -> Path:
        return self.bundles / bundle_dir_name(upload.manifest.name, upload.upload_id)

    def _load_upload(self, upload_id: str) -> _Upload:
        """An upload begun earlier (possibly by a daemon that has since restarted)."""
        if not isinstance(upload_id, str) or not SHA_RE.fullmatch(upload_id):
            raise StoreError(f"upload id {upload_id!r} is not a SHA-256", code="bad_upload_id")
        upload = self._uploads.get(upload_id)
        if upload is not None:
            return upload
        staging = self.staging / upload_id
        try:
            data = (staging / MANIFEST).read_bytes()
        except OSError as e:
            raise StoreError(f"no upload {upload_id[:12]}… in progress", status=404,
                             code="unknown_upload", hint="begin the upload again") from e
        manifest = parse_manifest(data)
        upload = _Upload(upload_id, manifest, self._check_files(manifest))
        self._uploads[upload_id] = upload
        return upload

    def _progress(self, upload: _Upload) -> UploadState:
        staging = self.staging / upload.upload_id
        files = {}
        for rel, entry in upload.manifest.files.items():
            held = _held(staging, upload.parts[rel])
            if held > entry.bytes:  # longer than declared: cannot be right, start it again
                _cut(staging, upload.parts[rel], 0)
                held = 0
            # a chunk still arriving on another connection (one the host gave up on, whose
            # handler has not seen the EOF yet) is cut back to where it began if it ends short:
            # report only what will stay, so a resume does not start past it into a gap
            held = min(held, self._streams.get((upload.upload_id, rel), held))
            files[rel] = FileProgress(entry.bytes, held)
        return UploadState(upload.upload_id, upload.manifest.name, files)

    def write_chunk(self, upload_id: str, rel: str, offset: int, data: bytes | memoryview,
                    crc32: int) -> ChunkAck:
        """Write one chunk at `offset` of file `rel`. Refused: a bad CRC (nothing written), a
        chunk past the declared size, or a gap (offset beyond what is held: code "gap", the host
        resumes from `held`). Rewriting bytes below `held` is allowed (a retransmission)."""
        self._check_chunk_size(len(data))
        if checksum_crc32(data) != crc32:
            raise StoreError(f"chunk {rel}@{offset} failed its CRC32 check; nothing was written",
                             status=422, code="bad_crc", hint="send the chunk again")
        with self._lock:
            upload = self._load_upload(upload_id)
            entry = upload.manifest.files.get(rel)
            if entry is None:
                raise StoreError(f"{rel!r} is not a file of upload {upload_id[:12]}…", status=404,
                                 code="unknown_file")
            if (upload_id, rel) in self._streams:
                raise StoreError(f"{rel} is being written by another connection", status=409,
                                 code="busy", hint="send one upload at a time")
            _check_chunk_bounds(rel, offset, len(data), entry.bytes)
            if self._installed_dir(upload).is_dir():
                return ChunkAck(rel, entry.bytes, entry.bytes)
            fd = self._file(upload, rel)
            held = os.fstat(fd).st_size
            if offset > held:
                raise StoreError(f"chunk {rel}@{offset} leaves a gap: the device holds {held} bytes",
                                 status=409, code="gap", held=held)
            try:
                write_all(fd, data, offset)
            except OSError as e:
                os.ftruncate(fd, held)  # nothing of a chunk that did not fit stays
                self._close_open_file()
                if is_full(e):
                    raise no_space(self.root, entry.bytes - held, what=f"the rest of {rel}") from e
                raise
            held = max(held, offset + len(data))
            if held == entry.bytes:
                self._close_open_file()
            return ChunkAck(rel, held, entry.bytes)

    def receive_chunk(self, upload_id: str, rel: str, offset: int, length: int, crc32: int,
                      read_into: ReadInto) -> ChunkAck | None:
        """write_chunk for a body still on the wire, written into the file as it arrives.

        For the common case, the next chunk of a file (offset == held): the body is read a
        piece at a time (`read_into`, PIECE bytes into one reused buffer), each piece's CRC32 is
        taken while it is in cache and the piece is written at its place; a chunk that fails
        the CRC, or ends early, is cut off again (ftruncate to `offset`): nothing of it is
        kept, as with write_chunk. The store lock is not held while bytes arrive; the file is
        claimed instead (a second writer, or a commit, gets 409). Returns None, having read
        nothing, in every other case (a retransmission below held, a gap, an installed upload,
        a claimed file): the caller reads the body and calls write_chunk. The chunk is announced
        in an in-flight marker first: if the daemon dies mid-chunk, recovery cuts the file back
        to `offset` and the next begin resumes there.

        (Measured on loopback, where the link is a memory copy and the device's thread is the
        bottleneck: this plain read/CRC/write loop with a copying sender uploads ~1.27x faster
        than splice(2) socket -> pipe -> file with a CRC read-back and a sendfile sender, since
        every byte it touches is still in cache; on a real link either keeps up.)"""
        self._check_chunk_size(length)
        key = (upload_id, rel)
        with self._lock:
            upload = self._load_upload(upload_id)
            entry = upload.manifest.files.get(rel)
            if entry is None or length == 0 or key in self._streams or self._installed_dir(upload).is_dir():
                return None
            _check_chunk_bounds(rel, offset, length, entry.bytes)
            if _held(self.staging / upload_id, upload.parts[rel]) != offset:
                return None
            if self._open and self._open[:2] == key:
                self._close_open_file()
            fd = open_beneath(self.staging / upload_id, upload.parts[rel], create=True)
            try:
                with full_disk_as_507(self.root, entry.bytes - offset, f"the rest of {rel}"):
                    marker = self._announce(upload_id, rel, offset)
            except BaseException:
                os.close(fd)
                raise
            self._streams[key] = offset
        kept = False
        try:
            pos, end, crc, buf = offset, offset + length, 0, _piece_buffer()
            while pos < end:
                k = read_into(buf[:min(end - pos, len(buf))])
                if k <= 0:
                    raise StoreError(f"the chunk ended after {pos - offset} of {length} bytes",
                                     code="short_body")
                crc = checksum_crc32(buf[:k], crc)
                with full_disk_as_507(self.root, entry.bytes - offset, f"the rest of {rel}"):
                    write_all(fd, buf[:k], pos)  # a full disk: cut back below, 507 to the host
                pos += k
            if crc != crc32:
                raise StoreError(f"chunk {rel}@{offset} failed its CRC32 check; nothing was written",
                                 status=422, code="bad_crc", hint="send the chunk again")
            kept = True
        finally:
            if not kept:
                os.ftruncate(fd, offset)
            os.close(fd)
            with self._lock:
                marker.unlink(missing_ok=True)
                self._streams.pop(key, None)
        return ChunkAck(rel, offset + length, entry.bytes)

    # -- chunks in flight --

    def _inflight_path(self, upload_id: str, rel: str) -> Path:
        return self.staging / f".{upload_id}-{hashlib.sha256(rel.encode()).hexdigest()[:16]}.inflight"

    def _announce(self, upload_id: str, rel: str, offset: int) -> Path:
        """Record, before any byte of it lands, that a chunk of `rel` starting at `offset` is
        being written unchecked. One small write: a SIGKILL cannot tear it; the marker is
        removed once the chunk is kept or cut off. (No fsync: after a power cut the commit's
        SHA-256 check is what catches a bad file, as for any unsynced bytes.)"""
        path = self._inflight_path(upload_id, rel)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps({"path": rel, "offset": offset}).encode())
        finally:
            os.close(fd)
        return path

    def _settle_inflight(self) -> list[str]:
        """After a crash: cut every file that had a chunk in flight back to where the chunk
        began (its bytes were never checked), so that the next begin resumes exactly there."""
        done = []
        for marker in self.staging.glob(".*.inflight"):
            upload_id = marker.name[1:].split("-", 1)[0]
            try:
                info = json.loads(marker.read_bytes())
                rel, offset = info["path"], info["offset"]
                upload = self._load_upload(upload_id)
                if not isinstance(offset, int) or offset < 0 or rel not in upload.parts:
                    raise ValueError(f"bad marker {info!r}")
                staging = self.staging / upload_id
                if _held(staging, upload.parts[rel]) > offset:
                    _cut(staging, upload.parts[rel], offset)
                    done.append(f"cut {upload_id[:12]}…/{rel} back to {offset} bytes: a chunk after "
                                "that was still being checked when the daemon stopped")
            except (OSError, ValueError, KeyError, TypeError, StoreError) as e:
                # the upload is gone or the marker unreadable: commit's SHA-256 check still holds
                done.append(f"ignored the in-flight marker {marker.name} ({e})")
            marker.unlink(missing_ok=True)
        return done

    def _check_chunk_size(self, length: int) -> None:
        if length > self.limits.max_chunk_bytes:
            raise StoreError(f"chunk of {length} bytes exceeds the {self.limits.max_chunk_bytes}-"
                             "byte limit", status=413, code="too_large")

    def _file(self, upload: _Upload, rel: str) -> int:
        """The fd of the file being written (kept open between chunks of the same file)."""
        if self._open and self._open[:2] == (upload.upload_id, rel):
            return self._open[2]
        self._close_open_file()
        staging = self.staging / upload.upload_id
        if not (staging / MANIFEST).is_file():
            raise StoreError(f"upload {upload.upload_id[:12]}… was discarded", status=404,
                             code="unknown_upload", hint="begin the upload again")
        fd = open_beneath(staging, upload.parts[rel], create=True)
        self._open = (upload.upload_id, rel, fd)
        return fd

    def _close_open_file(self) -> None:
        if self._open:
            os.close(self._open[2])
            self._open = None

    # -- install --
    #
    # An install runs in three steps so that the long one holds no lock: (1) under the lock,
    # verify and install the files, write the journal and switch the records; (2) without it,
    # `activate` (the daemon loads the bundle, building its TensorRT engine on a Jetson, and
    # smoke-tests it), while status, begin and chunks keep being answered; (3) under the lock
    # again, keep the switch or undo it. The InstallJob (device/store/jobs.py) is the flag that
    # keeps a second commit or rollback out meanwhile (409), and what status reports.

    def claim(self, op: str, upload_id: str | None = None) -> InstallJob:
        """Start the store's one install: 409 "busy" while another runs (or, for a commit, while
        chunks of the upload still arrive), 404 for an upload the store does not know."""
        with self._lock:
            job = self._job
            if job is not None and job.state == "running":
                raise StoreError(f"a {job.op} is already in progress (phase {job.phase}); one install "
                                 "at a time", status=409, code="busy",
                                 hint="wait for it to end (`toolkit devices uploads DEVICE` shows "
                                      "the device's state), then try again")
            if upload_id is not None:
                if any(u == upload_id for u, _ in self._streams):
                    raise StoreError("chunks of this upload are still arriving", status=409, code="busy",
                                     hint="commit after the last chunk is acknowledged")
                self._load_upload(upload_id)
            self._job = InstallJob(op, upload_id)
            return self._job

    @property
    def install(self) -> InstallJob | None:
        """The running (or last) install."""
        return self._job

    def enter_phase(self, phase: str) -> None:
        """What the activate callback is doing now ("smoke" after the load); no-op between installs."""
        job = self._job
        if job is not None and job.state == "running":
            job.enter(phase)

    def commit(self, upload_id: str, activate: Activate, job: InstallJob | None = None) -> InstallResult:
        """Verify, install and switch to the upload's bundle; roll back if `activate` fails.
        `job`: a claim already made (the deploy service claims in the request, runs this in a
        thread); without one this claims it."""
        job = job or self.claim("commit", upload_id)
        return self._run_job(job, lambda: self._commit(upload_id, activate, job))

    def rollback(self, activate: Activate, job: InstallJob | None = None) -> InstallResult:
        """Make `previous` active again (and the current one previous), if it passes its smoke
        test; otherwise nothing changes."""
        job = job or self.claim("rollback")
        return self._run_job(job, lambda: self._rollback(activate, job))

    def _run_job(self, job: InstallJob, body: Callable[[], InstallResult]) -> InstallResult:
        """Run an install and record how it ended; the job never stays "running"."""
        try:
            result = body()
        except StoreError as e:
            job.finish(error=JobError(e.status, e.code, e.message, e.hint, dict(e.extra)))
            raise
        except BaseException as e:
            job.finish(error=JobError(500, "internal_error", f"the install failed: {_one_line(e)}"))
            raise
        job.finish(result)
        return result

    def _commit(self, upload_id: str, activate: Activate, job: InstallJob) -> InstallResult:
        with self._lock:
            if any(u == upload_id for u, _ in self._streams):
                raise StoreError("chunks of this upload are still arriving", status=409, code="busy",
                                 hint="commit after the last chunk is acknowledged")
            self._close_open_file()
            upload = self._load_upload(upload_id)
            new = BundleRef(bundle_dir_name(upload.manifest.name, upload_id), upload.manifest.name,
                            upload_id, _now())
            final = self.bundles / new.dir
            t0 = time.monotonic()
            if not final.is_dir():
                self._verify_staged(upload)
                fsync_tree(self.staging / upload_id)
                os.rename(self.staging / upload_id, final)
                fsync_dir(self.bundles)
                fsync_dir(self.staging)
            else:
                _remove(self.staging / upload_id)
            self._uploads.pop(upload_id, None)
            verify_s = time.monotonic() - t0
            self._settle_journal()
            active, previous = self.active, self.previous
            if active is not None and active.manifest_sha256 == upload_id:
                last = self._last_install()
                if last is not None and last.bundle.manifest_sha256 == upload_id:
                    return last
                return InstallResult(True, active, verify_s, None, active, previous, False, False,
                                     f"{active.dir} is already the active bundle")
            self._begin_switch(new, active, previous)
        job.enter("build")
        smoke = _run_activate(activate, self.path_of(new))
        with self._lock:
            job.enter("switch")
            result = self._end_switch(new, active, previous, smoke, verify_s)
            try:
                write_atomic(self.root / "last-install.json", json.dumps(to_json(result)).encode())
            except OSError as e:  # only answers a repeated commit; the install itself is done
                log.error("cannot record the install in last-install.json: %s", e)
            return result

    def _rollback(self, activate: Activate, job: InstallJob) -> InstallResult:
        with self._lock:
            self._settle_journal()
            active, previous = self.active, self.previous
            if previous is None or not self.path_of(previous).is_dir():
                raise StoreError("there is no previous bundle to roll back to", status=409,
                                 code="no_previous", hint="deploy a bundle instead")
            self._begin_switch(previous, active, previous)
        job.enter("build")
        smoke = _run_activate(activate, self.path_of(previous))
        with self._lock:
            job.enter("switch")
            result = self._end_switch(previous, active, previous, smoke, 0.0, keep_failed=True)
        if not result.ok:  # _end_switch restored both records
            return InstallResult(False, previous, 0.0, result.smoke, active, previous, True, False,
                                 f"rollback to {previous.dir} failed its smoke test; "
                                 f"{active.dir if active else 'no bundle'} is still active")
        return result

    def _verify_staged(self, upload: _Upload) -> None:
        staging = self.staging / upload.upload_id
        problems = verify_files(staging, upload.manifest)
        if not problems:
            return
        # a damaged or short file is truncated so that the next begin asks for all of it again
        for rel, entry in upload.manifest.files.items():
            held = _held(staging, upload.parts[rel])
            if held == entry.bytes and sha256_file(staging.joinpath(*upload.parts[rel])) != entry.sha256:
                _cut(staging, upload.parts[rel], 0)
        listed = "\n  - ".join(problems)
        raise StoreError(f"the uploaded bundle failed verification:\n  - {listed}", status=422,
                         code="verify_failed", hint="deploy again: damaged files are sent again")

    def _settle_journal(self) -> None:
        """A journal outside an install means an earlier one could not put its records back (a
        full disk while restoring them): finish it as recovery would before reading the records,
        so that the next switch starts from what is really serving."""
        journal = self._read_journal()
        if journal is not None:
            log.warning("store: %s", self._finish_switch(journal))

    def _begin_switch(self, new: BundleRef, old_active: BundleRef | None, old_prev: BundleRef | None) -> None:
        """Journal, then previous := old active, active := new. A full disk before the journal
        is on disk changes nothing (507); after it, the records are put back (and, should even
        that fail, the journal makes the next start put them back)."""
        journal = {"phase": "switching", "new": asdict(new),
                   "old_active": asdict(old_active) if old_active else None,
                   "old_previous": asdict(old_prev) if old_prev else None}
        with full_disk_as_507(self.root, 4096, "the install journal"):
            write_atomic(self.root / "switch.json", json.dumps(journal).encode())
        try:
            if old_active is not None:
                self._write_ref("previous", old_active)
            self._write_ref("active", new)
        except OSError as e:
            with contextlib.suppress(OSError):
                self._finish_switch(journal)
            if is_full(e):
                raise no_space(self.root, 4096, what="switching the store's records") from e
            raise

    def _end_switch(self, new: BundleRef, old_active: BundleRef | None, old_prev: BundleRef | None,
                    smoke: SmokeResult, verify_s: float, keep_failed: bool = False) -> InstallResult:
        """Keep the switch (the smoke test passed) or restore the records and (unless
        keep_failed, or the bundle is still referenced) delete the new bundle."""
        if smoke.ok:
            # the records already name the new bundle (written durably): removing the journal
            # is all that commits it, and needs no free space
            (self.root / "switch.json").unlink()
            fsync_dir(self.root)
            self._collect_garbage()
            prev = old_active if old_active is not None else old_prev
            return InstallResult(True, new, verify_s, smoke, new, prev, False, True,
                                 f"{new.dir} is active")
        try:
            self._write_ref("active", old_active)
            self._write_ref("previous", old_prev)
        except OSError as e:
            # the journal stays: the next install (_settle_journal) or start-up restores them
            log.error("cannot restore the store's records after the failed switch (%s)", e)
            if is_full(e):
                raise no_space(self.root, 4096, what="restoring the store's records") from e
            raise
        (self.root / "switch.json").unlink()
        fsync_dir(self.root)
        if not keep_failed and new.dir not in {r.dir for r in (old_active, old_prev) if r}:
            _remove(self.path_of(new))
        return InstallResult(False, new, verify_s, smoke, old_active, old_prev, True, False,
                             f"{new.dir} failed its smoke test; "
                             f"{old_active.dir if old_active else 'no bundle'} is active again")

    def _last_install(self) -> InstallResult | None:
        try:
            data = json.loads((self.root / "last-install.json").read_text(encoding="utf-8"))
            return install_result_from_json(data)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _collect_garbage(self) -> None:
        keep = {r.dir for r in (self.active, self.previous) if r}
        for entry in self.bundles.iterdir():
            if entry.name not in keep:
                _remove(entry)
                log.info("removed the unreferenced bundle %s", entry.name)

    # -- uploads in progress (`toolkit devices uploads`) --

    def list_uploads(self) -> list[UploadInfo]:
        with self._lock:
            now = time.time()
            return [UploadInfo(u.upload_id, u.name, u.held_bytes, u.total_bytes,
                               round(now - _newest_mtime(self.staging / u.upload_id), 1))
                    for u in self._uploads_in_progress()]

    def remove_uploads(self, ids: list[str] | None = None, every: bool = False,
                       older_than_s: float | None = None) -> list[UploadInfo]:
        """Delete uploads in progress: the ones named, all of them, or those idle longer than
        `older_than_s`. One whose chunks are arriving now is refused (409); an unknown id is 404
        and nothing is removed. Returns what was removed."""
        with self._lock:
            found = {u.upload_id: u for u in self.list_uploads()}
            if ids:
                unknown = [i for i in ids if i not in found]
                if unknown:
                    raise StoreError(f"no upload {unknown[0][:12]}… in progress", status=404,
                                     code="unknown_upload",
                                     hint="list them with `toolkit devices uploads DEVICE`")
                chosen = [found[i] for i in ids]
            elif every or older_than_s is not None:
                chosen = [u for u in found.values() if older_than_s is None or u.age_s >= older_than_s]
            else:
                raise StoreError("say which uploads to remove (ids, all, or older than N seconds)")
            busy = [u for u in chosen if any(s == u.upload_id for s, _ in self._streams)]
            if busy:
                raise StoreError(f"chunks of upload {busy[0].upload_id[:12]}… are arriving now",
                                 status=409, code="busy", hint="stop that deploy first")
            for u in chosen:
                if self._open and self._open[0] == u.upload_id:
                    self._close_open_file()
                self._uploads.pop(u.upload_id, None)
                _remove(self.staging / u.upload_id)
                log.info("removed the upload %s (%s, %d of %d bytes)", u.upload_id[:12], u.name,
                         u.held_bytes, u.total_bytes)
            if chosen:
                fsync_dir(self.staging)
            return chosen

    def uploads(self) -> Iterator[str]:
        return (d.name for d in self.staging.iterdir() if SHA_RE.fullmatch(d.name))


def _newest_mtime(folder: Path) -> float:
    newest = 0.0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest or time.time()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _run_activate(activate: Activate, path: Path) -> SmokeResult:
    """Any exception while loading or smoke-testing (a ToolkitError, or ONNX Runtime's own
    errors, which are not) is a failed smoke test with a one-line reason, and the old bundle
    stays; the traceback goes to the debug log."""
    t0 = time.monotonic()
    try:
        return activate(path)
    except Exception as e:  # noqa: BLE001 - whatever broke, the previous bundle must come back
        log.debug("activating %s failed", path, exc_info=True)
        reason = e.message if isinstance(e, ToolkitError) else _one_line(e)
        return SmokeResult(False, reason, time.monotonic() - t0)


def _remove(path: Path) -> None:
    """Delete a bundle or staging folder so that it is never seen half-deleted: it is renamed to
    a dot-name first (atomic), then removed. A SIGKILL inside rmtree used to leave bundles/<dir>
    without its manifest but with some files, which `begin` then took for an installed bundle;
    now it leaves a dot-entry, which recovery removes (bundles/.*, and staging entries that are
    not an upload id)."""
    if path.is_dir() and not path.is_symlink() and path.name.startswith("."):
        shutil.rmtree(path)  # already out of sight
    elif path.is_dir() and not path.is_symlink():
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash)
    else:
        path.unlink(missing_ok=True)


def parse_manifest(data: bytes) -> Manifest:
    """Manifest bytes from the wire -> Manifest, or StoreError (never an uncaught exception):
    the one codec (bundle/manifest.py) checks every field's type, migrates schema 1 and
    refuses newer schemas."""
    try:
        return parse_bundle_manifest(data, "the manifest")
    except ToolkitError as e:
        raise StoreError(e.message, code="bad_manifest", hint=e.hint) from e


def install_result_from_json(data: dict[str, Any]) -> InstallResult:
    def ref(v: Any) -> BundleRef | None:
        return BundleRef.from_json(v) if v else None

    smoke = SmokeResult(**data["smoke"]) if data.get("smoke") else None
    bundle = BundleRef.from_json(data["bundle"])
    return InstallResult(bool(data["ok"]), bundle, float(data["verify_s"]), smoke, ref(data.get("active")),
                         ref(data.get("previous")), bool(data["rolled_back"]),
                         bool(data.get("changed", True)), str(data.get("message", "")))


# --- the default smoke test ----------------------------------------------------------------------

def smoke_test(path: Path, phase: Callable[[str], None] | None = None) -> SmokeResult:
    """Load the bundle as the daemon does (hashes, target check, runtime) and run it once
    (smoke_runner). Any exception from the loader (ONNX Runtime's are not ToolkitErrors) is a
    failed test. `phase("smoke")` is called between the two (Store.enter_phase)."""
    from device.runtime.runner import load_bundle

    t0 = time.monotonic()
    try:
        runner = load_bundle(Path(path), slots=1, threads=1)
    except Exception as e:  # noqa: BLE001 - a bundle that cannot load fails its test
        log.debug("loading %s failed", path, exc_info=True)
        return SmokeResult(False, e.message if isinstance(e, ToolkitError) else _one_line(e),
                           time.monotonic() - t0)
    if phase is not None:
        phase("smoke")
    try:
        result = smoke_runner(runner)
    finally:
        runner.close()
    return SmokeResult(result.ok, result.detail, time.monotonic() - t0)


def smoke_runner(runner: Any, prompt: str = "hello world", tokens: int = 4) -> SmokeResult:
    """Run a loaded bundle once: a decoder generates `tokens` greedy tokens on slot 0, an encoder
    embeds one sentence. A runtime exception is a failed test (the bundle cannot serve)."""
    import numpy as np

    from device.runtime.generate import generate
    from device.runtime.pooling import pool

    t0 = time.monotonic()
    tok = runner.tokenizer
    try:
        ids = tok.encode(prompt) if tok else [1]
        if runner.is_decoder:
            out = list(generate(runner.backend, ids, tokens))
            if not out:
                return SmokeResult(False, "the model generated no token", time.monotonic() - t0)
            detail = f"generated {len(out)} tokens: {tok.decode(out) if tok else out!r}"
        else:
            feeds = {"input_ids": np.asarray([ids], dtype=np.int64)}
            feeds["attention_mask"] = np.ones_like(feeds["input_ids"])
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
            emb = pool(runner.backend.encode(feeds), feeds["attention_mask"], runner.manifest.pooling)
            if not np.isfinite(emb).all():
                return SmokeResult(False, "the embedding is not finite", time.monotonic() - t0)
            detail = f"embedded one sentence ({emb.shape[-1]} dims)"
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
        log.debug("the smoke test failed", exc_info=True)
        return SmokeResult(False, f"the bundle loaded but failed to run: {_one_line(e)}",
                           time.monotonic() - t0)
    return SmokeResult(True, detail, time.monotonic() - t0)
