"""Typed field specs: each reads one optional field of a request object and describes it as
JSON Schema, so the request parsers (openai_api.py, kserve.py, bench_route.py) and the OpenAPI
document (openapi.py) take their bounds from the same objects and cannot drift
(tests/device/serve/test_validation.py probes every field through both).

    TEMPERATURE.read(body)      # the value, its default, or HTTPError 400 "invalid_value"
    TEMPERATURE.schema()        # {"anyOf": [...], "description": ...}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from device.serve.httpd import HTTPError

MAX_STRING = 256  # characters of a name-like string (model, role, id, stop)
# A text longer than this many characters per token of context is refused before tokenizing: no
# tokenizer averages 32 characters a token on text, and tokenizing 8 MB costs ~1 GB of encodings
CHARS_PER_TOKEN = 32


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
