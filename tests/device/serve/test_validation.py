"""Request validation (issue #16): inputs that used to answer 500, hang a request thread, or
allocate far more than the body's size, each answered with a 4xx in the route family's shape,
and the daemon still serving afterwards. Also the OpenAPI document: generated, current, served.

Imports of the new modules (device/serve/validate.py, fields.py, openapi.py) are inside the
tests, so that the daemon-level tests also run (and fail) against the code before them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_fixtures import Daemon, encoder_daemon, llama_bundle, start_daemon, wait_ready  # noqa: F401 - fixtures
from paths import REPO

from host.client import UnixHTTPConnection

ROOT = REPO
CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def daemon(llama_bundle: Path) -> Iterator[Daemon]:  # noqa: F811
    d = start_daemon(llama_bundle, "--queue", "4")
    yield d
    d.stop()


def post(d: Daemon, path: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = UnixHTTPConnection(d.socket_path, timeout=120)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        ctype = resp.getheader("Content-Type", "")
        return resp.status, json.loads(data) if data and "json" in ctype else data
    finally:
        conn.close()


def get(d: Daemon, path: str) -> tuple[int, bytes]:
    conn = UnixHTTPConnection(d.socket_path, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def model_id(d: Daemon) -> str:
    return str(json.loads(get(d, "/v1/models")[1])["data"][0]["id"])


def assert_serving(d: Daemon) -> None:
    """The daemon is alive and answers a chat request."""
    status, reply = post(d, CHAT, {"messages": HI, "max_tokens": 2, "temperature": 0})
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1, (status, reply, d.log()[-2000:])


def openai_4xx(status: int, reply: Any, code: int, kind: str | None = None) -> dict[str, Any]:
    assert status == code, reply
    assert isinstance(reply, dict) and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    if kind is not None:
        assert reply["error"]["code"] == kind, reply
    return dict(reply["error"])


def kserve_4xx(status: int, reply: Any, code: int) -> str:
    assert status == code, reply
    assert isinstance(reply, dict) and isinstance(reply["error"], str), reply
    return str(reply["error"])


# --- the bounded parser ----------------------------------------------------------------------

def test_loads_bounded_refuses_depth_without_recursing() -> None:
    from device.serve.validate import JSONRefused, json_depth, loads_bounded

    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(JSONRefused) as e:
        loads_bounded(deep)
    assert e.value.status == 400 and "deeper than" in e.value.message
    # brackets inside strings do not count, escaped quotes do not end a string
    assert json_depth(b'{"a": "[[[[\\"[[[", "b": [[1], {"c": "]]]"}]}') == 3
    assert json_depth(b'["\\\\", [[]]]') == 3  # an escaped backslash, then the string ends
    assert loads_bounded(b'{"a": "' + b"[" * 1000 + b'"}') == {"a": "[" * 1000}
    assert loads_bounded(b"[" * 32 + b"]" * 32) is not None


@pytest.mark.parametrize("body,code", [
    (b'{"a": NaN}', "invalid_value"), (b'{"a": -Infinity}', "invalid_value"),
    (b'{"a": ' + b"1" * 5000 + b"}", "invalid_json"),  # int_max_str_digits: a ValueError
    (b'{"a": "\\ud800"}', "invalid_json"), ('{"a": 1}'.encode("utf-16"), "invalid_json"),
], ids=["nan", "-infinity", "5000-digits", "lone-surrogate", "utf-16"])
def test_loads_bounded_refuses_what_python_json_lets_through(body: bytes, code: str) -> None:
    from device.serve.validate import JSONRefused, loads_bounded

    with pytest.raises(JSONRefused) as e:
        loads_bounded(body)
    assert e.value.status == 400 and e.value.code == code
    assert loads_bounded(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a surrogate pair is fine


def test_a_manifest_with_a_5000_digit_integer_is_refused_not_raised() -> None:
    """The deploy route's begin parses the manifest with bundle/manifest.py's own json.loads
    (bundle/ cannot use device/'s parser); the fuzz found its ValueError answered 500."""
    from bundle.errors import ToolkitError
    from bundle.manifest import parse_manifest

    with pytest.raises(ToolkitError, match="not valid JSON"):
        parse_manifest(b'{"schema_version": ' + b"7" * 5000 + b"}")


# --- sampling cannot produce NaN ---------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-3, 1.0, 1e308])
@pytest.mark.parametrize("top_p", [1.0, 1e-300, 0.5])
def test_sampling_never_sees_nan(temperature: float, top_p: float) -> None:
    from device.runtime.sampling import SamplingParams, sample

    logits = (np.random.default_rng(0).standard_normal(50) * 30).astype(np.float32)
    rng = np.random.default_rng(1)
    for top_k in (0, 1, 7):
        token = sample(logits, SamplingParams(temperature, top_k, top_p), rng)
        assert 0 <= token < 50
    if temperature < 1e-300:  # a vanishing temperature is greedy
        assert sample(logits, SamplingParams(temperature), rng) == int(np.argmax(logits))


def test_sampling_survives_non_finite_logits() -> None:
    from device.runtime.sampling import SamplingParams, sample

    logits = np.array([1.0, np.nan, 3.0, np.inf, -np.inf], np.float32)
    rng = np.random.default_rng(0)
    assert sample(logits, SamplingParams(0.0), rng) == 3
    assert sample(logits, SamplingParams(1.0), rng) == 3  # +inf is the one certain choice
    assert sample(np.full(4, np.nan, np.float32), SamplingParams(0.7), rng) in range(4)


# --- OpenAI routes ------------------------------------------------------------------------------

def nested(depth: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * depth + b"]" * depth + b"}"


OPENAI_HOLES = [
    ("nested-100k", nested(100_000), 400, "invalid_json"),
    ("nested-900", nested(900), 400, "invalid_json"),
    ("temperature-1e-320", {"messages": HI, "max_tokens": 4, "temperature": 1e-320}, 400, "invalid_value"),
    ("temperature-5e-4", {"messages": HI, "max_tokens": 4, "temperature": 5e-4}, 400, "invalid_value"),
    ("temperature-int-1e400", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1'
     + b"0" * 400 + b"}", 400, "invalid_value"),
    ("int-5000-digits", b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"7" * 5000 + b"}",
     400, "invalid_json"),
    ("nan-literal", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tag": NaN}',
     400, "invalid_value"),
    ("infinity-literal", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, '
     b'"tag": -Infinity}', 400, "invalid_value"),
    ("lone-surrogate", b'{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 1}',
     400, "invalid_json"),
    ("max-tokens-1e30", {"messages": HI, "max_tokens": 10**30}, 400, "invalid_value"),
    ("top-k-1e30", {"messages": HI, "max_tokens": 1, "top_k": 10**30}, 400, "invalid_value"),
    ("seed-past-int64", {"messages": HI, "max_tokens": 1, "seed": 2**64 - 1}, 400, "invalid_value"),
    ("model-not-a-string", {"messages": HI, "max_tokens": 1, "model": 5}, 400, "invalid_value"),
    ("n-past-the-slots", {"messages": HI, "max_tokens": 1, "n": 5.0}, 400, "invalid_value"),
    ("best-of-2", {"messages": HI, "max_tokens": 1, "best_of": 2}, 400, "unsupported_parameter"),
    ("stop-too-long", {"messages": HI, "max_tokens": 1, "stop": "x" * 1000}, 400, "invalid_value"),
    ("too-many-messages", {"messages": HI * 5000, "max_tokens": 1}, 400, "invalid_value"),
    ("logit-bias", {"messages": HI, "max_tokens": 1, "logit_bias": {"5": 1}}, 400, "unsupported_parameter"),
    ("top-logprobs-without-logprobs", {"messages": HI, "max_tokens": 1, "top_logprobs": 2}, 400,
     "invalid_value"),
    ("presence-penalty-3", {"messages": HI, "max_tokens": 1, "presence_penalty": 3}, 400, "invalid_value"),
    ("response-format-yaml", {"messages": HI, "max_tokens": 1, "response_format": {"type": "yaml"}},
     400, "invalid_value"),
    ("tool-choice-unknown", {"messages": HI, "max_tokens": 1, "tool_choice": "required"}, 400,
     "invalid_value"),
    ("tools-not-functions", {"messages": HI, "max_tokens": 1, "tools": [{"type": "web"}]}, 400,
     "invalid_value"),
]


@pytest.mark.parametrize("name,body,code,kind", OPENAI_HOLES, ids=[h[0] for h in OPENAI_HOLES])
def test_openai_holes_are_4xx(daemon: Daemon, name: str, body: Any, code: int, kind: str) -> None:
    status, reply = post(daemon, CHAT, body)
    openai_4xx(status, reply, code, kind)
    assert_serving(daemon)


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(daemon: Daemon) -> None:
    status, reply = post(daemon, "/v1/completions", {"prompt": "cat " * 500_000, "max_tokens": 1})
    err = openai_4xx(status, reply, 400, "context_length_exceeded")
    assert "before tokenizing" in err["message"]
    status, reply = post(daemon, CHAT, {"messages": [{"role": "user", "content": "dog " * 500_000}]})
    assert "before tokenizing" in openai_4xx(status, reply, 400, "context_length_exceeded")["message"]
    assert_serving(daemon)


def test_bench_settings_are_checked_before_the_stream_starts(daemon: Daemon) -> None:
    base = {"prompt_lens": [4], "concurrency": [1], "runs": 1, "warmup": 0, "gen_len": 2, "power": False}
    for bad in ({"seed": -1}, {"gen_len": 1000}, {"runs": 10**9}, {"sample_interval_s": -1.0},
                {"prompt_lens": list(range(1, 40))}, {"concurrency": "12"}):
        status, reply = post(daemon, "/v1/bench", {**base, **bad})
        openai_4xx(status, reply, 400)
    status, reply = post(daemon, "/v1/bench", b'{"prompt_lens": [4], "gen_len": NaN}')
    openai_4xx(status, reply, 400)
    assert_serving(daemon)


def test_back_to_back_benches_are_each_served(daemon: Daemon) -> None:
    """The daemon is ready again when the bench's [DONE] goes out: the fuzz met a 503
    "benchmarking" for a bench sent right after the previous one's [DONE]."""
    body = {"prompt_lens": [2], "concurrency": [1], "runs": 1, "warmup": 0, "gen_len": 1, "power": False}
    statuses = [post(daemon, "/v1/bench", body)[0] for _ in range(8)]
    assert statuses == [200] * 8, statuses


# --- KServe on an encoder -------------------------------------------------------------------------

def text_input(shape: Any, data: Any, **kw: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape, "data": data, **kw}]}


def test_kserve_holes_are_4xx(encoder_daemon: Daemon) -> None:  # noqa: F811
    m = model_id(encoder_daemon)
    infer = f"/v2/models/{m}/infer"
    # a rank of 300 huge dims: the element count has ~5700 digits (main formatted it: ValueError)
    status, reply = post(encoder_daemon, infer, text_input([2**63 - 1] * 300, ["a"]))
    assert "at most 8 dimensions" in kserve_4xx(status, reply, 400)
    # a huge shape is refused before the data is looked at
    status, reply = post(encoder_daemon, infer, text_input([2**62, 2**62], ["a"]))
    assert "more than 256 elements" in kserve_4xx(status, reply, 413)
    # 5000 texts: main tokenized and encoded all of them before answering 200
    status, reply = post(encoder_daemon, infer, text_input([5000], ["a"] * 5000))
    assert "more than 256 elements" in kserve_4xx(status, reply, 413)
    # many inputs: refused by count before any of them is flattened
    many = {"inputs": [text_input([1], ["a"])["inputs"][0]] * 2000}
    status, reply = post(encoder_daemon, infer, many)
    assert "got 2000 inputs" in kserve_4xx(status, reply, 400)
    # data nested past the depth limit (main: RecursionError in json.loads, or in _flatten)
    deep = b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ' + \
        b"[" * 950 + b'"a"' + b"]" * 950 + b"}]}"
    kserve_4xx(*post(encoder_daemon, infer, deep), 400)
    # shape x datatype must match the data given (Triton's "input byte size mismatch")
    status, reply = post(encoder_daemon, infer, text_input([3], ["a", "b"]))
    assert "holds 3" in kserve_4xx(status, reply, 400)
    status, reply = post(encoder_daemon, infer, text_input([1], ["a"] * 100_000))
    assert "more than 1" in kserve_4xx(status, reply, 400)
    # a text that cannot fit the model's positions at 32 characters a token: before tokenizing
    status, reply = post(encoder_daemon, infer, text_input([1], ["water " * 200_000]))
    assert "before tokenizing" in kserve_4xx(status, reply, 400)
    # FP data: 1e400 reads as inf, NaN is not JSON
    status, reply = post(encoder_daemon, infer, b'{"inputs": [{"name": "text", "datatype": "FP32", '
                                                b'"shape": [1], "data": [NaN]}]}')
    kserve_4xx(status, reply, 400)
    ok = encoder_ok(encoder_daemon, m)
    assert ok


def encoder_ok(d: Daemon, m: str) -> bool:
    status, reply = post(d, f"/v2/models/{m}/infer", text_input([2], ["hello world", "the sky"]))
    return status == 200 and reply["outputs"][0]["shape"][0] == 2


def test_embeddings_holes_are_4xx(encoder_daemon: Daemon) -> None:  # noqa: F811
    status, reply = post(encoder_daemon, "/v1/embeddings", {"input": ["water " * 200_000]})
    assert "before tokenizing" in openai_4xx(status, reply, 400, "context_length_exceeded")["message"]
    status, reply = post(encoder_daemon, "/v1/embeddings", {"input": [[5] * 100_000]})
    openai_4xx(status, reply, 400, "context_length_exceeded")
    status, reply = post(encoder_daemon, "/v1/embeddings", {"input": "hi", "model": ["x"]})
    openai_4xx(status, reply, 400, "invalid_value")
    status, reply = post(encoder_daemon, "/v1/embeddings", {"input": "hi", "encoding_format": 7})
    openai_4xx(status, reply, 400, "invalid_value")
    assert encoder_ok(encoder_daemon, model_id(encoder_daemon))


def test_an_embedding_token_id_out_of_the_vocabulary_names_the_input(encoder_daemon: Daemon) -> None:  # noqa: F811
    """The id check is shared with /v1/completions and said 'prompt', a field /v1/embeddings
    does not have."""
    status, reply = post(encoder_daemon, "/v1/embeddings", {"input": ["hello", [5, -3]]})
    error = openai_4xx(status, reply, 400, "invalid_value")
    assert error["param"] == "input[1]" and "'input[1]'" in error["message"], error
    assert "prompt" not in error["message"], error

# --- the OpenAPI document -----------------------------------------------------------------------


def test_docs_openapi_is_generated_from_the_code() -> None:
    from device.serve.openapi import render

    assert (ROOT / "docs" / "openapi.json").read_text() == render(), \
        "docs/openapi.json is stale: run `python -m device.serve.openapi > docs/openapi.json`"


def test_the_daemon_serves_its_openapi_document(daemon: Daemon) -> None:
    status, body = get(daemon, "/openapi.json")
    assert status == 200 and body == (ROOT / "docs" / "openapi.json").read_bytes()
    doc = json.loads(body)
    assert doc["openapi"].startswith("3.") and "/v2/models/{name}/infer" in doc["paths"]


PROBES: tuple[Any, ...] = (None, 0, 1, 2, -1, -2, 1.0, 0.5, 1.5, 1e-3, 1e-4, 1e-320, 100.0, 100.5,
                           2**20, 2**20 + 1, 2**63 - 1, 2**63, -(2**63) - 1, True, False, "", "x",
                           "x" * 300, "float", "base64", [], ["a"], ["a"] * 5, {}, {"type": "text"},
                           {"type": "json_object"})


def accepted(parse: Any, body: dict[str, Any]) -> bool:
    from device.serve.httpd import HTTPError

    try:
        parse(body)
        return True
    except HTTPError:
        return False


def test_published_bounds_are_the_enforced_ones() -> None:
    """Every field of every request, probed with the same values through the published schema
    and through the parser: both accept, or both refuse. The schema's numbers come from the
    same specs the parsers read with, so this fails when either drifts."""
    import jsonschema

    from device.serve import bench_route, openai_api

    cases = [
        (openai_api.chat_schema(), lambda b: openai_api.parse_generation(b, chat=True), {"messages": HI},
         [f.name for f in openai_api.GENERATION_FIELDS] + ["stop"]),
        (openai_api.completion_schema(), lambda b: openai_api.parse_generation(b, chat=False),
         {"prompt": "hi"}, [f.name for f in openai_api.GENERATION_FIELDS] + ["stop"]),
        (openai_api.embedding_schema(), lambda b: openai_api.parse_embedding(b, 128), {"input": "hi"},
         [f.name for f in openai_api.EMBEDDING_FIELDS]),
        (bench_route.settings_schema(), bench_route.parse_settings, {},
         [f.name for f in bench_route.SCALARS] + list(bench_route.LISTS)),
    ]
    checked = 0
    for schema, parse, base, fields in cases:
        validator = jsonschema.Draft202012Validator(schema)
        for name in fields:
            for value in PROBES:
                body = {**base, name: value}
                assert validator.is_valid(body) == accepted(parse, body), (name, value)
                checked += 1
    assert checked > 1000


READY_ROUTES = ("/health", "/health/ready", "/v2/health/ready")


def test_readiness_answers_as_the_openapi_document_says(llama_bundle: Path) -> None:  # noqa: F811
    """While loading (a slow device stretches the warm-up) and once ready, each readiness
    route's status, Content-Type and body are the ones its operation documents."""
    import jsonschema

    doc = json.loads((ROOT / "docs" / "openapi.json").read_text())

    def check(path: str, status: int, ctype: str, body: bytes) -> None:
        documented = doc["paths"][path]["get"]["responses"][str(status)]
        content = documented.get("content")
        if content is None:  # documented without a body
            assert body == b"", (path, status, body)
            return
        assert ctype.split(";")[0] in content, (path, status, ctype, list(content))
        schema = content[ctype.split(";")[0]].get("schema")
        if schema is not None:
            jsonschema.validate(json.loads(body), {**schema, "components": doc["components"]})

    d = start_daemon(llama_bundle, slow_step_s=1.0, wait=False)
    try:
        loading = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(loading) < len(READY_ROUTES):
            for path in READY_ROUTES:
                try:
                    status, ctype, body = get_full(d, path)
                except OSError:  # not listening yet
                    continue
                if status == 503:
                    check(path, status, ctype, body)
                    loading.add(path)
            time.sleep(0.05)
        assert loading == set(READY_ROUTES), d.log()
        wait_ready(d, timeout=120.0)  # every start-up probe step takes the 1 s here (~50 s in all)
        for path in (*READY_ROUTES, "/health/live", "/v2/health/live"):
            status, ctype, body = get_full(d, path)
            assert status == 200
            check(path, status, ctype, body)
    finally:
        d.stop()


def get_full(d: Daemon, path: str) -> tuple[int, str, bytes]:
    conn = UnixHTTPConnection(d.socket_path, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()
