"""One JSON codec and one JSON Schema for typed records (dataclasses), read off their type hints.

    data = encode(manifest)                       # dataclass -> plain JSON value
    manifest = decode(Manifest, data, "manifest")  # JSON value -> dataclass, or ToolkitError
    schema = json_schema(Manifest)                # JSON Schema (2020-12) of the same records

Why by hand: the records must load on a board's bare Python 3.10 (no pydantic/msgspec there,
and the device install keeps to the standard library plus the runtime), and the codec, the
schema and the records must never disagree, which they cannot when both are read off the
dataclasses' own annotations. Supported annotations: bool, int, float, str, None, Any,
Literal[...], X | None, list[X], dict[str, X] and nested dataclasses; that is all a manifest uses.

Decoding is strict about types (a bool is not an int, a string is not an object) and lenient
about unknown keys (a later 2.x writer may add a field; it is dropped, not fatal). Every error
names the field's path: "manifest.target.engine.status: expected one of [...], got 'x'".
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Literal, TypeVar, Union

from bundle.errors import ToolkitError

T = TypeVar("T")

_hints_cache: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _hints_cache:
        module = sys.modules[cls.__module__]
        _hints_cache[cls] = typing.get_type_hints(cls, vars(module))
    return _hints_cache[cls]


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


class RecordError(ToolkitError):
    """A JSON value that does not match its record; `where` is the field's path."""


def encode(obj: Any) -> Any:
    """A record (or list/dict of them) as plain JSON values, fields in declaration order."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    return obj


def decode(tp: type[T], data: Any, where: str) -> T:
    """`data` read as `tp`; RecordError naming the first field that does not fit."""
    return typing.cast(T, _decode(tp, data, where))


def _decode(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    if _is_union(tp):
        args = typing.get_args(tp)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(arg, data, where)
            except RecordError as e:
                errors.append(e.message)
        raise RecordError(errors[0] if len(errors) == 1 else
                          f"{where}: {_shown(data)} matches none of {_names(args)}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if data not in allowed or isinstance(data, bool) != isinstance(allowed[0], bool):
            raise RecordError(f"{where}: expected one of {list(allowed)}, got {_shown(data)}")
        return data
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(data, list):
            raise RecordError(f"{where}: expected a list, got {_shown(data)}")
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        _, value = typing.get_args(tp)
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {_shown(data)}")
        return {str(k): _decode(value, v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise RecordError(f"{where}: expected an object, got {_shown(data)}")
        hints, values = _hints(tp), {}
        for f in dataclasses.fields(tp):
            if f.name in data:
                values[f.name] = _decode(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise RecordError(f"{where}: the required field {f.name!r} is missing")
        try:
            return tp(**values)
        except (TypeError, ValueError) as e:
            raise RecordError(f"{where}: {e}") from e
    return _scalar(tp, data, where)


def _scalar(tp: Any, data: Any, where: str) -> Any:
    if tp is type(None):
        if data is not None:
            raise RecordError(f"{where}: expected null, got {_shown(data)}")
        return None
    if tp is bool:
        ok = isinstance(data, bool)
    elif tp is int:
        ok = isinstance(data, int) and not isinstance(data, bool)
    elif tp is float:
        ok = isinstance(data, (int, float)) and not isinstance(data, bool)
        data = float(data) if ok else data
    elif tp is str:
        ok = isinstance(data, str)
    else:
        raise TypeError(f"{where}: unsupported annotation {tp!r}")  # a bug in a record, not input
    if not ok:
        raise RecordError(f"{where}: expected {_names((tp,))}, got {_shown(data)}")
    return data


def _names(args: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def _shown(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 60 else text[:57] + "..."


# --- the JSON Schema of the same records -------------------------------------------------------
def json_schema(root: type, title: str, schema_id: str) -> dict[str, Any]:
    """Draft 2020-12 schema of `root`: every record under $defs, fields required exactly when
    the dataclass gives them no default, descriptions from the records' docstrings."""
    defs: dict[str, Any] = {}
    top = record_schema(root, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema_id,
            "title": title, **top, "$defs": dict(sorted(defs.items()))}


def record_schema(tp: Any, defs: dict[str, Any], ref: str = "#/$defs/", sent: bool = False) -> dict[str, Any]:
    """The schema of annotation `tp`; each record it reaches goes into `defs` (by class name)
    and is referred to as ref + name. sent: the records as `encode`/`asdict` send them, so
    every field is there and nothing else (closed objects, every field required), which is
    what a reader of an answer may rely on; otherwise (a file a person writes) a field with a
    default may be left out."""
    if tp is Any:
        return {}
    if _is_union(tp):
        return {"anyOf": [record_schema(a, defs, ref, sent) for a in typing.get_args(tp)]}
    origin = typing.get_origin(tp)
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if origin is list:
        return {"type": "array", "items": record_schema(typing.get_args(tp)[0], defs, ref, sent)}
    if origin is dict:
        return {"type": "object", "additionalProperties": record_schema(typing.get_args(tp)[1], defs, ref,
                                                                        sent)}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        name = tp.__name__
        if name not in defs:
            defs[name] = {}  # placeholder: records may nest themselves
            hints = _hints(tp)
            fields = dataclasses.fields(tp)
            # a dataclass without a docstring gets its signature as __doc__: no description then
            doc = "" if (tp.__doc__ or "").startswith(name + "(") else " ".join((tp.__doc__ or "").split())
            defs[name] = {
                "type": "object",
                **({"description": doc} if doc else {}),
                "properties": {f.name: record_schema(hints[f.name], defs, ref, sent) for f in fields},
                "required": [f.name for f in fields if sent or _no_default(f)],
                **({"additionalProperties": False} if sent else {}),
            }
        return {"$ref": ref + name}
    simple = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}
    if tp in simple:
        return {"type": simple[tp]}
    raise TypeError(f"unsupported annotation {tp!r}")


def _no_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
