"""Triton's generate extension on decoder bundles: text in, text out, over KServe v2's paths.

    POST /v2/models/{m}/generate
    {"text_input": "The capital of France is", "max_tokens": 16, "temperature": 0}
 -> {"model_name": "smollm2-135m", "model_version": "1",
     "text_output": "The capital of France is Paris...", "finish_reason": "length"}
    POST /v2/models/{m}/generate_stream     (the same body)
 -> data: {"model_name": ..., "model_version": "1", "text_output": "The capital of France is"}
    data: {..., "text_output": " Paris"} ... (server-sent events, one per text delta; no [DONE])

As Triton's vLLM and TensorRT-LLM backends take them, the sampling fields may sit at the top
level or inside "parameters" (the top level wins): max_tokens (default 16), temperature, top_p,
top_k, seed, stop (a string or a list), ignore_eos, presence_penalty, frequency_penalty, and
exclude_input_in_output (default false: text_output begins with text_input, as those backends
answer; a stream sends the prompt as its first event). "stream" must match the route. The prompt
is the plain text (no chat template), tokenized as /v1/completions does. Bounds are the OpenAI
routes' own (device/serve/openai_api.py); errors are KServe's flat {"error": "..."} (a stream
that already started ends with one such event).
"""

from __future__ import annotations

from typing import Any

from device.runtime.tokenizer import BundleTokenizer
from device.serve.fields import BoolField, IntField, StrField, bad
from device.serve.httpd import Handler, HTTPError
from device.serve.openai_api import (
    FREQUENCY_PENALTY,
    IGNORE_EOS,
    MAX_TOKENS,
    PRESENCE_PENALTY,
    SEED,
    STOP_SCHEMA,
    TEMPERATURE,
    TOP_K,
    TOP_P,
    check_prompt_chars,
    next_event,
    open_stream,
    parse_sampling,
    parse_stop,
)
from device.serve.scheduler import Failed, Finished, GenerationRequest, RequestRejected, TextDelta

MAX_TOKENS_FIELD = IntField("max_tokens", 1, MAX_TOKENS, 16, doc="tokens to generate (default 16)")
EXCLUDE_INPUT = BoolField("exclude_input_in_output", doc="text_output without text_input")
STREAM = BoolField("stream", doc="must match the route: true on generate_stream only")
TEXT_INPUT = StrField("text_input", max_len=1 << 22, doc="the prompt, as plain text")
FIELDS = (MAX_TOKENS_FIELD, TEMPERATURE, TOP_P, TOP_K, SEED, IGNORE_EOS, PRESENCE_PENALTY,
          FREQUENCY_PENALTY, EXCLUDE_INPUT, STREAM)


def generate_schema() -> dict[str, Any]:
    fields: dict[str, Any] = {"stop": STOP_SCHEMA, **{f.name: f.schema() for f in FIELDS}}
    params = {"type": "object", "properties": fields,
              "description": "the same fields, as Triton's backends also take them"}
    return {"type": "object", "required": ["text_input"], "properties": {
        "text_input": {"type": "string"}, **fields, "parameters": params}}


def _merged(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object with 'text_input'")
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise bad("parameters", "expected an object")
    return {**(params or {}), **{k: v for k, v in body.items() if k != "parameters"}}


def serve_generate(h: Handler, engine: Any, tokenizer: BundleTokenizer, model: str, version: str,
                   body: Any, stream: bool) -> None:
    fields = _merged(body)
    text = TEXT_INPUT.read(fields)
    if text is None:
        raise bad("text_input", "required: the prompt text")
    if STREAM.read(fields) != stream and fields.get("stream") is not None:
        raise bad("stream", "use /generate_stream for a stream and /generate for one answer")
    max_tokens = MAX_TOKENS_FIELD.read(fields) or 16
    params, stop = parse_sampling(fields), parse_stop(fields)
    echo = not EXCLUDE_INPUT.read(fields)
    check_prompt_chars(len(text), engine.max_seq, "text_input")
    with engine.reserve() as ticket:  # 503 before any tokenizing when the daemon is full
        prompt = tokenizer.encode(text)
        room = engine.check_prompt(len(prompt), "text_input")
        handle = engine.submit(ticket, GenerationRequest(prompt, min(max_tokens, room), params, stop,
                                                         IGNORE_EOS.read(fields)))
    head = {"model_name": model, "model_version": version}
    try:
        if not stream:
            parts = [text] if echo else []
            while True:
                event = next_event(h, handle)
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Failed):
                    raise RequestRejected(event.status, event.code, event.message)
                elif isinstance(event, Finished):
                    break
            h.send_json(200, {**head, "text_output": "".join(parts),
                              "finish_reason": event.finish_reason})
            return
        sse, event = open_stream(h, handle)
        if echo:
            sse.send({**head, "text_output": text})
        while True:
            if isinstance(event, TextDelta):
                sse.send({**head, "text_output": event.text})
            elif isinstance(event, Failed):
                sse.send({"error": event.message})
                break
            elif isinstance(event, Finished):
                sse.send({**head, "text_output": "", "finish_reason": event.finish_reason})
                break
            event = next_event(h, handle, sse)
        sse.close()
    finally:
        handle.cancel()  # no-op when it finished; frees the slot when we leave early
