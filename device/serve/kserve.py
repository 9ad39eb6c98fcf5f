"""KServe / Open Inference Protocol v2 (REST) for the daemon's one model (protocols.md §1b).

Encoder bundles serve `infer`: a BYTES input of texts -> an FP32 output of pooled embeddings.

    POST /v2/models/minilm/infer
    {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]}
 -> {"model_name": "minilm", "outputs": [{"name": "embedding", "datatype": "FP32",
                                         "shape": [2, 384], "data": [...768 floats...]}]}

Every input is checked the way Triton does (shape x datatype against the data actually sent)
before anything runs; errors use the flat v2 body {"error": "..."}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from device.serve.httpd import HTTPError

INPUT_NAME = "text"
OUTPUT_NAME = "embedding"
PLATFORM = "onnx_onnxv1"  # the spec's platform string for ONNX models

_INT_RANGES = {"UINT8": (0, 2**8 - 1), "UINT16": (0, 2**16 - 1), "UINT32": (0, 2**32 - 1),
               "UINT64": (0, 2**64 - 1), "INT8": (-(2**7), 2**7 - 1), "INT16": (-(2**15), 2**15 - 1),
               "INT32": (-(2**31), 2**31 - 1), "INT64": (-(2**63), 2**63 - 1)}
DATATYPES = ("BOOL", *_INT_RANGES, "FP16", "FP32", "FP64", "BYTES")


def model_metadata(name: str, kind: str, hidden: int | None) -> dict[str, Any]:
    if kind == "encoder":
        inputs = [{"name": INPUT_NAME, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, hidden or -1]}]
    else:  # text generation is served on the OpenAI routes; listed here for discovery
        inputs = [{"name": "text_input", "datatype": "BYTES", "shape": [1]}]
        outputs = [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]
    return {"name": name, "versions": ["1"], "platform": PLATFORM, "inputs": inputs, "outputs": outputs}


@dataclass(frozen=True)
class InferCall:
    id: str | None
    texts: list[str]


def _element_ok(datatype: str, v: Any) -> bool:
    if datatype == "BYTES":
        return isinstance(v, str)
    if datatype == "BOOL":
        return isinstance(v, bool)
    if datatype.startswith("FP"):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    lo, hi = _INT_RANGES[datatype]
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def tensor_values(tensor: Any, where: str) -> tuple[str, str, list[Any]]:
    """Validate one request tensor -> (name, datatype, flat data): shape x datatype must
    account for exactly the elements sent, each of the right type."""
    if not isinstance(tensor, dict):
        raise HTTPError(400, f"{where} must be an object with name, datatype, shape, data")
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not name:
        raise HTTPError(400, f"{where}: 'name' must be a non-empty string")
    if datatype not in DATATYPES:
        raise HTTPError(400, f"input '{name}': unknown datatype {datatype!r}; one of {', '.join(DATATYPES)}")
    if (not isinstance(shape, list) or
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise HTTPError(400, f"input '{name}': 'shape' must be a list of non-negative integers")
    if "data" not in tensor:
        raise HTTPError(400, f"input '{name}': no 'data' (binary tensor data is not supported)")
    flat = _flatten(tensor["data"])
    expected = math.prod(shape)
    if len(flat) != expected:
        raise HTTPError(400, f"input '{name}': shape {shape} holds {expected} {datatype} elements "
                             f"but 'data' has {len(flat)}")
    for v in flat:
        if not _element_ok(datatype, v):
            raise HTTPError(400, f"input '{name}': element {v!r} is not a valid {datatype} value")
    return name, datatype, flat


def parse_infer(body: Any) -> InferCall:
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise HTTPError(400, "'inputs' must be a non-empty list of tensors")
    rid = body.get("id")
    if rid is not None and not isinstance(rid, str):
        raise HTTPError(400, "'id' must be a string")
    tensors = [tensor_values(t, f"inputs[{i}]") for i, t in enumerate(inputs)]
    names = [t[0] for t in tensors]
    if names != [INPUT_NAME]:
        raise HTTPError(400, f"this model takes one input '{INPUT_NAME}' (BYTES); got {names}")
    _, datatype, texts = tensors[0]
    if datatype != "BYTES":
        raise HTTPError(400, f"input '{INPUT_NAME}' must be BYTES (text), got {datatype}")
    if not texts:
        raise HTTPError(400, f"input '{INPUT_NAME}' holds no text")
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise HTTPError(400, "'outputs' must be a list of {name} objects")
        unknown = [o.get("name") for o in outputs if o.get("name") != OUTPUT_NAME]
        if unknown:
            raise HTTPError(400, f"unknown output(s) {unknown}; this model has '{OUTPUT_NAME}'")
    return InferCall(rid, texts)


def infer_response(model: str, call: InferCall, embeddings: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": model, "model_version": "1",
                           "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32",
                                        "shape": list(embeddings.shape),
                                        "data": embeddings.astype(np.float32).ravel().tolist()}]}
    if call.id is not None:
        out["id"] = call.id
    return out
