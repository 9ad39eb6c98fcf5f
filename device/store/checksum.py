"""CRC32 of deploy chunks and serial frames: zlib's polynomial, ISA-L's speed when installed.

zlib.crc32 runs at ~4 GB/s on this project's 2-core VM; on a loopback deploy both ends compute it
over every byte, a quarter of the CPU the transfer has. ISA-L (`isal`, a dependency with wheels
for x86_64 and aarch64) computes the same CRC with carry-less multiply at ~50 GB/s. The values are
identical, so a host with ISA-L and a device without it (or the reverse) agree on every chunk.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

try:  # pragma: no branch - which one depends on the machine
    from isal.isal_zlib import crc32 as _crc32
    IMPLEMENTATION = "isal"
except ImportError:  # a device where the wheel is missing: same numbers, slower
    _crc32 = zlib.crc32
    IMPLEMENTATION = "zlib"

crc32: Callable[..., int] = _crc32
