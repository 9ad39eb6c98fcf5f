"""KServe / Open Inference Protocol v2 (REST) for the daemon's one model (protocols.md §1b).

Encoder bundles serve `infer`: a BYTES input of texts -> an FP32 output of pooled embeddings.

    POST /v2/models/minilm/infer
    {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]}
 -> {"model_name": "minilm", "outputs": [{"name": "embedding", "datatype": "FP32",
                                         "shape": [2, 384], "data": [...768 floats...]}]}

Every input is checked the way Triton does (shape x datatype against the data actually sent)
before anything runs; errors use the flat v2 body {"error": "..."}. Inputs and outputs may use
the binary tensor data extension (device/serve/kserve_binary.py), as tritonclient does by
default. Decoder bundles serve Triton's generate extension instead (device/serve/kserve_generate.py).

Versions: the daemon serves one version of its one model, named both "1" and by its bundle id
(the first 12 hex digits of its manifest's SHA-256); /v2/models/{m}/versions/{v}/... answers 404
for any other v. platform is Triton's name of the runtime: onnxruntime_onnx or tensorrt_plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from device.serve.fields import CHARS_PER_TOKEN, is_int, short
from device.serve.httpd import HTTPError

INPUT_NAME = "text"
OUTPUT_NAME = "embedding"
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}  # Triton's names

_INT_RANGES = {"UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1),
               "UINT64": (0, 2**64 - 1), "INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1),
               "INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}
DATATYPES = ("BOOL", *_INT_RANGES, "FP16", "FP32", "FP64", "BYTES")


def model_metadata(name: str, kind: str, hidden: int | None, runtime: str,
                   versions: list[str]) -> dict[str, Any]:
    if kind == "encoder":
        inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, hidden or -1]}]
    else:  # served by the generate extension (/generate, /generate_stream) and the OpenAI routes
        inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
        outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]
    return {"name": name, "versions": versions, "platform": PLATFORMS.get(runtime, runtime),
            "inputs": inputs, "outputs": outputs}


MAX_DIMS = 8  # a tensor's rank; Triton's own models rarely pass 5
MAX_TEXTS = 256  # texts per request (the declared input's batch bound; /v1/embeddings' too)
MAX_ID = 256  # characters of a request id


@dataclass(frozen=True)
class InferCall:
    id: str | None
    texts: tuple[str, ...]
    binary: bool = False  # answer with the binary tensor data extension


def _element_ok(datatype: str, v: Any) -> bool:
    if datatype == "BYTES":
        return isinstance(v, str)
    if datatype == "BOOL":
        return isinstance(v, bool)
    if datatype.startswith("FP"):  # JSON has no NaN/Infinity; 1e400 reads as inf: refused too
        return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))
    lo, hi = _INT_RANGES[datatype]
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _flatten(data: Any, limit: int) -> list[Any] | None:
    """Row-major elements of nested lists, without recursion; None as soon as there are more
    than `limit` (the caller knows how many the shape holds: no reason to collect more)."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
            if len(out) > limit:
                return None
    return out


_END = object()


def _elements(shape: Any, name: str, max_elements: int) -> int:
    """The element count a shape holds, refusing a rank or a count past the limits as it goes
    (multiplying 50 000 dims of 2**63 first costs seconds of big-integer arithmetic)."""
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape[:MAX_DIMS + 1]):
        raise HTTPError(400, f"input '{name}': 'shape' must be a list of non-negative integers")
    if len(shape) > MAX_DIMS:
        raise HTTPError(400, f"input '{name}': at most {MAX_DIMS} dimensions (got {len(shape)})")
    n = 1
    for d in shape:
        n *= int(d)
        if n > max_elements:
            raise HTTPError(413, f"input '{name}': shape {shape} holds more than {max_elements} "
                                 "elements, this model's limit")
    return n


def tensor_values(tensor: Any, where: str, max_elements: int) -> tuple[str, str, list[Any]]:
    """Validate one request tensor -> (name, datatype, flat data): shape x datatype must
    account for exactly the elements sent, each of the right type (Triton's "input byte size
    mismatch"), and the shape must fit the model's declared input."""
    if not isinstance(tensor, dict):
        raise HTTPError(400, f"{where} must be an object with name, datatype, shape, data")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name or len(name) > MAX_ID:
        raise HTTPError(400, f"{where}: 'name' must be a non-empty string of at most {MAX_ID} characters")
    if datatype not in DATATYPES:
        raise HTTPError(400, f"input '{name}': unknown datatype {short(datatype)}; "
                             f"one of {', '.join(DATATYPES)}")
    expected = _elements(shape, name, max_elements)
    if "data" not in tensor:
        raise HTTPError(400, f"input '{name}': no 'data' and no parameters.binary_data_size")
    flat = _flatten(tensor["data"], expected)
    if flat is None or len(flat) != expected:
        got = f"more than {expected}" if flat is None else str(len(flat))
        raise HTTPError(400, f"input '{name}': shape {shape} holds {expected} {datatype} elements "
                             f"but 'data' has {got}")
    for v in flat:
        if not _element_ok(datatype, v):
            raise HTTPError(400, f"input '{name}': element {short(v)} is not a valid {datatype} value")
    return name, datatype, flat


def parse_infer(body: Any, max_len: int, tail: bytes = b"") -> InferCall:
    """The encoder's one input: BYTES texts, at most MAX_TEXTS of them, each short enough to
    fit max_len tokens at CHARS_PER_TOKEN; all checked before anything is tokenized. `tail`:
    the binary data after the JSON header (kserve_binary.split_body)."""
    from device.serve.kserve_binary import resolve_inputs, wants_binary

    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HTTPError(400, "'inputs' must be a non-empty list of tensors")
    if len(inputs) != 1:  # the model declares one input: say so before looking at any of them
        raise HTTPError(400, f"this model takes one input '{INPUT_NAME}' (BYTES); got {len(inputs)} inputs")
    inputs = resolve_inputs(inputs, tail, MAX_TEXTS)  # binary inputs' elements as 'data'; checked below
    rid = body.get("id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > MAX_ID):
        raise HTTPError(400, f"'id' must be a string of at most {MAX_ID} characters")
    name, datatype, texts = tensor_values(inputs[0], "inputs[0]", MAX_TEXTS)
    if name != INPUT_NAME:
        raise HTTPError(400, f"this model takes one input '{INPUT_NAME}' (BYTES); got {[name]}")
    if datatype != "BYTES":
        raise HTTPError(400, f"input '{INPUT_NAME}' must be BYTES (text), got {datatype}")
    if not texts:
        raise HTTPError(400, f"input '{INPUT_NAME}' holds no text")
    limit = max_len * CHARS_PER_TOKEN
    for i, text in enumerate(texts):
        if len(text) > limit:
            raise HTTPError(400, f"text {i} has {len(text)} characters; this model reads at most "
                                 f"{max_len} tokens ({limit} characters, refused before tokenizing)")
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise HTTPError(400, "'outputs' must be a list of {name} objects")
        unknown = [short(o.get("name")) for o in outputs if o.get("name") != OUTPUT_NAME]
        if unknown:
            raise HTTPError(400, f"unknown output(s) {unknown[:4]}; this model has '{OUTPUT_NAME}'")
    return InferCall(rid, tuple(texts), wants_binary(body))


_TENSOR = {"type": "object", "required": ["name", "datatype", "shape"], "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": MAX_ID},
    "datatype": {"enum": list(DATATYPES)},
    "shape": {"type": "array", "maxItems": MAX_DIMS, "items": {"type": "integer", "minimum": 0}},
    "data": {"type": "array", "maxItems": MAX_TEXTS, "description": "row-major, nested or flat"},
    "parameters": {"type": "object", "properties": {"binary_data_size": {
        "type": "integer", "minimum": 0,
        "description": "binary tensor data extension: no 'data'; this many bytes of the body after "
                       "the JSON header (Inference-Header-Content-Length)"}}}},
    "description": "'data', or parameters.binary_data_size with the bytes after the JSON header"}


def infer_schema() -> dict[str, Any]:
    """The request of /v2/models/{m}/infer, with the bounds parse_infer enforces."""
    return {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string", "maxLength": MAX_ID},
        "parameters": {"type": "object", "properties": {"binary_data_output": {
            "type": "boolean", "description": "outputs in the binary tensor data extension"}}},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _TENSOR,
                   "description": f"this daemon's encoders take one BYTES input '{INPUT_NAME}' of "
                                  f"at most {MAX_TEXTS} texts"},
        "outputs": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "parameters": {"type": "object", "properties": {
                "binary_data": {"type": "boolean"}}}}}}}}


def infer_response(model: str, call: InferCall, embeddings: np.ndarray,
                   version: str = "1") -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": model, "model_version": version,
                           "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32",
                                        "shape": list(embeddings.shape),
                                        "data": embeddings.astype(np.float32).ravel().tolist()}]}
    if call.id is not None:
        out["id"] = call.id
    return out
