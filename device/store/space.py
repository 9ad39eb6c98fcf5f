"""Disk space for the store: what an upload will still take, and a full disk as a 507 answer.

What an upload needs on the store's filesystem, counted at `begin` (Store._check_disk):

    the bytes of this upload not yet on the device
  + the bytes still owed to every other upload in progress (each may be resumed and committed:
    counting only our own would let two half-sent uploads each pass the check and then both
    run the disk full)
  + the TensorRT engine the board builds beside the bundle at first load (targets whose engine
    record says build-on-device). The engine is estimated as the size of the model file(s) it
    is built from (model.onnx and its external weights): a TensorRT plan holds the same weights
    at the bundle's precision plus kernels, so it lands within a small factor of the ONNX file.
    The target record's workspace_bytes is the builder's GPU scratch pool, not disk, so it is
    not counted.
  + DISK_MARGIN left free for logs, journals and the page cache's writeback.

A write that still meets ENOSPC (another process filled the disk meanwhile) is answered the same
way: StoreError 507 "no_space" with needed_bytes and free_bytes, after the write has been undone
(the chunk cut back, the temp file removed), so a retry after freeing space resumes cleanly.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bundle.manifest import Manifest
from device.store.errors import StoreError

DISK_MARGIN = 64 << 20  # bytes left free on the store's filesystem after an upload
FULL = (errno.ENOSPC, errno.EDQUOT)


def engine_estimate(manifest: Manifest) -> int:
    """Bytes the board's engine build will write: the model file(s) it is built from, or 0 when
    the target builds nothing on the device."""
    if manifest.target.engine.status != "build-on-device":
        return 0
    model = manifest.model_file
    return sum(e.bytes for rel, e in manifest.files.items()
               if rel == model or rel.startswith(model + "."))  # model.onnx, model.onnx.data


def free_bytes(root: Path) -> int:
    return shutil.disk_usage(root).free


def no_space(root: Path, needed: int, free: int | None = None, what: str = "this upload") -> Exception:
    """The 507 StoreError: both figures in the message and as fields for the host."""
    free = free_bytes(root) if free is None else free
    mib = 1 << 20
    return StoreError(f"the device is out of disk space in {root}: {what} needs {needed} bytes "
                      f"({needed / mib:.0f} MiB) and {free} bytes ({free / mib:.0f} MiB) are free",
                      status=507, code="no_space",
                      hint="remove abandoned uploads (`toolkit devices uploads DEVICE --remove-all`) "
                           "or free space on the device, then deploy again (it resumes)",
                      needed_bytes=needed, free_bytes=free)


def is_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in FULL


@contextmanager
def full_disk_as_507(root: Path, needed: int, what: str = "this upload") -> Iterator[None]:
    """ENOSPC/EDQUOT inside the block -> the 507 StoreError (the block undoes its own write)."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL:
            raise
        raise no_space(root, needed, what=what) from e
