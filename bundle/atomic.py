"""Durable, atomic writes: the one implementation every writer of a small file or a folder uses.

    write_atomic(path, data)        # readers see the old bytes or the new, never half of them
    fsync_tree(folder)              # every file and folder under it on disk (before a rename)
    fsync_dir(folder)               # a rename or a new entry in it survives a power cut
    check_parent(out)               # before expensive work: can `out` be made where it is named?
    write_output(path, data, hint)  # write_atomic, an OSError turned into one line for the user

A write goes to a temporary file beside the target (same filesystem, so the rename is atomic),
is fsync'd, renamed over the target, and the folder is fsync'd so the rename itself is durable
(ext4 with data=ordered needs both: rename alone can leave a zero-length file after a power cut).
"""

from __future__ import annotations

import os
from pathlib import Path

from bundle.errors import ToolkitError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | memoryview, offset: int = 0) -> None:
    """pwrite until every byte is written (a short write is not an error)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_atomic(path: Path, data: bytes | memoryview, mode: int = 0o644) -> int:
    """temp file + fsync + rename + fsync of the folder; returns the bytes written. The temp
    file is made with `mode` (0o600 for secrets) and O_NOFOLLOW; it is removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return memoryview(data).nbytes


def write_output(path: Path, data: bytes, hint: str, what: str = "", mode: int = 0o644,
                 folder_mode: int | None = None) -> Path:
    """write_atomic for a file the user named (a report, a page, a unit, a config file): an
    OSError there (a folder in its place, a read-only or missing folder, a full disk) is the
    user's path to change, so one ToolkitError line with `hint`, not a traceback. folder_mode:
    make the missing folders above it first, with that mode."""
    path = Path(path)
    try:
        if folder_mode is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=folder_mode)
        write_atomic(path, data, mode)
    except OSError as e:
        raise ToolkitError(f"cannot write {what + ' ' if what else ''}{path}: {e.strerror or e}",
                           hint=hint) from e
    return path


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under root (folders last, so their entries are durable)."""
    dirs = [Path(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        dirs += [Path(dirpath) / d for d in dirnames]
    for d in reversed(dirs):
        fsync_dir(d)


def check_parent(out: Path) -> None:
    """Refuse an output path whose nearest existing folder above is a file or not writable by us
    (the temporary file or staging folder goes there); called before any expensive work, which
    would otherwise be lost to a traceback at the end."""
    above = next((p for p in Path(os.path.abspath(out)).parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ToolkitError(f"output {out}: {above} is a file, not a folder", hint="choose another -o")
    if above is not None and not os.access(above, os.W_OK | os.X_OK):
        raise ToolkitError(f"output {out}: cannot write in {above} (permission denied)",
                           hint="choose another -o, in a folder you can write")
