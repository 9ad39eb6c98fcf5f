"""Atomic bundle writing: build in a hidden staging folder beside the target, rename at the end.

    with staged_bundle(out, force=False) as staging:   # refuses an existing `out` up front
        ... write files into staging ...
        finalize(staging, manifest)                     # hashes every file, writes manifest.json
    # on success staging is renamed to `out`; on any exception it is removed

An existing bundle is replaced only with force=True, and then by two renames: the old one is
moved aside, the new one moved in, the old one deleted. A crash between them leaves the old
bundle in `.<name>.old-*`, never a half-written `out`. Ctrl-C waits for the swap-in and for the
removal of a staging folder to finish (then raises): a second Ctrl-C in the cleanup of the first
left half a staging folder, and one between the renames could leave the old bundle aside.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from bundle.atomic import check_parent, fsync_tree, write_atomic
from bundle.errors import Interrupted, ToolkitError
from bundle.manifest import MANIFEST, Manifest, hash_tree


def check_output(out: Path, force: bool) -> None:
    """Refuse an output path we must not replace; called before any expensive work."""
    out = Path(out)
    check_parent(out)
    if out.exists() and not force:
        raise ToolkitError(f"output {out} already exists",
                           hint="pass --force to replace it, or -o to choose another folder")
    if out.exists() and not out.is_dir():
        raise ToolkitError(f"output {out} exists and is not a folder", hint="choose another -o")
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise ToolkitError(f"output {out} is a non-empty folder that is not a bundle; "
                           "refusing to replace it even with --force",
                           hint="choose another -o")


@contextmanager
def staged_bundle(out: Path, force: bool = False) -> Iterator[Path]:
    out = Path(out).absolute()
    check_output(out, force)
    made = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:  # what check_output cannot see: a read-only mount, /proc, a full disk
        _remove_empty(made)
        raise ToolkitError(f"cannot write the bundle {out}: {e.strerror or e}",
                           hint="choose another -o, in a folder you can write") from e
    try:
        yield staging
        if not (staging / MANIFEST).exists():
            raise RuntimeError("staged bundle was not finalized")
        try:
            with sigint_deferred():
                _swap_in(staging, out, force)
        except KeyboardInterrupt:  # only the deferred one: the swap-in was done
            raise Interrupted(f"the bundle {out} was complete and is in place") from None
    except BaseException:
        with sigint_deferred():
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(made)  # a failed or interrupted convert leaves no trace
        raise


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Run the block to its end through Ctrl-C, then raise the KeyboardInterrupt. Only where
    SIGINT raises KeyboardInterrupt (Python's default handler, in the main thread): a process
    with its own SIGINT handler (the daemon drains on it) is left as it is."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    caught: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _missing_parents(out: Path) -> list[Path]:
    """The folders above `out` that do not exist yet (deepest first): made for it, removed again
    if the bundle is not written."""
    return [p for p in out.parents if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # never made, or something else was put there meanwhile: keep it
            continue


def finalize(staging: Path, manifest: Manifest) -> Manifest:
    """Hash every file and write manifest.json last (its presence marks a complete bundle)."""
    manifest.files = hash_tree(staging)
    manifest.created_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    fsync_tree(staging)  # every file durable before the manifest that vouches for them
    write_atomic(staging / MANIFEST, manifest.to_json().encode("utf-8"))
    return manifest


def _swap_in(staging: Path, out: Path, force: bool) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    check_output(out, force)  # re-check: something may have appeared while we worked
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
