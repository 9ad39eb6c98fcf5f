"""(width, height, text chunks) of a PNG, for tests of the reports' plots."""

from __future__ import annotations

import struct
import zlib


def png_info(data: bytes) -> tuple[int, int, dict[str, str]]:
    """(width, height, tEXt chunks) of a PNG, read with the standard library."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, text, size = 8, {}, (0, 0)
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            text[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            flag, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, value = rest.partition(b"\0")
            text[key.decode("latin-1")] = (zlib.decompress(value) if flag else value).decode()
        pos += 12 + length
    return size[0], size[1], text
