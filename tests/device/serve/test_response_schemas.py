"""What the daemon answers is what its OpenAPI document says it answers: every route's 200, JSON
bodies and each event of a stream, validated against the published schemas
(device/serve/response_schemas.py), whose objects are closed, so a field an answer gains without
the document failing here. Tool calls are checked with SmolLM2 (test_structured_smollm2.py): the
tiny model's word vocabulary cannot spell JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from answers import ask
from daemon_fixtures import Daemon, encoder_daemon, llama_bundle, start_daemon  # noqa: F401 - fixtures

HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def decoder(llama_bundle: Path) -> Iterator[Daemon]:  # noqa: F811
    d = start_daemon(llama_bundle)
    yield d
    d.stop()


def model_of(d: Daemon) -> str:
    return str(ask(d.socket_path, "GET", "/v1/models")[0]["data"][0]["id"])


def test_model_cards_status_and_metadata(decoder: Daemon) -> None:
    m = model_of(decoder)
    (card,) = ask(decoder.socket_path, "GET", "/v1/models/{model}", model=m)
    assert card["id"] == m and card["meta"]["kind"] == "decoder"
    (status,) = ask(decoder.socket_path, "GET", "/v1/status")
    assert status["state"] == "ready"
    assert ask(decoder.socket_path, "GET", "/v2")[0]["extensions"]
    (meta,) = ask(decoder.socket_path, "GET", "/v2/models/{name}", name=m)
    assert meta["name"] == m


@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": 2, "n": 2},
    {"stop": ["the"], "max_tokens": 30},
    {"prompt": "the cat the cat the cat the cat the cat the cat", "max_tokens": 12},  # drafts
])
def test_completions(decoder: Daemon, extra: dict[str, Any]) -> None:
    body = {"prompt": "hello world", "max_tokens": 4, "temperature": 0, **extra}
    (answer,) = ask(decoder.socket_path, "POST", "/v1/completions", body)
    assert answer["object"] == "text_completion" and len(answer["choices"]) == body.get("n", 1)
    if "cat" in body["prompt"]:  # text that copies its prompt: drafting ran, and usage says so
        assert answer["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0


@pytest.mark.parametrize("extra", [
    {},
    {"logprobs": True, "top_logprobs": 2},
    {"n": 2, "temperature": 0.9, "seed": 1},
])
def test_chat_completions(decoder: Daemon, extra: dict[str, Any]) -> None:
    body = {"messages": HI, "max_tokens": 4, "temperature": 0, **extra}
    (answer,) = ask(decoder.socket_path, "POST", "/v1/chat/completions", body)
    assert answer["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "hello world", "logprobs": 1}),
    ("/v1/completions", {"prompt": "hello world", "n": 2}),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 1}),
    ("/v1/chat/completions", {"messages": HI, "n": 2}),
])
@pytest.mark.parametrize("usage", [False, True])
def test_streams(decoder: Daemon, route: str, body: dict[str, Any], usage: bool) -> None:
    body = {**body, "max_tokens": 4, "temperature": 0, "stream": True,
            **({"stream_options": {"include_usage": True}} if usage else {})}
    events = ask(decoder.socket_path, "POST", route, body)
    finished = [c for e in events for c in e["choices"] if c["finish_reason"]]
    assert len(finished) == body.get("n", 1)
    assert (events[-1].get("usage") is not None) == usage


def test_kserve_generate(decoder: Daemon) -> None:
    m = model_of(decoder)
    # ignore_eos: KServe's requests sample by default (temperature 1, no seed), and the random
    # tiny model drew its stop token within 3 tokens now and then (CI, 2026-12-06: "stop")
    body = {"text_input": "hello", "parameters": {"max_tokens": 3, "ignore_eos": True}}
    (answer,) = ask(decoder.socket_path, "POST", "/v2/models/{name}/generate", body, name=m)
    assert answer["finish_reason"] == "length"
    events = ask(decoder.socket_path, "POST", "/v2/models/{name}/generate_stream", body, name=m)
    assert events[-1]["finish_reason"] == "length"


def test_encoder_answers(encoder_daemon: Daemon) -> None:  # noqa: F811
    m = model_of(encoder_daemon)
    for fmt in ("float", "base64"):
        (answer,) = ask(encoder_daemon.socket_path, "POST", "/v1/embeddings",
                        {"input": ["hello", "world"], "encoding_format": fmt})
        assert len(answer["data"]) == 2
    (meta,) = ask(encoder_daemon.socket_path, "GET", "/v2/models/{name}", name=m)
    body = {"id": "r1", "inputs": [{"name": meta["inputs"][0]["name"], "datatype": "BYTES",
                                    "shape": [1], "data": ["hello"]}]}
    (answer,) = ask(encoder_daemon.socket_path, "POST", "/v2/models/{name}/infer", body, name=m)
    assert answer["id"] == "r1"
