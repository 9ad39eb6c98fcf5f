"""The daemon's OpenAPI 3.1 document, built from the same field specs the request parsers use
(device/serve/fields.py, used by openai_api.py, kserve.py, bench_route.py), so the bounds published
here are the bounds enforced.

    GET /openapi.json                       the document (the daemon serves this exact text)
    python -m device.serve.openapi          print it; docs/openapi.json is this output, and
                                            tests/device/serve/test_validation.py checks it is current

One document for every daemon: the served model's id and context are not in it (`{name}` is any
string; max_tokens has its static cap and is cut to the room left in the cache at run time), so
the file in docs/ and the route agree. The deploy routes exist only with `toolkit serve --store`.
Over TCP every route needs `Authorization: Bearer <token>`; the Unix socket needs none.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from bundle import __version__
from device.serve import bench_route, kserve, openai_api
from device.serve.kserve_generate import generate_schema
from device.serve.response_schemas import SCHEMAS, event_stream, json_body

OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": "string"}}}}}
KSERVE_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
DEPLOY_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "properties": {"message": {"type": "string"}, "code": {"type": "string"}}}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _responses(ok: str, error: str, ok_type: str | dict[str, Any] = "application/json",
               codes: tuple[str, ...] = ("400", "404", "413", "503"), ok_code: str = "200") -> dict[str, Any]:
    """ok_type: the success answer's media type with no schema, "none" (no body), or media-type
    entries with their schemas (response_schemas.py); ok_code: its status (202: accepted, runs
    on)."""
    content = ok_type if isinstance(ok_type, dict) else {ok_type: {}}
    out: dict[str, Any] = {ok_code: {"description": ok}} if ok_type == "none" else {
        ok_code: {"description": ok, "content": content}}
    ref = {"$ref": f"#/components/schemas/{error}"}
    for code in codes:
        out[code] = {"description": _REASONS[code], **_json(ref)}
    out["401"] = {"description": "over TCP: missing or wrong bearer token",
                  **_json({"$ref": "#/components/schemas/OpenAIError"})}
    return out


_REASONS = {"400": "invalid request (a field's type or range, the context, the model's kind)",
            "404": "unknown model or upload", "409": "a gap in an upload", "411": "chunked body",
            "413": "body, or a tensor, over its limit", "422": "a chunk's CRC, or the bundle's hashes",
            "503": "loading, draining, switching bundles, or full (Retry-After)",
            "507": "no room for the bundle on the device"}


def _op(summary: str, responses: dict[str, Any], body: dict[str, Any] | None = None,
        params: list[dict[str, Any]] | None = None, tag: str = "openai") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": 1}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _v2_model_paths() -> dict[str, Any]:
    """/v2/models/{name}[/versions/{version}][/ready|/infer|/generate[_stream]]: the version
    segment is optional (protocols.md §1b), so every route appears twice."""
    out: dict[str, Any] = {}
    for base, params in (("/v2/models/{name}", [_path_param("name", r"^[^/]+$")]),
                         ("/v2/models/{name}/versions/{version}",
                          [_path_param("name", r"^[^/]+$"), _path_param("version", r"^[^/]+$")])):
        out[base] = {"get": _op("model metadata: inputs, outputs, platform",
                                _responses("metadata", "KServeError", json_body("ModelMetadata"),
                                           ("404", "503")),
                                params=params, tag="kserve")}
        out[base + "/ready"] = {"get": _op("200 when the model is ready (empty body)",
                                           _responses("ready", "KServeError", "none", ("404", "503")),
                                           params=params, tag="kserve")}
        out[base + "/infer"] = {"post": _op("encoder bundles: texts (BYTES) -> embeddings (FP32)",
                                            _responses("outputs", "KServeError", {
                                                **json_body("InferResponse"),
                                                "application/octet-stream": {}}), kserve.infer_schema(),
                                            params=params, tag="kserve")}
        out[base + "/generate"] = {"post": _op(
            "decoder bundles: Triton's generate extension, text_input -> text_output",
            _responses("text_output", "KServeError", json_body("GenerateResponse")), generate_schema(),
            params=params, tag="kserve")}
        out[base + "/generate_stream"] = {"post": _op(
            "decoder bundles: generate as server-sent events, one per text delta",
            _responses("events", "KServeError", event_stream("GenerateEvent", "KServeError")),
            generate_schema(),
            params=params, tag="kserve")}
    return out


def _deploy_paths() -> dict[str, Any]:
    from device.serve.deploy import PREFIX

    upload = [_path_param("upload_id", r"^[0-9a-f]{64}$")]
    codes = ("400", "404", "409", "413", "422", "503", "507")
    chunk_query = [{"name": n, "in": "query", "required": True, "schema": s} for n, s in (
        ("path", {"type": "string", "minLength": 1}), ("offset", {"type": "integer", "minimum": 0}),
        ("crc32", {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}))]
    return {
        f"{PREFIX}/hello": {"get": _op("device facts, limits and chunk sizes",
                                       _responses("hello", "DeployError", json_body("Hello"), ()),
                                       tag="deploy")},
        f"{PREFIX}/status": {"get": _op("the store: active, previous, uploads, the install",
                                        _responses("status", "DeployError", json_body("StoreStatus"), ()),
                                        tag="deploy")},
        f"{PREFIX}/uploads": {
            "post": _op("begin an upload: the body is the bundle's manifest.json",
                        _responses("upload state", "DeployError", json_body("UploadState"), codes),
                        {"type": "object"}, tag="deploy"),
            "get": _op("uploads in progress", _responses("uploads", "DeployError",
                                                         json_body("Uploads"), ()), tag="deploy")},
        f"{PREFIX}/uploads/remove": {"post": _op(
            "remove uploads in progress: these ids, all, or those idle at least older_than_s",
            _responses("the uploads removed", "DeployError", json_body("Uploads"), ("400", "503")),
            {"type": "object", "properties": {
                "ids": {"type": "array", "items": {"type": "string"}}, "all": {"type": "boolean"},
                "older_than_s": {"type": "number", "minimum": 0}}}, tag="deploy")},
        f"{PREFIX}/uploads/{{upload_id}}": {"put": {
            "summary": "one chunk of one file", "tags": ["deploy"],
            "parameters": upload + chunk_query,
            "requestBody": {"required": True, "content": {"application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}}}},
            "responses": _responses("bytes held", "DeployError", json_body("ChunkAck"), codes)}},
        # 202: the install runs in the background (an engine build takes minutes on a board);
        # the host follows it through status (host/transfer.py)
        f"{PREFIX}/uploads/{{upload_id}}/commit": {"post": _op(
            "verify, install, smoke-test and switch", _responses("install accepted", "DeployError",
                                                                 json_body("InstallAccepted"), codes,
                                                                 ok_code="202"),
            params=upload, tag="deploy")},
        f"{PREFIX}/rollback": {"post": _op("go back to the previous bundle",
                                           _responses("install accepted", "DeployError",
                                                      json_body("InstallAccepted"), codes, ok_code="202"),
                                           tag="deploy")},
    }


def document() -> dict[str, Any]:
    health = {"get": _op("liveness: 200 while the process answers",
                         _responses("alive", "OpenAIError", "none", ()), tag="health")}
    # server.ready answers 503 with the flat {"error": state} on every readiness route (the
    # KServeError shape), and 200 with an empty body on /v2/health/ready, as KServe's does
    ready = {"get": _op("readiness: 200 with a loaded bundle, else 503 and why",
                        _responses("ready", "KServeError", codes=("503",)), tag="health")}
    v2_ready = {"get": _op("readiness: 200 (empty body) with a loaded bundle, else 503 and why",
                           _responses("ready", "KServeError", "none", ("503",)), tag="kserve")}
    paths: dict[str, Any] = {
        "/v1/models": {"get": _op("the served model's card", _responses(
            "model list", "OpenAIError", json_body("ModelList"), ("503",)))},
        "/v1/models/{model}": {"get": _op("one model's card (OpenAI's retrieve); 404 for another id",
                                          _responses("model", "OpenAIError", json_body("ModelCard"),
                                                     ("404", "503")),
                                          params=[_path_param("model", r"^[^/]+$")])},
        "/v1/completions": {"post": _op("text completion (SSE with stream: true)",
                                        _responses("completion", "OpenAIError", {
                                            **json_body("Completion"),
                                            **event_stream("CompletionChunk", "OpenAIError")}),
                                        openai_api.completion_schema())},
        "/v1/chat/completions": {"post": _op("chat completion (SSE with stream: true)",
                                             _responses("chat completion", "OpenAIError", {
                                                 **json_body("ChatCompletion"),
                                                 **event_stream("ChatCompletionChunk", "OpenAIError")}),
                                             openai_api.chat_schema())},
        "/v1/embeddings": {"post": _op("embeddings of an encoder bundle",
                                       _responses("embeddings", "OpenAIError", json_body("Embeddings")),
                                       openai_api.embedding_schema())},
        "/v1/bench": {"post": _op("run the benchmark on the loaded engine; SSE progress events",
                                  _responses("SSE stream", "OpenAIError", "text/event-stream"),
                                  bench_route.settings_schema(), tag="bench")},
        "/v1/status": {"get": _op("state, bundle, memory, scheduler",
                                  _responses("status", "OpenAIError", json_body("Status"), ()),
                                  tag="status")},
        "/metrics": {"get": _op("Prometheus text format", _responses("metrics", "OpenAIError",
                                                                      "text/plain", ()), tag="status")},
        "/openapi.json": {"get": _op("this document", _responses("OpenAPI 3.1", "OpenAIError", codes=()),
                                     tag="status")},
        "/health": ready, "/health/ready": ready, "/health/live": health,
        "/v2/health/live": {"get": {**health["get"], "tags": ["kserve"]}},
        "/v2/health/ready": v2_ready,
        "/v2": {"get": _op("server metadata", _responses("metadata", "KServeError",
                                                          json_body("ServerMetadata"), ()),
                           tag="kserve")},
        **_v2_model_paths(),
        **_deploy_paths(),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "toolkit device daemon", "version": __version__,
                 "description": __doc__.split("\n\n")[0].replace("\n", " ")},
        "servers": [{"url": "http://127.0.0.1:8080", "description": "toolkit serve --tcp 8080"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "over TCP only; the Unix socket needs none"}},
            "schemas": {"OpenAIError": OPENAI_ERROR, "KServeError": KSERVE_ERROR,
                        "DeployError": DEPLOY_ERROR, **SCHEMAS}},
    }


def render() -> str:
    return json.dumps(document(), indent=2) + "\n"


@functools.lru_cache(maxsize=1)
def document_bytes() -> bytes:
    return render().encode()


if __name__ == "__main__":
    print(render(), end="")
