"""KServe v2's binary tensor data extension (Triton's), which tritonclient uses by default.

Request: the body is a JSON header of `Inference-Header-Content-Length` bytes, then the raw
bytes of every input whose parameters hold `binary_data_size`, in input order, back to back.
Such an input has no "data"; its elements are
  BYTES    each a 4-byte little-endian length, then that many bytes (UTF-8 text here)
  numeric  little-endian, row-major (FP16/32/64, INT8..64, UINT8..64; BOOL one byte each)
The tail must hold exactly the sizes announced (Triton's check), else 400.
Response: when the request says `parameters.binary_data_output: true` (tritonclient does when
no outputs are named) or an output says `parameters.binary_data: true`, that output carries
`parameters.binary_data_size` instead of "data", the body is the JSON header then the bytes, and
the header's length is the response's Inference-Header-Content-Length.

    body, tail = split_body(raw, h.headers.get(HEADER_LENGTH))   # JSON header + binary tail
    inputs = resolve_inputs(body["inputs"], tail, max_elements)  # binary inputs get "data"
    raw, n = binary_response(header, {"embedding": array})      # when wants_binary(body)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from device.serve.httpd import HTTPError

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMPY = {"BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
         "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
         "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def split_body(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    """(the parsed JSON header, the binary tail); without the header, all of it is JSON."""
    from device.serve.validate import JSONRefused, loads_bounded

    n = len(raw)
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(raw):
            raise HTTPError(400, f"{HEADER_LENGTH} must be a byte count of at most the body's "
                                 f"{len(raw)} bytes (got {header_length[:40]!r})")
        n = int(header_length)
    try:
        return loads_bounded(raw[:n]), raw[n:]
    except JSONRefused as e:
        raise HTTPError(e.status, e.message, e.code) from e


def _binary_size(tensor: Any) -> int | None:
    params = tensor.get("parameters") if isinstance(tensor, dict) else None
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise HTTPError(400, "parameters.binary_data_size must be a non-negative integer")
    return size


def _bytes_elements(buf: bytes, name: str, limit: int) -> list[Any]:
    """BYTES elements, each <u4 length + bytes; stops past `limit` (the shape says how many)."""
    out: list[Any] = []
    at = 0
    while at < len(buf) and len(out) <= limit:
        if at + 4 > len(buf):
            raise HTTPError(400, f"input '{name}': binary BYTES data ends inside an element's length")
        size = int.from_bytes(buf[at:at + 4], "little")
        if at + 4 + size > len(buf):
            raise HTTPError(400, f"input '{name}': a BYTES element of {size} bytes runs past its data")
        try:
            out.append(buf[at + 4:at + 4 + size].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise HTTPError(400, f"input '{name}': a BYTES element is not UTF-8 text: {e}") from e
        at += 4 + size
    return out


def _decode(datatype: Any, buf: bytes, name: str, limit: int) -> list[Any]:
    if datatype == "BYTES":
        return _bytes_elements(buf, name, limit)
    dtype = NUMPY.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise HTTPError(400, f"input '{name}': unknown datatype for binary data")
    width = np.dtype(dtype).itemsize
    if len(buf) % width:
        raise HTTPError(400, f"input '{name}': {len(buf)} bytes is not a whole number of {datatype}")
    if len(buf) // width > limit:
        return [0] * (limit + 1)  # more than the shape can hold: tensor_values says so
    return list(np.frombuffer(buf, dtype=dtype).tolist())


def resolve_inputs(inputs: list[Any], tail: bytes, max_elements: int) -> list[Any]:
    """The inputs with every binary one's elements decoded into "data" (a copy; the others as
    they came), after checking that the sizes announced account for the tail exactly."""
    sizes = [_binary_size(t) for t in inputs]
    announced = sum(s for s in sizes if s is not None)
    if announced != len(tail):
        raise HTTPError(400, f"the inputs announce {announced} bytes of binary data but the body "
                             f"carries {len(tail)} after the JSON header")
    out, at = [], 0
    for tensor, size in zip(inputs, sizes):
        if size is None:
            out.append(tensor)
            continue
        if "data" in tensor:
            raise HTTPError(400, f"input '{tensor.get('name')}' has both 'data' and binary_data_size")
        name = str(tensor.get("name"))[:64]
        data = _decode(tensor.get("datatype"), tail[at:at + size], name, max_elements)
        out.append({**tensor, "data": data})
        at += size
    return out


def wants_binary(body: dict[str, Any]) -> bool:
    """Binary outputs: asked per output (parameters.binary_data), else for all of them."""
    outputs = body.get("outputs")
    if isinstance(outputs, list) and outputs:
        return any(isinstance(o, dict) and isinstance(o.get("parameters"), dict)
                   and o["parameters"].get("binary_data") is True for o in outputs)
    params = body.get("parameters")
    return isinstance(params, dict) and params.get("binary_data_output") is True


def binary_response(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """(body, JSON header length): each output in `header` named in `arrays` loses its "data"
    and gains parameters.binary_data_size; the arrays' little-endian bytes follow, in order."""
    import json

    tails = []
    for out in header["outputs"]:
        array = arrays.get(out["name"])
        if array is None:
            continue
        raw = np.ascontiguousarray(array, dtype=NUMPY[out["datatype"]]).tobytes()
        out.pop("data", None)
        out["parameters"] = {**out.get("parameters", {}), "binary_data_size": len(raw)}
        tails.append(raw)
    head = json.dumps(header).encode()
    return head + b"".join(tails), len(head)
