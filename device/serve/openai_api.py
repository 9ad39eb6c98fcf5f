"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/embeddings.

Request fields follow vLLM's (protocols.md §1a): max_tokens (or max_completion_tokens),
temperature, top_p, top_k and ignore_eos (vLLM extensions), seed, stop (string or list), stream,
stream_options.
Defaults when a field is omitted are vLLM's: temperature 1.0, top_p 1.0, top_k off; max_tokens 16
for completions and "the room left in the KV cache" for chat. A max_tokens beyond that room is
cut to it (finish_reason "length"); only a prompt that fills the cache is refused (400).

Validation order (§2.5): body size, JSON, field types and ranges, model name, then admission
(503 when full, before any tokenizing), then tokenize and check against the cache.
Fields we do not implement are refused when set to anything but their no-op value (n=2,
logprobs=true, ...), so a client never silently gets less than it asked for; unknown fields
are ignored, as vLLM does.
"""

from __future__ import annotations

import base64
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bundle.errors import ToolkitError
from device.runtime.sampling import SamplingParams
from device.runtime.tokenizer import BundleTokenizer
from device.serve.embedder import EmbeddingRequest
from device.serve.httpd import ClientGone, Handler, HTTPError, SSEStream
from device.serve.scheduler import (
    EVENT_POLL_S,
    Embedded,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    RequestHandle,
    RequestRejected,
    TextDelta,
)

PING_S = 15.0  # SSE comment interval on a silent stream
MAX_STOP = 4  # stop strings per request (TGI's default limit)
MAX_EMBED_INPUTS = 256
SEED_RANGE = (-(2**63), 2**64 - 1)

# field -> the values that mean "off"; anything else is refused as unsupported
NOOP_FIELDS: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "tools": (None, []), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
}


def openai_error(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 503: "server_overloaded"}.get(
        status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- field validation ------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(param: str, message: str) -> HTTPError:
    return HTTPError(400, f"'{param}': {message}", "invalid_value", param)


def opt_int(body: dict[str, Any], key: str, lo: int, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if not _is_int(v):
        raise _bad(key, f"expected an integer, got {type(v).__name__} {v!r}")
    if v < lo:
        raise _bad(key, f"must be at least {lo} (got {v})")
    return int(v)


def opt_float(body: dict[str, Any], key: str, default: float, lo: float, hi: float,
              lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not _is_num(v) or not math.isfinite(v):  # json.loads reads NaN and Infinity
        raise _bad(key, f"expected a finite number, got {type(v).__name__} {v!r}")
    if v < lo or v > hi or (lo_open and v == lo):
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}]" if hi != math.inf else f">= {lo:g}"
        raise _bad(key, f"must be {rng} (got {v})")
    return float(v)


def opt_bool(body: dict[str, Any], key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, f"expected true or false, got {v!r}")
    return v


def parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop sequences (got {len(stops)})")
    if any(s == "" for s in stops):
        raise _bad("stop", "stop sequences must not be empty")
    return tuple(stops)


def parse_sampling(body: dict[str, Any]) -> SamplingParams:
    top_k = opt_int(body, "top_k", -1, 0) or 0
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise _bad("seed", f"expected a 64-bit integer, got {seed!r}")
    return SamplingParams(temperature=opt_float(body, "temperature", 1.0, 0.0, math.inf),
                          top_k=max(top_k, 0), top_p=opt_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                          seed=None if seed is None else seed % 2**64)  # numpy wants seed >= 0


def check_noop_fields(body: dict[str, Any]) -> None:
    for key, noop in NOOP_FIELDS.items():
        if key in body and body[key] not in noop:
            raise HTTPError(400, f"'{key}'={body[key]!r} is not supported by this daemon",
                            "unsupported_parameter", key)


def require_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise HTTPError(400, f"the request body must be a JSON object, got {type(body).__name__}",
                        "invalid_type")
    return body


# --- requests --------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationCall:
    """A validated /v1/completions or /v1/chat/completions request, not yet tokenized."""

    chat: bool
    tokenize: Callable[[BundleTokenizer], list[int]]
    max_tokens: int | None  # None: the room left in the cache
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False


def parse_generation(body: Any, chat: bool) -> GenerationCall:
    body = require_object(body)
    check_noop_fields(body)
    tokenize = _chat_prompt(body) if chat else _completion_prompt(body)
    max_tokens = opt_int(body, "max_completion_tokens", 1, None)
    max_tokens = opt_int(body, "max_tokens", 1, max_tokens if max_tokens else (None if chat else 16))
    stream = opt_bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise _bad("stream_options", "only allowed when stream is true")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "expected an object")
    include_usage = opt_bool(options or {}, "include_usage", False)
    return GenerationCall(chat, tokenize, max_tokens, parse_sampling(body), parse_stop(body),
                          stream, include_usage, opt_bool(body, "ignore_eos", False))


def _message_text(i: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # OpenAI content parts: only text parts can be served
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", f"expected a string or a list of parts, got {content!r}")


def _chat_prompt(body: dict[str, Any]) -> Callable[[BundleTokenizer], list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "expected a non-empty list of {role, content} objects")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "expected an object with a string 'role'")
        clean.append({"role": m["role"], "content": _message_text(i, m.get("content"))})

    def tokenize(tokenizer: BundleTokenizer) -> list[int]:
        from jinja2 import TemplateError

        try:
            return tokenizer.encode_chat(clean)
        except ToolkitError as e:  # no template, or the template's raise_exception
            raise HTTPError(400, e.message + (f" ({e.hint})" if e.hint else ""),
                            "chat_template", "messages") from e
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            # what a template's own logic raises on a conversation it does not accept
            raise HTTPError(400, f"the chat template could not render these messages: {e}",
                            "chat_template", "messages") from e

    return tokenize


def _completion_prompt(body: dict[str, Any]) -> Callable[[BundleTokenizer], list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return lambda tokenizer: tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        ids = [int(t) for t in prompt]
        return lambda tokenizer: _check_ids(ids, tokenizer)
    raise _bad("prompt", "expected a string or a list of token ids (one prompt per request)")


def _check_ids(ids: list[int], tokenizer: BundleTokenizer) -> list[int]:
    vocab = tokenizer.tok.get_vocab_size()
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise _bad("prompt", f"token ids must be in [0, {vocab}); got {bad[:5]}")
    return ids


# --- running a generation --------------------------------------------------------------------

def next_event(h: Handler, handle: RequestHandle, sse: SSEStream | None = None) -> Event:
    """Wait for the engine's next event, noticing a client that went away meanwhile."""
    while True:
        event = handle.next_event(EVENT_POLL_S)
        if event is not None:
            return event
        if h.client_gone():
            raise ClientGone()
        if sse is not None and time.monotonic() - sse.last_write > PING_S:
            sse.ping()


@dataclass
class Reply:
    """What the response objects share: id, created, model."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model)


def serve_generation(h: Handler, engine: Any, tokenizer: BundleTokenizer, model: str,
                     call: GenerationCall) -> None:
    with engine.reserve() as ticket:  # 503 before any tokenizing when the daemon is full
        prompt = call.tokenize(tokenizer)
        room = engine.check_prompt(len(prompt), "messages" if call.chat else "prompt")
        max_tokens = min(call.max_tokens or room, room)
        handle = engine.submit(ticket, GenerationRequest(prompt, max_tokens, call.params, call.stop,
                                                         call.ignore_eos))
    reply = Reply.new("chatcmpl" if call.chat else "cmpl", model)
    try:
        if call.stream:
            _stream(h, handle, reply, call)
        else:
            _collect(h, handle, reply, call)
    finally:
        handle.cancel()  # no-op when it finished; frees the slot when we leave early


def _collect(h: Handler, handle: RequestHandle, reply: Reply, call: GenerationCall) -> None:
    text = []
    while True:
        event = next_event(h, handle)
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Failed):
            raise RequestRejected(event.status, event.code, event.message)
        elif isinstance(event, Finished):
            break
    content = "".join(text)
    choice: dict[str, Any] = ({"index": 0, "message": {"role": "assistant", "content": content}}
                              if call.chat else {"index": 0, "text": content})
    choice.update(logprobs=None, finish_reason=event.finish_reason, stop_reason=event.stop_reason)
    h.send_json(200, {"id": reply.id, "object": "chat.completion" if call.chat else "text_completion",
                      "created": reply.created, "model": reply.model, "choices": [choice],
                      "usage": event.usage.to_json(), "timings": event.timings.to_json()})


def _stream(h: Handler, handle: RequestHandle, reply: Reply, call: GenerationCall) -> None:
    obj = "chat.completion.chunk" if call.chat else "text_completion"

    def chunk(delta: str | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice: dict[str, Any] = ({"index": 0, "delta": {} if delta is None else {"content": delta}}
                                  if call.chat else {"index": 0, "text": delta or ""})
        choice.update(logprobs=None, finish_reason=finish, **extra)
        out = {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model,
               "choices": [choice]}
        if call.include_usage:
            out["usage"] = None
        return out

    sse, event = _open_stream(h, handle)
    if call.chat:
        first = chunk(None)
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        sse.send(first)
    while True:
        if isinstance(event, TextDelta):
            sse.send(chunk(event.text))
        elif isinstance(event, Failed):  # mid-stream: the status is sent, so an error event
            sse.send(openai_error(event.status, event.message, event.code))
            break
        elif isinstance(event, Finished):
            sse.send(chunk(None, event.finish_reason, stop_reason=event.stop_reason))
            if call.include_usage:
                sse.send({"id": reply.id, "object": obj, "created": reply.created,
                          "model": reply.model, "choices": [], "usage": event.usage.to_json(),
                          "timings": event.timings.to_json()})
            break
        event = next_event(h, handle, sse)
    sse.done()


def _open_stream(h: Handler, handle: RequestHandle) -> tuple[SSEStream, Event]:
    """Headers wait for the first event, so a request refused while queued (at drain) still
    gets a real status code; a long wait in the queue starts the stream and pings instead."""
    started = time.monotonic()
    while True:
        event = handle.next_event(EVENT_POLL_S)
        if isinstance(event, Failed):
            raise RequestRejected(event.status, event.code, event.message)
        if event is not None:
            return h.start_sse(), event
        if h.client_gone():
            raise ClientGone()
        if time.monotonic() - started > PING_S:
            sse = h.start_sse()
            sse.ping()
            return sse, next_event(h, handle, sse)


# --- embeddings ------------------------------------------------------------------------------

def parse_embedding_inputs(body: Any, tokenizer: BundleTokenizer, max_len: int) -> list[list[int]]:
    body = require_object(body)
    if body.get("dimensions") is not None:
        raise HTTPError(400, "'dimensions' is not supported", "unsupported_parameter", "dimensions")
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_int(t) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise _bad("input", "expected a string, a list of strings, or token id list(s)")
    if len(raw) > MAX_EMBED_INPUTS:
        raise _bad("input", f"at most {MAX_EMBED_INPUTS} inputs per request (got {len(raw)})")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and item and all(_is_int(t) for t in item):
            ids = _check_ids([int(t) for t in item], tokenizer)
        else:
            raise _bad(f"input[{i}]", "expected a string or a non-empty list of token ids")
        if len(ids) > max_len:
            raise HTTPError(400, f"input[{i}] has {len(ids)} tokens; this model reads at most "
                                 f"{max_len}", "context_length_exceeded", "input")
        out.append(ids)
    return out


def run_embedding(h: Handler, engine: Any, inputs: list[list[int]]) -> Embedded:
    with engine.reserve() as ticket:
        handle = engine.submit(ticket, EmbeddingRequest(inputs))
    try:
        event = next_event(h, handle)
    finally:
        handle.cancel()
    if isinstance(event, Failed):
        raise RequestRejected(event.status, event.code, event.message)
    assert isinstance(event, Embedded)
    return event


def embedding_response(result: Embedded, model: str, encoding: str) -> dict[str, Any]:
    def encode(vec: np.ndarray) -> Any:
        if encoding == "base64":  # little-endian float32, what the openai client decodes
            return base64.b64encode(vec.astype("<f4").tobytes()).decode()
        return vec.tolist()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                     for i, v in enumerate(result.embeddings)],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}}
