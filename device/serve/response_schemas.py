"""JSON Schemas of the daemon's 200 answers, for its OpenAPI document (device/serve/openapi.py).

The request side is generated from the parsers' field specs (fields.py); the answers are built
by plain dict literals in openai_api.py, server.py, kserve.py and kserve_generate.py, so these
are written out here, once, and tests/device/serve/test_response_schemas.py holds them to what a
real daemon sends: each object closed (`additionalProperties: false`), so a field added to an
answer and not here fails that test. Streams (text/event-stream) carry one JSON object per
event's `data:`; OpenAPI 3.1 has no place for that, so the media type names the event's schema
under `x-event-data` (OpenAPI 3.2's `itemSchema` says the same).

Where the daemon's answers follow OpenAI's or KServe's, so do the names; the additions are
llama-server's `timings`, vLLM's `stop_reason`, and the model card's `meta`. The deploy routes'
answers are the store's records (device/store/store.py, device/serve/deploy.py) as `asdict` sends
them, so their schemas are generated from those records (bundle/records.py `record_schema`), and
a field added to a record is in the document at once; what the answers add to a record is written
here. Not described (the 200 names its media type only): /v1/bench's progress events; /metrics
(Prometheus text).
"""

from __future__ import annotations

from typing import Any

from bundle.manifest import TargetRecord
from bundle.records import record_schema
from device.serve.deploy import PROTOCOL, DeviceFacts
from device.store.store import ChunkAck, InstallResult, StoreLimits, StoreStatus, UploadInfo, UploadState


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object: every property required but the optional ones, nothing else allowed."""
    return {"type": "object", "required": [k for k in props if k not in optional],
            "properties": props, "additionalProperties": False}


def _array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


STR, INT, NUM = {"type": "string"}, {"type": "integer"}, {"type": "number"}
COUNT = {"type": "integer", "minimum": 0}
NULL = {"type": "null"}
FINISH = {"enum": ["stop", "length", "tool_calls", "abort"],
          "description": "abort: the daemon stopped or switched bundles mid-answer (its text so far stands)"}
STOP_REASON = {"type": ["string", "integer", "null"],
               "description": "the stop string or stop token id when finish_reason is stop (vLLM's name)"}

USAGE = _obj({"prompt_tokens": COUNT, "completion_tokens": COUNT, "total_tokens": COUNT,
              "completion_tokens_details": _obj({"accepted_prediction_tokens": COUNT,
                                                 "rejected_prediction_tokens": COUNT})},
             optional=("completion_tokens_details",))
USAGE["description"] = ("completion_tokens_details: only when prompt-lookup drafting ran; its "
                        "draft tokens verified and kept / thrown away")

TIMINGS = _obj({"queue_ms": NUM, "ttft_ms": NUM, "prompt_n": COUNT, "prompt_ms": NUM,
                "prompt_per_second": NUM, "predicted_n": COUNT, "predicted_ms": NUM,
                "predicted_per_token_ms": NUM, "predicted_per_second": NUM,
                "draft_n": COUNT, "draft_n_accepted": COUNT}, optional=("draft_n", "draft_n_accepted"))
TIMINGS["description"] = "per request, llama-server's names (the first choice's, with n > 1)"

COMPLETION_LOGPROBS = _obj({"tokens": _array(STR), "token_logprobs": _array(NUM),
                            "top_logprobs": _array({"type": "object", "additionalProperties": NUM}),
                            "text_offset": _array(COUNT)})
_TOKEN_LOGPROB = {"token": STR, "logprob": NUM, "bytes": {"type": ["array", "null"], "items": COUNT}}
CHAT_LOGPROBS = _obj({"content": _array(_obj({**_TOKEN_LOGPROB,
                                               "top_logprobs": _array(_obj(_TOKEN_LOGPROB))})),
                      "refusal": NULL})
TOOL_CALL = _obj({"id": STR, "type": {"const": "function"},
                  "function": _obj({"name": STR, "arguments": {
                      "type": "string", "description": "the arguments as a JSON text"}})})

_HEAD = {"id": STR, "created": INT, "model": STR}


def _completion(chunk: bool) -> dict[str, Any]:
    choice = _obj({"index": COUNT, "text": STR, "logprobs": {"anyOf": [_ref("CompletionLogprobs"), NULL]},
                   "finish_reason": {"anyOf": [FINISH, NULL]} if chunk else FINISH,
                   "stop_reason": STOP_REASON}, optional=("stop_reason",) if chunk else ())
    return _answer({"const": "text_completion"}, choice, chunk)


def _chat(chunk: bool) -> dict[str, Any]:
    if chunk:
        delta = _obj({"role": {"const": "assistant"}, "content": STR,
                      "tool_calls": _array({**TOOL_CALL, "required": [*TOOL_CALL["required"], "index"],
                                            "properties": {**TOOL_CALL["properties"], "index": COUNT}})},
                     optional=("role", "content", "tool_calls"))
        choice = _obj({"index": COUNT, "delta": delta,
                       "logprobs": {"anyOf": [_ref("ChatLogprobs"), NULL]},
                       "finish_reason": {"anyOf": [FINISH, NULL]}, "stop_reason": STOP_REASON},
                      optional=("stop_reason",))
        return _answer({"const": "chat.completion.chunk"}, choice, chunk)
    message = _obj({"role": {"const": "assistant"}, "content": {"type": ["string", "null"]},
                    "refusal": NULL, "tool_calls": _array(_ref("ToolCall"))}, optional=("tool_calls",))
    choice = _obj({"index": COUNT, "message": message,
                   "logprobs": {"anyOf": [_ref("ChatLogprobs"), NULL]},
                   "finish_reason": FINISH, "stop_reason": STOP_REASON})
    return _answer({"const": "chat.completion"}, choice, chunk)


def _answer(kind: dict[str, Any], choice: dict[str, Any], chunk: bool) -> dict[str, Any]:
    if not chunk:
        return _obj({**_HEAD, "object": kind, "choices": _array(choice), "usage": _ref("Usage"),
                     "timings": _ref("Timings")})
    out = _obj({**_HEAD, "object": kind, "choices": _array(choice),
                "usage": {"anyOf": [_ref("Usage"), NULL]}, "timings": _ref("Timings")},
               optional=("usage", "timings"))
    out["description"] = ("one event of the stream; with stream_options.include_usage every event "
                          "has usage (null), and a last one with no choices has usage and timings; "
                          "the stream ends with `data: [DONE]`")
    return out


MODEL_CARD = _obj({"id": STR, "object": {"const": "model"}, "created": INT, "owned_by": STR,
                   "max_model_len": {"type": ["integer", "null"]},
                   "meta": _obj({"kind": {"enum": ["decoder", "encoder"]}, "precision": STR,
                                 "target": STR, "source_sha256": STR, "manifest_sha256": STR,
                                 "defaults": {"type": "object",
                                              "description": "the sampling defaults a request gets"}})})
EMBEDDINGS = _obj({"object": {"const": "list"}, "model": STR,
                   "data": _array(_obj({"object": {"const": "embedding"}, "index": COUNT,
                                        "embedding": {"oneOf": [_array(NUM), {
                                            "type": "string", "description": "encoding_format base64: "
                                            "little-endian float32"}]}})),
                   "usage": _obj({"prompt_tokens": COUNT, "total_tokens": COUNT})})
STATUS = {"type": "object", "required": ["state", "pid", "version", "uptime_s"],
          "description": "diagnostics: the sections follow the loaded bundle's kind and target; "
                         "`toolkit status` prints them",
          "properties": {"state": STR, "pid": INT, "version": STR, "uptime_s": NUM,
                         **{k: {"type": ["object", "null"]} for k in (
                             "bundle", "memory", "target", "backend", "scheduler", "prefix_cache")}}}

_TENSOR_META = _obj({"name": STR, "datatype": STR, "shape": _array(INT)})
V2_SERVER = _obj({"name": STR, "version": STR, "extensions": _array(STR)})
V2_MODEL = _obj({"name": STR, "versions": _array(STR), "platform": STR,
                 "inputs": _array(_TENSOR_META), "outputs": _array(_TENSOR_META)})
V2_INFER = _obj({"model_name": STR, "model_version": STR, "id": STR,
                 "outputs": _array(_obj({"name": STR, "datatype": STR, "shape": _array(INT),
                                         "data": _array(NUM)}))}, optional=("id",))
V2_INFER["description"] = ("JSON outputs; with binary_data the body is this header (outputs with "
                           "parameters.binary_data_size, no data) followed by the raw tensors")
_GENERATE = {"model_name": STR, "model_version": STR, "text_output": STR, "finish_reason": FINISH}
V2_GENERATE = _obj(_GENERATE)
V2_GENERATE_EVENT = _obj(_GENERATE, optional=("finish_reason",))
V2_GENERATE_EVENT["description"] = ("one event per text delta; the last has finish_reason and "
                                    "empty text_output (no [DONE])")


def _deploy() -> dict[str, dict[str, Any]]:
    """The deploy routes' answers: the records, closed, plus what store.to_json, InstallJob.to_json
    and DeployService.hello put around them."""
    defs: dict[str, Any] = {}
    for record in (DeviceFacts, StoreLimits, TargetRecord, UploadState, ChunkAck, InstallResult,
                   StoreStatus, UploadInfo):
        record_schema(record, defs, "#/components/schemas/", sent=True)
    for name, added in (("UploadState", {"total_bytes": COUNT, "held_bytes": COUNT}),
                        ("ChunkAck", {"complete": {"type": "boolean", "description": "held == size"}})):
        defs[name]["properties"].update(added)
        defs[name]["required"] += list(added)
    # StoreStatus.install is the running or last install's job record (jobs.InstallJob.to_json)
    defs["StoreStatus"]["properties"]["install"] = {"anyOf": [_ref("InstallJob"), NULL]}
    job = {"job": STR, "op": {"enum": ["commit", "rollback"]}, "upload_id": {"type": ["string", "null"]},
           "phase": STR, "state": {"enum": ["running", "done", "failed"]}, "elapsed_s": NUM,
           "phase_s": NUM, "phases": _array(_obj({"phase": STR, "seconds": NUM})),
           "result": {"anyOf": [_ref("InstallResult"), NULL]},
           "error": {"anyOf": [{"type": "object", "required": ["status", "code", "message", "hint"],
                                "properties": {"status": INT, "code": STR, "message": STR,
                                               "hint": {"type": ["string", "null"]}},
                                "description": "and the error's own fields (StoreError.extra)"}, NULL]}}
    defs["InstallJob"] = _obj(job)
    defs["InstallJob"]["description"] = ("an install (commit or rollback): the host polls "
                                         "/v1/deploy/status until its state is done or failed")
    defs["InstallAccepted"] = _obj({"accepted": {"const": True}, **job})
    defs["InstallAccepted"]["description"] = "202: the install runs in the background; `job` names it"
    hello = _obj({"protocol": {"const": PROTOCOL}, "facts": _ref("DeviceFacts"),
                  "active": {"anyOf": [_ref("BundleRef"), NULL]},
                  "previous": {"anyOf": [_ref("BundleRef"), NULL]},
                  "target": {"anyOf": [_ref("TargetRecord"), NULL],
                             "description": "the active bundle's target record"},
                  "limits": _ref("StoreLimits"),
                  "chunk": _obj({"http": COUNT, "serial": COUNT}),
                  # the daemon's own fields (server.deploy_info); `toolkit serve --store` has them
                  "state": STR, "backend": {"type": ["object", "null"]},
                  "serving": {"type": ["string", "null"]}},
                 optional=("state", "backend", "serving"))
    hello["description"] = "device facts, limits and chunk sizes: what the host checks before a byte"
    defs["Hello"] = hello
    defs["Uploads"] = _array(_ref("UploadInfo"))
    return defs


SCHEMAS: dict[str, dict[str, Any]] = {
    "Usage": USAGE, "Timings": TIMINGS, "CompletionLogprobs": COMPLETION_LOGPROBS,
    "ChatLogprobs": CHAT_LOGPROBS, "ToolCall": TOOL_CALL,
    "Completion": _completion(chunk=False), "CompletionChunk": _completion(chunk=True),
    "ChatCompletion": _chat(chunk=False), "ChatCompletionChunk": _chat(chunk=True),
    "ModelCard": MODEL_CARD,
    "ModelList": _obj({"object": {"const": "list"}, "data": _array(_ref("ModelCard"))}),
    "Embeddings": EMBEDDINGS, "Status": STATUS,
    "ServerMetadata": V2_SERVER, "ModelMetadata": V2_MODEL, "InferResponse": V2_INFER,
    "GenerateResponse": V2_GENERATE, "GenerateEvent": V2_GENERATE_EVENT, **_deploy(),
}


def json_body(name: str) -> dict[str, Any]:
    """A 200 media-type entry: application/json with the named schema."""
    return {"application/json": {"schema": _ref(name)}}


def event_stream(name: str, error: str) -> dict[str, Any]:
    """A 200 media-type entry: server-sent events whose data is the named schema (or the route
    family's error object, sent when a request fails after its stream started)."""
    return {"text/event-stream": {"schema": {"type": "string"},
                                  "x-event-data": {"oneOf": [_ref(name), _ref(error)]}}}
