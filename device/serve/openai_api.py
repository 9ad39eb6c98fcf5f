"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/embeddings.

Request fields follow vLLM's (protocols.md §1a): max_tokens (or max_completion_tokens),
temperature, top_p, top_k and ignore_eos (vLLM extensions), seed, stop (string or list), stream,
stream_options.
Defaults when a field is omitted are vLLM's: temperature 1.0, top_p 1.0, top_k off; max_tokens 16
for completions and "the room left in the KV cache" for chat. A max_tokens beyond that room is
cut to it (finish_reason "length"); only a prompt that fills the cache is refused (400).

Validation order (§2.5): body size, JSON (device/serve/validate.py: depth, UTF-8, no
NaN/Infinity), field types and ranges, model name, a prompt's length in characters against the
context, then admission (503 when full, before any tokenizing), then tokenize and check against
the cache. The field specs below are also the OpenAPI document's schemas (device/serve/openapi.py).
Ranges: temperature 0 (greedy) or in [1e-3, 100] (between 0 and 1e-3 is refused, not rounded:
the client meant something, and 1e-320 divided logits into inf - inf); top_p in (0, 1]; top_k
>= -1 (0 and -1 are off); seed an int64; max_tokens in [1, 2**20], then cut to the room left;
at most 4 stop strings of 1..256 characters, 1024 messages, 2**17 prompt token ids.
presence_penalty / frequency_penalty in [-2, 2] as OpenAI defines them (over the generated
tokens, as vLLM applies them). logprobs: chat's bool + top_logprobs 0..20, completions' int 0..5
(device/serve/logprobs.py). n: up to the engine's slots, the choices decoding side by side (seed + i
for choice i). response_format, tools and tool_choice: device/serve/structured.py (constrained
decoding, the optional `structured` extra).
Fields we do not implement are refused when set to anything but their no-op value (best_of=2,
logit_bias, echo, suffix), so a client never silently gets less than it asked for; unknown fields
are ignored, as vLLM does.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bundle.errors import ToolkitError
from device.runtime.sampling import SamplingParams, TokenLogprob
from device.runtime.tokenizer import BundleTokenizer
from device.serve.embedder import EmbeddingRequest
from device.serve.fields import (
    CHARS_PER_TOKEN,
    MAX_STRING,
    BoolField,
    FloatField,
    IntField,
    OffField,
    StrField,
    bad,
    is_int,
    object_schema,
    short,
)
from device.serve.httpd import ClientGone, Handler, HTTPError, SSEStream
from device.serve.logprobs import LogprobFormatter
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
    Usage,
)
from device.serve.structured import (
    PARALLEL_TOOL_CALLS_SCHEMA,
    RESPONSE_FORMAT_SCHEMA,
    TOOL_CHOICE_SCHEMA,
    TOOLS_SCHEMA,
    StructuredPlan,
    compile_constraint,
    parse_structured,
    tools_system_prompt,
)

PING_S = 15.0  # SSE comment interval on a silent stream
MULTI_POLL_S = 0.01  # with n > 1, how long a stream waits on one choice before the next
MAX_N = 64  # choices per request, a sanity cap; the real bound is the daemon's slots (400 past it)
MAX_STOP = 4  # stop strings per request (TGI's default limit)
MAX_EMBED_INPUTS = 256
MAX_MESSAGES = 1024  # chat turns per request; every turn is at least a token of template
MAX_PARTS = 64  # text content parts per message
MAX_PROMPT_IDS = 1 << 17  # token ids in a completions prompt (a 128k context)
MAX_TOKENS = 1 << 20  # a sanity cap; the real bound is the room left in the cache (cut to it)
MIN_TEMPERATURE = 1e-3  # below this (but > 0) is refused: use 0 for greedy
MAX_TEMPERATURE = 100.0  # at 100 the distribution is all but uniform already

# --- fields: one typed description for the parsers below and for openapi.py ------------------

MAX_TOKENS_FIELD = IntField("max_tokens", 1, MAX_TOKENS, doc=(
    "tokens to generate; cut to the room left in the KV cache (finish_reason 'length'); default "
    "16 for completions, the room left for chat"))
MAX_COMPLETION_TOKENS = IntField("max_completion_tokens", 1, MAX_TOKENS, doc="max_tokens' newer name")
TEMPERATURE = FloatField("temperature", MIN_TEMPERATURE, MAX_TEMPERATURE, 1.0, zero_ok=True, doc=(
    f"0 for greedy, else in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]: a temperature closer "
    "to 0 than that is greedy in all but name and divides logits into overflow"))
TOP_P = FloatField("top_p", 0.0, 1.0, 1.0, lo_open=True, doc="nucleus sampling mass; 1 is off")
TOP_K = IntField("top_k", -1, 1 << 20, 0, doc="keep the k likeliest tokens; 0 or -1 (vLLM) is off")
# int64, as vLLM bounds it; a negative seed is used modulo 2**64 (numpy wants seed >= 0)
SEED = IntField("seed", -(2**63), 2**63 - 1, doc="per-request RNG seed (int64)")
PRESENCE_PENALTY = FloatField("presence_penalty", -2.0, 2.0, 0.0, doc=(
    "subtracted from the logit of every token already generated"))
FREQUENCY_PENALTY = FloatField("frequency_penalty", -2.0, 2.0, 0.0, doc=(
    "subtracted from a token's logit once per time it was already generated"))
STREAM = BoolField("stream", doc="server-sent events, ending in data: [DONE]")
IGNORE_EOS = BoolField("ignore_eos", doc="vLLM extension: run to max_tokens past EOS")
INCLUDE_USAGE = BoolField("include_usage", doc="one extra chunk with the request's usage")
MODEL = StrField("model", doc="the served model's id (optional: the daemon serves one)")
USER = StrField("user", doc="ignored")
ENCODING_FORMAT = StrField("encoding_format", choices=("float", "base64"), default="float")
# fields we do not implement, accepted at their no-op value only
# logprobs: a boolean on chat (with top_logprobs 0..20), a count 0..5 on completions (OpenAI's)
CHAT_LOGPROBS = BoolField("logprobs", doc="each output token's log-probability under the model")
TOP_LOGPROBS = IntField("top_logprobs", 0, 20, doc="the k likeliest tokens at each step (needs logprobs)")
COMPLETION_LOGPROBS = IntField("logprobs", 0, 5, doc=(
    "each output token's log-probability, and this many likeliest tokens at each step"))
NO_TOP_LOGPROBS = OffField("top_logprobs", (0,), doc="chat only; completions take logprobs: k")
OFF_FIELDS = (
    OffField("best_of", (1,)), OffField("echo", (False,)),
    OffField("logit_bias", ({},)),
    OffField("suffix", ("",)),
)
N = IntField("n", 1, MAX_N, 1, doc=(
    "choices to generate, side by side (at most the daemon's KV slots); with a seed, choice i "
    "samples with seed + i"))
GENERATION_FIELDS = (MODEL, N, MAX_TOKENS_FIELD, MAX_COMPLETION_TOKENS, TEMPERATURE, TOP_P, TOP_K,
                     SEED, PRESENCE_PENALTY, FREQUENCY_PENALTY, STREAM, IGNORE_EOS, USER, *OFF_FIELDS)

_TEXT = {"type": "string"}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
              "maxItems": MAX_PROMPT_IDS}
STOP_SCHEMA = {"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_STRING},
                         {"type": "array", "maxItems": MAX_STOP,
                          "items": {"type": "string", "minLength": 1, "maxLength": MAX_STRING}},
                         {"type": "null"}],
               "description": f"up to {MAX_STOP} stop strings"}
STREAM_OPTIONS_SCHEMA = {"anyOf": [{"type": "object",
                                    "properties": {"include_usage": INCLUDE_USAGE.schema()}},
                                   {"type": "null"}],
                         "description": "only with stream: true"}
MESSAGES_SCHEMA = {
    "type": "array", "minItems": 1, "maxItems": MAX_MESSAGES,
    "items": {"type": "object", "required": ["role"], "properties": {
        "role": {"type": "string", "maxLength": MAX_STRING},
        "tool_call_id": {"type": "string", "maxLength": MAX_STRING},
        "tool_calls": {"type": "array", "maxItems": MAX_PARTS, "items": {
            "type": "object", "required": ["function"], "properties": {"function": {
                "type": "object", "required": ["name", "arguments"], "properties": {
                    "name": {"type": "string", "maxLength": MAX_STRING},
                    "arguments": {"type": "string"}}}}}},
        "content": {"anyOf": [_TEXT, {"type": "null"}, {
            "type": "array", "maxItems": MAX_PARTS, "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": _TEXT}}}]}}}}
PROMPT_SCHEMA = {"anyOf": [_TEXT, _TOKEN_IDS, {"type": "array", "minItems": 1, "maxItems": 1,
                                                "items": {"anyOf": [_TEXT, _TOKEN_IDS]}}],
                 "description": "one prompt: a string or token ids (a batch of one is accepted)"}
EMBED_INPUT_SCHEMA = {"anyOf": [_TEXT, _TOKEN_IDS, {
    "type": "array", "minItems": 1, "maxItems": MAX_EMBED_INPUTS, "items": {"anyOf": [_TEXT, _TOKEN_IDS]}}]}
EMBEDDING_FIELDS = (MODEL, ENCODING_FORMAT, USER, OffField("dimensions", ()))


def chat_schema() -> dict[str, Any]:
    return object_schema(GENERATION_FIELDS, {"messages": MESSAGES_SCHEMA},
                         extra={"stop": STOP_SCHEMA, "stream_options": STREAM_OPTIONS_SCHEMA,
                                "logprobs": CHAT_LOGPROBS.schema(), "top_logprobs": TOP_LOGPROBS.schema(),
                                "response_format": RESPONSE_FORMAT_SCHEMA, "tools": TOOLS_SCHEMA,
                                "tool_choice": TOOL_CHOICE_SCHEMA,
                                "parallel_tool_calls": PARALLEL_TOOL_CALLS_SCHEMA})


def completion_schema() -> dict[str, Any]:
    return object_schema(GENERATION_FIELDS, {"prompt": PROMPT_SCHEMA},
                         extra={"stop": STOP_SCHEMA, "stream_options": STREAM_OPTIONS_SCHEMA,
                                "logprobs": COMPLETION_LOGPROBS.schema(),
                                "top_logprobs": NO_TOP_LOGPROBS.schema(),
                                "response_format": RESPONSE_FORMAT_SCHEMA})


def embedding_schema() -> dict[str, Any]:
    return object_schema(EMBEDDING_FIELDS, {"input": EMBED_INPUT_SCHEMA})


def openai_error(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 503: "server_overloaded"}.get(
        status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- field validation ------------------------------------------------------------------------

def parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "expected a string or a list of strings")
    if len(stops) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences (got {len(stops)})")
    if any(s == "" or len(s) > MAX_STRING for s in stops):
        raise bad("stop", f"stop sequences must have 1 to {MAX_STRING} characters")
    return tuple(stops)


def parse_sampling(body: dict[str, Any]) -> SamplingParams:
    seed = SEED.read(body)
    return SamplingParams(temperature=TEMPERATURE.read(body), top_k=max(TOP_K.read(body) or 0, 0),
                          top_p=TOP_P.read(body), seed=None if seed is None else seed % 2**64,
                          presence_penalty=PRESENCE_PENALTY.read(body),
                          frequency_penalty=FREQUENCY_PENALTY.read(body))


def check_noop_fields(body: dict[str, Any]) -> None:
    for field in OFF_FIELDS:
        field.check(body)


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
    model: str | None = None
    prompt_chars: int = 0  # the text to tokenize, checked against the context before tokenizing
    plan: StructuredPlan = StructuredPlan()  # response_format / tools (device/serve/structured.py)
    logprobs: int | None = None  # None: off; k: logprobs with the k likeliest tokens
    n: int = 1  # choices


def parse_generation(body: Any, chat: bool) -> GenerationCall:
    body = require_object(body)
    check_noop_fields(body)
    plan = parse_structured(body, chat)
    tokenize, chars = _chat_prompt(body, plan) if chat else _completion_prompt(body)
    max_tokens = MAX_COMPLETION_TOKENS.read(body)
    max_tokens = MAX_TOKENS_FIELD.read(body) or max_tokens or (None if chat else 16)
    stream = STREAM.read(body)
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad("stream_options", "only allowed when stream is true")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "expected an object")
    include_usage = INCLUDE_USAGE.read(options or {})
    USER.read(body)  # not used, but a string when given
    return GenerationCall(chat, tokenize, max_tokens, parse_sampling(body), parse_stop(body),
                          stream, include_usage, IGNORE_EOS.read(body), MODEL.read(body), chars, plan,
                          parse_logprobs(body, chat), N.read(body) or 1)


def parse_logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:
        NO_TOP_LOGPROBS.check(body)
        return COMPLETION_LOGPROBS.read(body)
    top = TOP_LOGPROBS.read(body)
    if not CHAT_LOGPROBS.read(body):
        if top:
            raise bad("top_logprobs", "needs logprobs: true")
        return None
    return top or 0


def _message_text(i: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):  # OpenAI content parts: only text parts can be served
        if len(content) > MAX_PARTS:
            raise bad(f"messages[{i}].content", f"at most {MAX_PARTS} content parts")
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise bad(f"messages[{i}].content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content", f"expected a string or a list of parts, got {type(content).__name__}")


def _tool_calls(i: int, m: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant turn's earlier tool calls, as the client sends them back."""
    calls = m.get("tool_calls")
    if calls is None:
        return []
    ok = isinstance(calls, list) and len(calls) <= MAX_PARTS and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict)
        and isinstance(c["function"].get("name"), str) and isinstance(c["function"].get("arguments"), str)
        for c in calls)
    if not ok:
        raise bad(f"messages[{i}].tool_calls", "expected a list of {function: {name, arguments}} objects")
    return [{"id": c.get("id") if isinstance(c.get("id"), str) else "", "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
            for c in calls]


def _calls_as_text(calls: list[dict[str, Any]]) -> str:
    """Earlier tool calls for a template that does not render tool_calls: the JSON shape the
    model was told to answer in (structured.tools_system_prompt)."""
    out = []
    for c in calls:
        try:
            args = json.loads(c["function"]["arguments"])
        except ValueError:
            args = c["function"]["arguments"]
        out.append(json.dumps({"name": c["function"]["name"], "arguments": args}))
    return "\n".join(out)


def _chat_prompt(body: dict[str, Any],
                 plan: StructuredPlan) -> tuple[Callable[[BundleTokenizer], list[int]], int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "expected a non-empty list of {role, content} objects")
    if len(messages) > MAX_MESSAGES:
        raise bad("messages", f"at most {MAX_MESSAGES} messages (got {len(messages)})")
    clean = []
    chars = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or len(m["role"]) > MAX_STRING:
            raise bad(f"messages[{i}]", f"expected an object with a string 'role' (at most "
                                        f"{MAX_STRING} characters)")
        text = _message_text(i, m.get("content"))
        turn: dict[str, Any] = {"role": m["role"], "content": text}
        calls = _tool_calls(i, m)
        if calls:
            turn["tool_calls"] = calls
        if isinstance(m.get("tool_call_id"), str):
            turn["tool_call_id"] = m["tool_call_id"][:MAX_STRING]
        chars += len(text) + len(m["role"]) + sum(len(c["function"]["arguments"]) for c in calls)
        clean.append(turn)
    chars += sum(len(json.dumps(t)) for t in plan.tool_json)

    def tokenize(tokenizer: BundleTokenizer) -> list[int]:
        from jinja2 import TemplateError

        messages, tools = clean, None
        if plan.tools and tokenizer.renders_tools:
            tools = plan.tool_json
        elif plan.tools or any("tool_calls" in t for t in clean):
            messages = _without_tools_template(clean, plan)
        try:
            return tokenizer.encode_chat(messages, tools)
        except ToolkitError as e:  # no template, or the template's raise_exception
            raise HTTPError(400, e.message + (f" ({e.hint})" if e.hint else ""),
                            "chat_template", "messages") from e
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as e:
            # what a template's own logic raises on a conversation it does not accept
            raise HTTPError(400, f"the chat template could not render these messages: {e}",
                            "chat_template", "messages") from e

    return tokenize, chars


def _without_tools_template(clean: list[dict[str, Any]], plan: StructuredPlan) -> list[dict[str, Any]]:
    """The conversation for a template that ignores tools: earlier calls as their JSON text,
    the tools as (the start of) the system message."""
    out = [{"role": t["role"], "content": (t["content"] + ("\n" if t["content"] else "")
                                           + _calls_as_text(t["tool_calls"])) if "tool_calls" in t
            else t["content"]} for t in clean]
    if plan.tools and plan.tool_choice != "none":
        prompt = tools_system_prompt(plan.tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _completion_prompt(body: dict[str, Any]) -> tuple[Callable[[BundleTokenizer], list[int]], int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return (lambda tokenizer: tokenizer.encode(prompt)), len(prompt)
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        if len(prompt) > MAX_PROMPT_IDS:
            raise bad("prompt", f"at most {MAX_PROMPT_IDS} token ids (got {len(prompt)})")
        ids = [int(t) for t in prompt]
        return (lambda tokenizer: _check_ids(ids, tokenizer, "prompt")), 0
    raise bad("prompt", "expected a string or a list of token ids (one prompt per request)")


def _check_ids(ids: list[int], tokenizer: BundleTokenizer, param: str) -> list[int]:
    """The ids themselves, or 400 naming `param` (the field the client sent them in)."""
    vocab = tokenizer.vocab_size
    bad_ids = [t for t in ids if not 0 <= t < vocab]
    if bad_ids:
        raise bad(param, f"token ids must be in [0, {vocab}); got {[short(t) for t in bad_ids[:5]]}")
    return ids


def check_prompt_chars(chars: int, context: int, param: str) -> None:
    """Before tokenizing: a text that cannot fit the context at CHARS_PER_TOKEN is refused."""
    if chars > context * CHARS_PER_TOKEN:
        raise HTTPError(400, f"the {param} has {chars} characters; this model's context of {context} "
                             f"tokens takes at most {context * CHARS_PER_TOKEN} (refused before "
                             "tokenizing)", "context_length_exceeded", param)


# --- running a generation --------------------------------------------------------------------

def next_event(h: Handler, handle: RequestHandle, sse: SSEStream | None = None) -> Event:
    """Wait for the engine's next event, noticing a client that went away meanwhile."""
    while True:
        event = handle.next_event(EVENT_POLL_S)
        if event is not None:
            # tokens that keep arriving must not hide a disconnect: a non-streaming reply (or a
            # held tool call) writes nothing until the end, so look at the socket every
            # EVENT_POLL_S even while events flow, or a gone client holds its slot to the end
            now = time.monotonic()
            if now - h.gone_checked_at >= EVENT_POLL_S:
                h.gone_checked_at = now
                if h.client_gone():
                    raise ClientGone()
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
    check_prompt_chars(call.prompt_chars, engine.max_seq, "messages" if call.chat else "prompt")
    if call.n > engine.slots:
        raise bad("n", f"at most {engine.slots} on this daemon (the choices run side by side, one "
                       f"KV slot each; got {call.n})")
    with ExitStack() as places:  # n places, 503 before any tokenizing when the daemon is full
        tickets = [places.enter_context(engine.reserve()) for _ in range(call.n)]
        prompt = call.tokenize(tokenizer)
        room = engine.check_prompt(len(prompt), "messages" if call.chat else "prompt")
        max_tokens = min(call.max_tokens or room, room)
        handles = []
        for i, ticket in enumerate(tickets):
            constraint = compile_constraint(call.plan, engine.grammar)  # 400 on a schema it refuses
            params = call.params if call.params.seed is None else replace(  # choices differ, reproducibly
                call.params, seed=(call.params.seed + i) % 2**64)
            handles.append(engine.submit(ticket, GenerationRequest(
                prompt, max_tokens, params, call.stop, call.ignore_eos, constraint, call.logprobs)))
    reply = Reply.new("chatcmpl" if call.chat else "cmpl", model)
    fmts = [LogprobFormatter(tokenizer, call.chat) if call.logprobs is not None else None
            for _ in handles]
    try:
        if call.stream:
            _stream(h, handles, reply, call, fmts)
        else:
            _collect(h, handles, reply, call, fmts)
    finally:
        for handle in handles:
            handle.cancel()  # no-op when it finished; frees the slot when we leave early


def _choice(call: GenerationCall, index: int, text: str, event: Finished,
            entries: list[TokenLogprob], fmt: LogprobFormatter | None) -> dict[str, Any]:
    answer = call.plan.read(text)
    finish = "tool_calls" if answer.tool_calls else event.finish_reason
    # refusal: required (nullable) in OpenAI's ChatCompletionResponseMessage; this daemon never refuses
    message: dict[str, Any] = {"role": "assistant", "content": answer.content, "refusal": None}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    choice: dict[str, Any] = ({"index": index, "message": message} if call.chat
                              else {"index": index, "text": answer.content})
    choice.update(logprobs=fmt.render(entries) if fmt else None, finish_reason=finish,
                  stop_reason=event.stop_reason)
    return choice


def _usage(events: list[Finished]) -> dict[str, Any]:
    """One prompt, n completions: OpenAI counts the prompt once."""
    return Usage(events[0].usage.prompt_tokens, sum(e.usage.completion_tokens for e in events),
                 sum(e.usage.drafted_tokens for e in events),
                 sum(e.usage.accepted_tokens for e in events)).to_json()


def _collect(h: Handler, handles: list[RequestHandle], reply: Reply, call: GenerationCall,
             fmts: list[LogprobFormatter | None]) -> None:
    choices, finished = [], []
    for i, handle in enumerate(handles):  # they run side by side; read them in turn
        text = []
        entries: list[TokenLogprob] = []
        while True:
            event = next_event(h, handle)
            if isinstance(event, TextDelta):
                text.append(event.text)
                entries += event.logprobs
            elif isinstance(event, Failed):
                raise RequestRejected(event.status, event.code, event.message)
            elif isinstance(event, Finished):
                break
        entries += event.logprobs
        choices.append(_choice(call, i, "".join(text), event, entries, fmts[i]))
        finished.append(event)
    h.send_json(200, {"id": reply.id, "object": "chat.completion" if call.chat else "text_completion",
                      "created": reply.created, "model": reply.model, "choices": choices,
                      "usage": _usage(finished), "timings": finished[0].timings.to_json()})


def _next_of_any(h: Handler, handles: list[RequestHandle], live: set[int],
                 sse: SSEStream) -> tuple[int, Event]:
    """The next event of any live choice; one choice waits as next_event does, several are
    polled in turn (a choice's events stay in order)."""
    if len(live) == 1:
        (i,) = live
        return i, next_event(h, handles[i], sse)
    while True:
        for i in sorted(live):
            event = handles[i].next_event(MULTI_POLL_S)
            if event is not None:
                return i, event
        if h.client_gone():
            raise ClientGone()
        if time.monotonic() - sse.last_write > PING_S:
            sse.ping()


def _stream(h: Handler, handles: list[RequestHandle], reply: Reply, call: GenerationCall,
            fmts: list[LogprobFormatter | None]) -> None:
    obj = "chat.completion.chunk" if call.chat else "text_completion"
    pending: list[list[TokenLogprob]] = [[] for _ in handles]  # tokens not yet sent, per choice

    def chunk(i: int, delta: str | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice: dict[str, Any] = ({"index": i, "delta": {} if delta is None else {"content": delta}}
                                  if call.chat else {"index": i, "text": delta or ""})
        logprobs = None
        fmt = fmts[i]
        if fmt is not None and pending[i]:
            logprobs = fmt.render(pending[i])
            pending[i].clear()
        choice.update(logprobs=logprobs, finish_reason=finish, **extra)
        out = {"id": reply.id, "object": obj, "created": reply.created, "model": reply.model,
               "choices": [choice]}
        if call.include_usage:
            out["usage"] = None
        return out

    sse, event = open_stream(h, handles[0])
    if call.chat:
        for i in range(len(handles)):
            first = chunk(i, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            sse.send(first)
    # a tool call is sent whole: its text is held back until the choice ends
    held: list[list[str] | None] = [[] if call.plan.calls_tools else None for _ in handles]
    live, finished, i = set(range(len(handles))), [], 0
    while True:
        if isinstance(event, (TextDelta, Finished)):
            pending[i].extend(event.logprobs)
        hold = held[i]
        if isinstance(event, TextDelta):
            if hold is None:
                sse.send(chunk(i, event.text))
            else:
                hold.append(event.text)
        elif isinstance(event, Failed):  # mid-stream: the status is sent, so an error event
            sse.send(openai_error(event.status, event.message, event.code))
            break
        elif isinstance(event, Finished):
            finish = event.finish_reason
            if hold is not None:
                answer = call.plan.read("".join(hold))
                if answer.tool_calls:
                    finish = "tool_calls"
                    part = chunk(i, None)
                    part["choices"][0]["delta"] = {"tool_calls": [
                        {"index": k, **c} for k, c in enumerate(answer.tool_calls)]}
                    sse.send(part)
                elif answer.content:
                    sse.send(chunk(i, answer.content))
            sse.send(chunk(i, None, finish, stop_reason=event.stop_reason))
            live.discard(i)
            finished.append(event)
            if not live:
                if call.include_usage:
                    sse.send({"id": reply.id, "object": obj, "created": reply.created,
                              "model": reply.model, "choices": [], "usage": _usage(finished),
                              "timings": finished[0].timings.to_json()})
                break
        i, event = _next_of_any(h, handles, live, sse)
    sse.done()


def open_stream(h: Handler, handle: RequestHandle) -> tuple[SSEStream, Event]:
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

@dataclass(frozen=True)
class EmbeddingCall:
    """A validated /v1/embeddings request: texts and token-id lists, not yet tokenized."""

    inputs: list[str | list[int]]
    encoding: str
    model: str | None


def parse_embedding(body: Any, max_len: int) -> EmbeddingCall:
    """Types, counts and lengths, all before anything is tokenized (a text longer than the model
    can read at CHARS_PER_TOKEN is refused here)."""
    body = require_object(body)
    for field in EMBEDDING_FIELDS:
        if isinstance(field, OffField):
            field.check(body)
        else:
            field.read(body)
    raw = body.get("input")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(is_int(t) for t in raw)):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise bad("input", "expected a string, a list of strings, or token id list(s)")
    if len(raw) > MAX_EMBED_INPUTS:
        raise bad("input", f"at most {MAX_EMBED_INPUTS} inputs per request (got {len(raw)})")
    for i, item in enumerate(raw):
        if isinstance(item, str):
            check_prompt_chars(len(item), max_len, f"input[{i}]")
        elif isinstance(item, list) and item and all(is_int(t) for t in item):
            if len(item) > max_len:
                raise HTTPError(400, f"input[{i}] has {len(item)} tokens; this model reads at most "
                                     f"{max_len}", "context_length_exceeded", "input")
        else:
            raise bad(f"input[{i}]", "expected a string or a non-empty list of token ids")
    return EmbeddingCall(raw, ENCODING_FORMAT.read(body) or "float", MODEL.read(body))


def tokenize_texts(inputs: list[str | list[int]], tokenizer: BundleTokenizer, max_len: int,
                   param: str = "input") -> list[list[int]]:
    """Token ids per input (texts tokenized, id lists checked against the vocabulary); run under
    the engine's reservation, so a full daemon refuses before this work is done."""
    out = []
    for i, item in enumerate(inputs):
        ids = (tokenizer.encode(item) if isinstance(item, str)
               else _check_ids([int(t) for t in item], tokenizer, f"{param}[{i}]"))
        if len(ids) > max_len:
            raise HTTPError(400, f"{param}[{i}] has {len(ids)} tokens; this model reads at most "
                                 f"{max_len}", "context_length_exceeded", param)
        out.append(ids)
    return out


def run_embedding(h: Handler, engine: Any, encode: Callable[[], list[list[int]]]) -> Embedded:
    """Reserve a place, then tokenize (`encode`), then run: the 503 of a full daemon comes
    before any tokenizing, as for generation."""
    with engine.reserve() as ticket:
        handle = engine.submit(ticket, EmbeddingRequest(encode()))
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
