"""What the daemon answers is what its OpenAPI document says it answers: every route's 200, JSON
bodies and each event of a stream, validated against the published schemas
(device/serve/response_schemas.py), whose objects are closed, so a field an answer gains without
the document failing here. Tool calls are checked with SmolLM2 (test_structured_smollm2.py): the
tiny model's word vocabulary cannot spell JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from answers import ask, check_answer, exchange
from daemon_fixtures import Daemon, encoder_daemon, llama_bundle, start_daemon  # noqa: F401 - fixtures
from deploy_fixtures import base_bundle, serve  # noqa: F401 - fixtures

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


def test_deploy_answers_are_the_documented_records(base_bundle: Path, serve: Any,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """Every deploy route of a real `toolkit serve --store`, through two installs and a rollback:
    each success answer (200, and the installs' 202) is the schema generated from the store's
    records, closed, so a record that gains a field the document lacks fails here."""
    import time
    import zlib

    from deploy_fixtures import variant

    daemon = serve(tmp_path / "store")
    prefix = "/v1/deploy"

    def call(method: str, route: str, data: bytes | None = None, query: str = "", ok: int = 200,
             **names: str) -> Any:
        status, ctype, raw = exchange(daemon.socket, method, prefix + route.format(**names) + query,
                                      data=data)
        assert status == ok, (route, status, raw[:500])
        (answer,) = check_answer(prefix + route, method, ctype, raw, status)
        return answer

    def install(bundle: Path) -> dict[str, Any]:
        chunk = call("GET", "/hello")["chunk"]["http"]
        state = call("POST", "/uploads", (bundle / "manifest.json").read_bytes())
        uid = state["upload_id"]
        assert [u["upload_id"] for u in call("GET", "/uploads")] == [uid]
        for rel in state["files"]:
            data = (bundle / rel).read_bytes()
            for at in range(0, max(len(data), 1), chunk):
                piece = data[at:at + chunk]
                ack = call("PUT", "/uploads/{upload_id}", piece, upload_id=uid,
                           query=f"?path={rel}&offset={at}&crc32={zlib.crc32(piece)}")
            assert ack["complete"] and ack["held"] == len(data)
        return follow(call("POST", "/uploads/{upload_id}/commit", ok=202, upload_id=uid))

    def follow(accepted: dict[str, Any]) -> dict[str, Any]:
        assert accepted["accepted"] and accepted["state"] == "running"
        deadline = time.monotonic() + 120
        while True:
            job = call("GET", "/status")["install"]
            assert job["job"] == accepted["job"]
            if job["state"] != "running" or time.monotonic() > deadline:
                assert job["state"] == "done", job
                return dict(job["result"])
            time.sleep(0.1)

    hello = call("GET", "/hello")
    assert hello["active"] is None and hello["target"] is None
    first = install(base_bundle)
    assert first["ok"] and first["smoke"]["ok"]
    hello = call("GET", "/hello")
    assert hello["active"] == first["active"] and hello["target"]["runtime"] == "onnxruntime"
    second = install(variant(base_bundle, tmp_path / "b", "tiny-b"))
    assert second["previous"] == first["active"]
    back = follow(call("POST", "/rollback", ok=202))
    assert back["active"] == first["active"]
    assert call("POST", "/uploads/remove", json.dumps({"all": True}).encode()) == []
