"""The bounded JSON parser every request body goes through (Handler.read_json):

    body = loads_bounded(raw)   # JSONRefused (status 400 / 413, code) instead of RecursionError,
                                # NaN, a 5000-digit int or a string the tokenizer cannot encode

Why a depth scan before json.loads: the C scanner recurses once per nesting level and raises
RecursionError (not a JSONDecodeError) somewhere near 1000 levels, and every later walk of the
value (a KServe tensor's nested data, say) would recurse again. The scan counts brackets outside
strings in a few numpy passes; a body with fewer brackets than the limit (every chat request)
skips it after two bytes.count calls.

JSON is read as UTF-8 only (RFC 8259 §8.1): the scan relies on '"', '\\' and brackets never
being part of a multi-byte character, which holds in UTF-8 and not in UTF-16/32 (that
json.loads would otherwise guess). NaN and Infinity, which Python's json accepts, are refused
(they are not JSON, and a NaN temperature or penalty is never meant). Integers longer than
Python's int_max_str_digits (4300) are refused as 400 rather than escaping as a ValueError.

This module imports nothing of the HTTP layer (httpd imports it); read_json turns JSONRefused
into the HTTPError the route families render. The request fields are checked after parsing by
the typed specs in device/serve/fields.py.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

MAX_DEPTH = 32  # nesting levels; the deepest request we serve (a KServe tensor of rank 8) needs 10
# JSON bodies' own cap, whatever the HTTP layer's body limit is (deploy chunks are raw bodies of
# the same 8 MiB today; should that limit grow for them, JSON stays capped)
MAX_JSON_BYTES = 8 << 20

# bytes.translate(None, _DELETE) keeps only what string and nesting structure is made of
_DELETE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_QUOTE = ord('"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class JSONRefused(ValueError):
    """A body loads_bounded will not parse: status (400 or 413) and a stable error code."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class _NotJSON(ValueError):
    """NaN / Infinity / -Infinity: Python's extension to JSON."""


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(name)


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in a UTF-8 JSON text, without recursing.

    Escaped backslash pairs, then escaped quotes, are removed first (left to right, so a run of
    backslashes pairs up as the JSON scanner reads it); what is left of every string is then a
    run between two unescaped quotes, and a bracket counts only after an even number of them.
    On invalid JSON the figure may be wrong, but only after the point where json.loads stops:
    it never says less than json.loads would recurse before failing."""
    kept = body.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _DELETE)
    a = np.frombuffer(kept, np.uint8)
    if a.size == 0:
        return 0
    outside = (np.cumsum(a == _QUOTE, dtype=np.int64) & 1) == 0
    steps = _STEP[a].astype(np.int64) * outside
    return int(np.cumsum(steps).max(initial=0))


def loads_bounded(body: bytes, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """json.loads for untrusted bodies: size, depth, UTF-8, no NaN/Infinity, no lone surrogates,
    each refused with JSONRefused (413 for size, 400 otherwise) instead of a 500."""
    if len(body) > max_bytes:
        raise JSONRefused(413, f"the JSON body has {len(body)} bytes; the limit is {max_bytes}",
                        "too_large")
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        raise JSONRefused(400, f"the JSON body nests deeper than {max_depth} levels", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONRefused(400, f"the request body is not UTF-8: {e}", "invalid_json") from e
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except _NotJSON as e:
        # "invalid_value", not "invalid_json": the body parses, a number in it is not a number
        raise JSONRefused(400, f"{e} is not a JSON number (RFC 8259); send a finite number",
                        "invalid_value") from e
    except ValueError as e:  # JSONDecodeError, and int() past int_max_str_digits
        raise JSONRefused(400, f"the request body is not valid JSON: {e}", "invalid_json") from e
    except RecursionError as e:  # unreachable past the depth check; kept as the last line
        raise JSONRefused(400, "the JSON body nests too deeply", "invalid_json") from e
    if _SURROGATE_ESCAPE.search(body):
        _refuse_lone_surrogates(value)
    return value


def _refuse_lone_surrogates(value: Any) -> None:
    """json.loads turns a lone "\\ud800" into a str that cannot be encoded, which the tokenizer
    (and any later encode) raises on. Walked only when the body has such an escape at all."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise JSONRefused(400, "a string holds an unpaired UTF-16 surrogate escape",
                                "invalid_json") from e
