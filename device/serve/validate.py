"""Request validation shared by every route: a bounded JSON parser, and typed field specs that
both check a request and describe it in the OpenAPI document (device/serve/openapi.py), so the
published bounds and the enforced ones are the same objects and cannot drift.

    body = loads_bounded(raw)                 # 400 / 413 instead of RecursionError, NaN, ...
    TEMPERATURE.read(body)                    # the value, its default, or HTTPError 400
    TEMPERATURE.schema()                      # {"anyOf": [...], "description": ...}

Why a depth scan before json.loads: the C scanner recurses once per nesting level and raises
RecursionError (not a JSONDecodeError) somewhere near 1000 levels, and every later walk of the
value (a KServe tensor's nested data, say) would recurse again. The scan counts brackets outside
strings in a few numpy passes; a body with fewer brackets than the limit (every chat request)
skips it after two bytes.count calls.

JSON is read as UTF-8 only (RFC 8259 §8.1): the scan relies on '"', '\\\\' and brackets never
being part of a multi-byte character, which holds in UTF-8 and not in UTF-16/32 (that
json.loads would otherwise guess). NaN and Infinity, which Python's json accepts, are refused
(they are not JSON, and a NaN temperature or penalty is never meant). Integers longer than
Python's int_max_str_digits (4300) are refused as 400 rather than escaping as a ValueError.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device.serve.httpd import MAX_BODY, HTTPError

MAX_DEPTH = 32  # nesting levels; the deepest request we serve (a KServe tensor of rank 8) needs 10
MAX_STRING = 256  # characters of a name-like string (model, role, id, stop)
# A text longer than this many characters per token of context is refused before tokenizing: no
# tokenizer averages 32 characters a token on text, and tokenizing 8 MB costs ~1 GB of encodings
CHARS_PER_TOKEN = 32

# bytes.translate(None, _DELETE) keeps only what string and nesting structure is made of
_DELETE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_STEP = np.zeros(256, np.int8)
_STEP[[ord("["), ord("{")]] = 1
_STEP[[ord("]"), ord("}")]] = -1
_QUOTE = ord('"')
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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


def loads_bounded(body: bytes, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BODY) -> Any:
    """json.loads for untrusted bodies: size, depth, UTF-8, no NaN/Infinity, no lone surrogates,
    each refused with an HTTPError (413 for size, 400 otherwise) instead of a 500."""
    if len(body) > max_bytes:
        raise HTTPError(413, f"the JSON body has {len(body)} bytes; the limit is {max_bytes}",
                        "too_large")
    if body.count(b"[") + body.count(b"{") > max_depth and json_depth(body) > max_depth:
        raise HTTPError(400, f"the JSON body nests deeper than {max_depth} levels", "invalid_json")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError(400, f"the request body is not UTF-8: {e}", "invalid_json") from e
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except _NotJSON as e:
        # "invalid_value", not "invalid_json": the body parses, a number in it is not a number
        raise HTTPError(400, f"{e} is not a JSON number (RFC 8259); send a finite number",
                        "invalid_value") from e
    except ValueError as e:  # JSONDecodeError, and int() past int_max_str_digits
        raise HTTPError(400, f"the request body is not valid JSON: {e}", "invalid_json") from e
    except RecursionError as e:  # unreachable past the depth check; kept as the last line
        raise HTTPError(400, "the JSON body nests too deeply", "invalid_json") from e
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
                raise HTTPError(400, "a string holds an unpaired UTF-16 surrogate escape",
                                "invalid_json") from e


# --- typed field specs ------------------------------------------------------------------------
# Each spec reads one optional field of a JSON object (null means "not given", as OpenAI clients
# send it) and describes it as JSON Schema. The request parsers call read(); openapi.py calls
# schema(). Errors are HTTPError 400 "invalid_value" with param = the field's name.

def is_int(v: Any) -> bool:
    """An integer as JSON Schema counts them: 3 and 3.0, not true (Python's bool is an int)."""
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, f"'{param}': {message}", "invalid_value", param)


def _nullable(schema: dict[str, Any], doc: str) -> dict[str, Any]:
    out: dict[str, Any] = {"anyOf": [schema, {"type": "null"}]}
    if doc:
        out["description"] = doc
    return out


@dataclass(frozen=True)
class IntField:
    name: str
    lo: int
    hi: int
    default: int | None = None
    doc: str = ""

    def read(self, body: Mapping[str, Any]) -> int | None:
        v = body.get(self.name)
        if v is None:
            return self.default
        if not is_int(v):
            raise bad(self.name, f"expected an integer, got {type(v).__name__}")
        if not self.lo <= v <= self.hi:
            raise bad(self.name, f"must be in [{self.lo}, {self.hi}] (got {short(v)})")
        return int(v)

    def schema(self) -> dict[str, Any]:
        return _nullable({"type": "integer", "minimum": self.lo, "maximum": self.hi}, self.doc)


@dataclass(frozen=True)
class FloatField:
    """A finite number in [lo, hi] ((lo, hi] with lo_open). zero_ok: 0 is also accepted where
    lo > 0 (a temperature is 0 for greedy, or at least lo)."""

    name: str
    lo: float
    hi: float
    default: float
    lo_open: bool = False
    zero_ok: bool = False
    doc: str = ""

    def read(self, body: Mapping[str, Any]) -> float:
        v = body.get(self.name)
        if v is None:
            return self.default
        if not is_num(v) or (isinstance(v, float) and not math.isfinite(v)):
            raise bad(self.name, f"expected a finite number, got {type(v).__name__} {short(v)}")
        # compared before float(): an integer past 1e308 must not overflow on the way
        if self.zero_ok and v == 0:
            return 0.0
        if v < self.lo or v > self.hi or (self.lo_open and v == self.lo):
            extra = " (or 0)" if self.zero_ok else ""
            raise bad(self.name, f"must be in {'(' if self.lo_open else '['}{self.lo:g}, "
                                 f"{self.hi:g}]{extra} (got {short(v)})")
        return float(v)

    def schema(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"type": "number", "maximum": self.hi}
        rng["exclusiveMinimum" if self.lo_open else "minimum"] = self.lo
        if self.zero_ok:
            return {"anyOf": [{"const": 0}, rng, {"type": "null"}], "description": self.doc}
        return _nullable(rng, self.doc)


@dataclass(frozen=True)
class BoolField:
    name: str
    default: bool = False
    doc: str = ""

    def read(self, body: Mapping[str, Any]) -> bool:
        v = body.get(self.name)
        if v is None:
            return self.default
        if not isinstance(v, bool):
            raise bad(self.name, f"expected true or false, got {short(v)}")
        return v

    def schema(self) -> dict[str, Any]:
        return _nullable({"type": "boolean"}, self.doc)


@dataclass(frozen=True)
class StrField:
    name: str
    max_len: int = MAX_STRING
    choices: tuple[str, ...] = ()
    default: str | None = None
    doc: str = ""

    def read(self, body: Mapping[str, Any]) -> str | None:
        v = body.get(self.name)
        if v is None:
            return self.default
        if not isinstance(v, str):
            raise bad(self.name, f"expected a string, got {type(v).__name__}")
        if self.choices and v not in self.choices:
            raise bad(self.name, f"must be one of {', '.join(self.choices)} (got {short(v)})")
        if len(v) > self.max_len:
            raise bad(self.name, f"at most {self.max_len} characters (got {len(v)})")
        return v

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "maxLength": self.max_len}
        if self.choices:
            s = {"enum": list(self.choices)}
        return _nullable(s, self.doc)


@dataclass(frozen=True)
class OffField:
    """A field we do not implement: accepted only at a value that means "off", so a client
    never silently gets less than it asked for (n=2, logprobs=true, a penalty ...)."""

    name: str
    off: tuple[Any, ...]  # JSON values (null is always accepted)
    doc: str = ""

    def check(self, body: Mapping[str, Any]) -> None:
        v = body.get(self.name)
        # JSON Schema's equality: 1.0 is 1, but true is not 1 (as it is in Python)
        if v is not None and not any(v == o and isinstance(v, bool) == isinstance(o, bool)
                                     for o in self.off):
            raise HTTPError(400, f"'{self.name}'={short(v)} is not supported by this daemon",
                            "unsupported_parameter", self.name)

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [*({"const": o} for o in self.off), {"type": "null"}],
                "description": self.doc or "not supported: only its no-op value is accepted"}


def short(v: Any) -> str:
    """A value for an error message, never the whole of a 1 MB string."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def object_schema(fields: tuple[Any, ...], required: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None, doc: str = "") -> dict[str, Any]:
    """The JSON Schema of a request object: the specs' fields plus hand-written ones (`required`
    and optional `extra`, whose parsers sit beside them); other fields are allowed and ignored,
    as vLLM does."""
    props = dict(required or {})
    props.update({f.name: f.schema() for f in fields})
    props.update(extra or {})
    out: dict[str, Any] = {"type": "object", "properties": props, "required": list(required or {})}
    if doc:
        out["description"] = doc
    return out
