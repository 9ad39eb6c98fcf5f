"""The daemon as a real process: routes, streaming, concurrency, admission, disconnects,
validation, auth, drain on SIGTERM, socket handling, metrics, KServe, and stock clients."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_fixtures import (  # noqa: F401 - fixtures
    REPO,
    SPECIALS,
    Daemon,
    daemons,
    encoder_daemon,
    llama_bundle,
    raw_request,
    socket_dir,
    start_daemon,
)

from host.client import DaemonClient, DaemonError, Endpoint

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def daemon(llama_bundle: Path) -> Iterator[Daemon]:  # noqa: F811
    d = start_daemon(llama_bundle, "--queue", "8", tcp=True)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def slow_daemon(llama_bundle: Path) -> Iterator[Daemon]:  # noqa: F811
    """One slot, one queue place, 50 ms per step: requests last long enough to observe."""
    d = start_daemon(llama_bundle, "--slots", "1", "--queue", "1", slow_step_s=0.05)
    yield d
    d.stop()


def chat_body(content: str, **kw: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 20, "temperature": 0, **kw}


def collect(client: DaemonClient, body: dict[str, Any], path: str = CHAT) -> tuple[str, list[dict[str, Any]]]:
    events = list(client.stream(path, body))
    text = "".join((c.get("delta", {}).get("content") or c.get("text") or "")
                   for e in events for c in e.get("choices", []))
    return text, events


def open_stream(sock_path: Path, body: dict[str, Any], path: str = CHAT) -> tuple[socket.socket, bytes]:
    """Start a streaming request on a raw socket; return it once the first event arrived."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(str(sock_path))
    payload = json.dumps({**body, "stream": True}).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    got = b""
    while b"data:" not in got:
        chunk = s.recv(65536)
        assert chunk, f"connection closed early: {got!r}"
        got += chunk
    return s, got


def read_to_end(s: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"0\r\n\r\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def status(d: Daemon) -> dict[str, Any]:
    return d.client().get("/v1/status")


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


# --- basics ----------------------------------------------------------------------------------

def test_socket_is_private_and_routes_answer(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o600
    c = daemon.client()
    models = c.get("/v1/models")
    model_id = models["data"][0]["id"]
    assert models["data"][0]["max_model_len"] == 64
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{model_id}/ready", "/health"):
        assert c.request("GET", path).status == 200, path
    assert c.request("GET", "/v2/models/nope/ready").status == 404
    meta = c.get(f"/v2/models/{model_id}")
    assert meta["name"] == model_id and meta["platform"] == "onnxruntime_onnx"
    st = status(daemon)
    assert st["state"] == "ready" and st["scheduler"]["slots"] == 4
    assert st["scheduler"]["decode_mode"] == "batched"
    assert st["bundle"]["precision"] == "fp32" and len(st["bundle"]["manifest_sha256"]) == 64
    assert st["memory"]["rss_bytes"] > 0 and st["memory"]["kv_cache_bytes"] > 0
    assert st["target"]["name"] == "cpu" and st["backend"]["backend"] == "onnxruntime"


def test_chat_stream_matches_the_non_streaming_answer(daemon: Daemon) -> None:
    c = daemon.client()
    whole = c.post(CHAT, chat_body("hello cat"))
    text, events = collect(c, chat_body("hello cat", stream_options={"include_usage": True}))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    assert len([e for e in events if e["choices"] and e["choices"][0]["delta"].get("content")]) > 3
    final, usage = events[-2], events[-1]
    assert final["choices"][0]["finish_reason"] == "length"
    # the draft counts (completion_tokens_details) depend on the step times the engine measured

    def counts(u: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in u.items() if k != "completion_tokens_details"}
    assert usage["choices"] == [] and counts(usage["usage"]) == counts(whole["usage"])
    assert whole["usage"]["completion_tokens"] == 20
    assert text == whole["choices"][0]["message"]["content"] and text


def test_greedy_drafts_are_reported_in_usage_timings_status_and_metrics(daemon: Daemon) -> None:
    """Prompt lookup is on by default: a greedy answer that repeats its prompt gets drafts
    accepted, reported with OpenAI's and llama-server's names and in /metrics."""
    from device.serve.config import DRAFT_TOKENS

    c = daemon.client()
    before = scrape(daemon)
    reply = c.post(CHAT, chat_body("sun moon star sky rain snow wind fire " * 2, max_tokens=30))
    details, timings = reply["usage"]["completion_tokens_details"], reply["timings"]
    accepted = details["accepted_prediction_tokens"]
    assert accepted > 0 and accepted == timings["draft_n_accepted"]
    assert accepted + details["rejected_prediction_tokens"] == timings["draft_n"]
    after = scrape(daemon)
    assert (after["toolkit_spec_decode_num_accepted_tokens_total"]
            - before["toolkit_spec_decode_num_accepted_tokens_total"]) == accepted
    assert (after["toolkit_spec_decode_num_draft_tokens_total"]
            - before["toolkit_spec_decode_num_draft_tokens_total"]) == timings["draft_n"]
    assert status(daemon)["scheduler"]["draft_tokens"] == DRAFT_TOKENS
    assert status(daemon)["scheduler"]["draft_steps"] == "joint"  # 4 slots, a ragged graph
    assert status(daemon)["scheduler"]["spare_token"] == "attention"  # lone rows' form, exact here
    assert status(daemon)["scheduler"]["joint_spare"] == "attention"  # the graph's row spares
    assert status(daemon)["scheduler"]["even_steps"] is False  # fp32: any W x T is exact
    sampled = c.post(CHAT, chat_body("sun moon star sky rain snow wind fire " * 2, temperature=0.7))
    assert "completion_tokens_details" not in sampled["usage"] and "draft_n" not in sampled["timings"]


def test_completion_stream_with_a_stop_string(daemon: Daemon) -> None:
    c = daemon.client()
    body = {"prompt": "the cat and the dog", "max_tokens": 20, "temperature": 0}
    full = c.post("/v1/completions", body)["choices"][0]["text"]
    stop = full.split()[len(full.split()) // 2]
    cut = c.post("/v1/completions", {**body, "stop": [stop, "zzz"]})["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == full[:full.index(stop)]
    streamed, events = collect(c, {**body, "stop": stop}, "/v1/completions")
    assert streamed == cut["text"] and events[-1]["choices"][0]["finish_reason"] == "stop"


def test_logprob_tokens_join_to_the_text_and_offsets_index_it(daemon: Daemon) -> None:
    """OpenAI's tokens are the completion's text cut at token boundaries; the word tokenizer's
    decoder, like SentencePiece's, drops a lone token's leading space ("say", not " say")."""
    c = daemon.client()
    body = {"prompt": "the cat", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    choice = c.post("/v1/completions", body)["choices"][0]
    lp, text = choice["logprobs"], choice["text"]
    assert " " in text and "".join(lp["tokens"]) == text
    assert [text[o:o + len(t)] for o, t in zip(lp["text_offset"], lp["tokens"])] == lp["tokens"]
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    _, events = collect(c, {**body, "stream": True}, "/v1/completions")
    streamed = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["logprobs"]]
    assert [t for s in streamed for t in s["tokens"]] == lp["tokens"]
    assert [o for s in streamed for o in s["text_offset"]] == lp["text_offset"]
    reply = c.post(CHAT, chat_body("hello cat", max_tokens=8, logprobs=True, top_logprobs=2))
    content = reply["choices"][0]["logprobs"]["content"]
    # special tokens keep their text in logprobs (the random model emits <pad>); content skips them
    words = [t["token"] for t in content if t["token"].strip() not in SPECIALS]
    assert "".join(words) == reply["choices"][0]["message"]["content"]
    assert all(bytes(t["bytes"]).decode() == t["token"] for t in content)


def test_chat_message_and_logprobs_carry_openais_required_refusal(daemon: Daemon) -> None:
    """OpenAI's ChatCompletionResponseMessage and chat logprobs object require `refusal`
    (nullable): strict clients generated from its OpenAPI document reject a reply without it."""
    reply = daemon.client().post(CHAT, chat_body("hello cat", max_tokens=2, logprobs=True))
    choice = reply["choices"][0]
    assert choice["message"]["refusal"] is None and choice["message"]["role"] == "assistant"
    assert choice["logprobs"]["refusal"] is None and len(choice["logprobs"]["content"]) == 2


def test_eight_concurrent_clients_on_four_slots_each_equal_alone(daemon: Daemon) -> None:
    c = daemon.client()
    bodies = [chat_body(" ".join([w] * (i + 1)), seed=i, temperature=0.8 if i % 2 else 0, max_tokens=24)
              for i, w in enumerate("cat dog tree road car sun moon star".split())]
    alone = [c.post(CHAT, b)["choices"][0]["message"]["content"] for b in bodies]
    together: list[Any] = [None] * len(bodies)

    def worker(i: int) -> None:
        try:
            together[i] = collect(daemon.client(), bodies[i])[0]
        except DaemonError as e:  # shown by the assertion below
            together[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (a, b) in enumerate(zip(alone, together)):
        assert a == b, f"request {i}: {b!r} != {a!r} (alone)\n{daemon.log()[-3000:]}"


# --- bad requests ----------------------------------------------------------------------------

BAD_REQUESTS = [
    (CHAT, b"{not json", 400, "invalid_json"),
    (CHAT, b"[1, 2]", 400, "invalid_type"),
    (CHAT, json.dumps({"messages": "hi"}).encode(), 400, "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", max_tokens="5")).encode(), 400, "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", temperature=-1)).encode(), 400, "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", top_p=0)).encode(), 400, "invalid_value"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", stop=["a"] * 5)).encode(), 400, "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", seed=True)).encode(), 400, "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", best_of=2)).encode(), 400, "unsupported_parameter"),
    (CHAT, json.dumps(chat_body("hi", stream_options={"include_usage": True})).encode(), 400,
     "invalid_value"),
    (CHAT, json.dumps(chat_body("hi", model="gpt-4")).encode(), 404, "model_not_found"),
    (CHAT, json.dumps(chat_body("cat " * 80)).encode(), 400, "context_length_exceeded"),
    ("/v1/completions", json.dumps({"prompt": [1, 2, 10**9]}).encode(), 400, "invalid_value"),
    ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400, "invalid_value"),
    ("/v1/embeddings", json.dumps({"input": "hi"}).encode(), 400, "wrong_model_kind"),
    ("/v1/nope", b"{}", 404, "not_found"),
]


@pytest.mark.parametrize("path,body,code,kind", BAD_REQUESTS, ids=[f"{p}-{k}" for p, _, _, k in BAD_REQUESTS])
def test_bad_requests_get_4xx_and_the_daemon_keeps_serving(daemon: Daemon, path: str, body: bytes,
                                                           code: int, kind: str) -> None:
    status_code, err = raw_request(daemon.socket_path, "POST", path, body,
                                   {"Content-Type": "application/json"})
    assert status_code == code
    assert err is not None and err["error"]["code"] == kind and err["error"]["message"]
    assert set(err["error"]) == {"message", "type", "param", "code"}
    ok = daemon.client().post("/v1/completions", {"prompt": "hello", "max_tokens": 2, "ignore_eos": True})
    assert ok["usage"]["completion_tokens"] == 2


def test_kserve_errors_are_flat(daemon: Daemon) -> None:
    model_id = daemon.client().get("/v1/models")["data"][0]["id"]
    code, err = raw_request(daemon.socket_path, "POST", f"/v2/models/{model_id}/infer", b"{bad")
    assert code == 400 and isinstance(err["error"], str)
    code, err = raw_request(daemon.socket_path, "GET", "/v2/models/other")
    assert code == 404 and "other" in err["error"]


# --- TCP and tokens --------------------------------------------------------------------------

def test_tcp_requires_the_bearer_token_on_every_route(daemon: Daemon) -> None:
    assert daemon.tcp is not None
    for token in (None, "", "wrong-token", daemon.token + "x"):
        conn = http.client.HTTPConnection(*daemon.tcp, timeout=10)
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        for path in ("/v1/models", "/v2/health/live", "/metrics"):
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 401 and body["error"]["type"] == "authentication_error", (token, path)
        conn.close()
    good = daemon.tcp_client()
    assert good.get("/v1/models")["data"]
    assert daemon.client().request("GET", "/v1/models").status == 200  # the socket needs none


def test_stock_openai_client_streams_a_chat_completion_over_tcp(daemon: Daemon) -> None:
    openai = pytest.importorskip("openai")
    host, port = daemon.tcp
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=daemon.token, max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello cat"}],
                                            max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 20
    assert text == daemon.client().post(CHAT, chat_body("hello cat"))["choices"][0]["message"]["content"]
    bad = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_curl_streams_over_the_unix_socket(daemon: Daemon) -> None:
    curl = shutil.which("curl")
    if not curl:
        pytest.skip("curl is not installed")
    out = subprocess.run([curl, "-sS", "-N", "--unix-socket", str(daemon.socket_path),
                          "http://localhost/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(chat_body("hello cat", stream=True))],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and out.endswith("data: [DONE]\n\n")
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- metrics ---------------------------------------------------------------------------------

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def scrape(d: Daemon) -> dict[str, float]:
    reply = d.client().request("GET", "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, float] = {}
    types: dict[str, str] = {}
    for line in reply.body.decode().splitlines():
        if line.startswith("# TYPE"):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, f"not a Prometheus sample line: {line!r}"
            samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    for name, kind in {"toolkit_time_to_first_token_seconds": "histogram",
                       "toolkit_time_per_output_token_seconds": "histogram",
                       "toolkit_e2e_request_latency_seconds": "histogram",
                       "toolkit_num_requests_running": "gauge", "toolkit_num_requests_waiting": "gauge",
                       "toolkit_kv_slots_in_use": "gauge", "process_resident_memory_bytes": "gauge",
                       "toolkit_prompt_tokens_total": "counter",
                       "toolkit_generation_tokens_total": "counter"}.items():
        assert types.get(name) == kind, name
    return samples


def test_metrics_parse_and_count(daemon: Daemon) -> None:
    before = scrape(daemon)
    reply = daemon.client().post("/v1/completions", {"prompt": "the cat", "max_tokens": 7, "temperature": 0})
    after = scrape(daemon)
    usage = reply["usage"]
    prompt_delta = after["toolkit_prompt_tokens_total"] - before["toolkit_prompt_tokens_total"]
    assert prompt_delta == usage["prompt_tokens"]
    assert after["toolkit_generation_tokens_total"] - before["toolkit_generation_tokens_total"] == 7
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        name = f"toolkit_{h}"
        assert after[f"{name}_count"] == before[f"{name}_count"] + 1
        assert after[f'{name}_bucket{{le="+Inf"}}'] == after[f"{name}_count"]
    assert after['toolkit_request_success_total{finished_reason="length"}'] >= 1
    assert after["toolkit_num_requests_running"] == 0 and after["process_resident_memory_bytes"] > 1e6


def test_a_prefix_cache_hit_answers_like_a_cold_request(daemon: Daemon) -> None:
    """The daemon's default prefix cache (32-token blocks): the same 40-token prompt again reuses
    its first block; text and logprobs equal the cold answer's. Counted in /v1/status and /metrics."""
    c = daemon.client()
    body = {"prompt": "edge device model token stream " * 8 + "cat", "max_tokens": 12,
            "temperature": 0, "logprobs": 3}
    before, status_before = scrape(daemon), status(daemon)["prefix_cache"]
    cold, warm = c.post("/v1/completions", body), c.post("/v1/completions", body)
    after, cache = scrape(daemon), status(daemon)["prefix_cache"]
    assert cold["usage"]["prompt_tokens"] > 33
    assert cold["choices"][0]["text"] == warm["choices"][0]["text"]
    lp_cold, lp_warm = cold["choices"][0]["logprobs"], warm["choices"][0]["logprobs"]
    assert lp_cold["tokens"] == lp_warm["tokens"]
    assert max(abs(a - b) for a, b in zip(lp_cold["token_logprobs"], lp_warm["token_logprobs"])) < 1e-4
    assert cache["hits"] >= status_before["hits"] + 1 and cache["tokens_reused"] >= 32
    assert cache["budget_bytes"] == 64 << 20 and 0 < cache["bytes"] <= cache["budget_bytes"]
    assert after["toolkit_prefix_cache_hits_total"] - before["toolkit_prefix_cache_hits_total"] >= 1
    assert after["toolkit_prefix_cache_reused_tokens_total"] >= 32
    assert after["toolkit_prefix_cache_entries"] == cache["entries"] > 0


# --- admission, disconnects ------------------------------------------------------------------

def test_queue_overflow_is_refused_at_once_with_503(slow_daemon: Daemon) -> None:
    running, _ = open_stream(slow_daemon.socket_path, chat_body("hello cat", max_tokens=40))
    queued: list[Any] = []
    t = threading.Thread(target=lambda: queued.append(
        slow_daemon.client().post("/v1/completions", {"prompt": "cat", "max_tokens": 2, "temperature": 0})))
    t.start()
    try:
        assert wait_for(lambda: status(slow_daemon)["scheduler"]["waiting"] == 1)
        t0 = time.monotonic()
        reply = slow_daemon.client().request("POST", "/v1/completions", {"prompt": "dog", "max_tokens": 2})
        assert time.monotonic() - t0 < 2.0  # refused at once, not after waiting
        assert reply.status == 503 and reply.headers.get("Retry-After")
        assert reply.json()["error"]["code"] == "overloaded"
    finally:
        running.close()  # frees the slot: the queued request runs
        t.join(20)
    assert queued and queued[0]["usage"]["completion_tokens"] == 2


def test_client_disconnect_frees_the_slot(slow_daemon: Daemon) -> None:
    before = scrape(slow_daemon)
    sock, _ = open_stream(slow_daemon.socket_path, chat_body("hello dog", max_tokens=50))
    assert status(slow_daemon)["scheduler"]["running"] == 1
    sock.close()
    assert wait_for(lambda: status(slow_daemon)["scheduler"]["running"] == 0, 5.0)
    after = scrape(slow_daemon)
    key = 'toolkit_request_failure_total{reason="client_disconnect"}'
    assert after.get(key, 0) > before.get(key, 0)
    reply = slow_daemon.client().post("/v1/completions", {"prompt": "cat", "max_tokens": 2, "temperature": 0})
    assert reply["usage"]["completion_tokens"] == 2


def test_a_non_streaming_client_that_leaves_frees_its_slot_while_tokens_flow(slow_daemon: Daemon) -> None:
    """Tokens arrive every 50 ms, more often than the poll that looks for a gone client: the
    disconnect must still be noticed before the 50 tokens (2.5 s) are done."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(slow_daemon.socket_path))
    payload = json.dumps({"messages": [{"role": "user", "content": "hello dog"}], "max_tokens": 50,
                          "temperature": 1.0, "seed": 1}).encode()  # sampled: no drafts, one token a step
    s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
              + payload)
    assert wait_for(lambda: status(slow_daemon)["scheduler"]["running"] == 1, 5.0)
    time.sleep(0.2)  # some tokens are out
    s.close()
    assert wait_for(lambda: status(slow_daemon)["scheduler"]["running"] == 0, 1.5)
    reply = slow_daemon.client().post("/v1/completions", {"prompt": "cat", "max_tokens": 2, "temperature": 0})
    assert reply["usage"]["completion_tokens"] == 2


# --- lifecycle -------------------------------------------------------------------------------

def test_sigterm_drains_the_inflight_stream_then_exits_0(llama_bundle: Path, daemons: list[Daemon]) -> None:  # noqa: F811
    d = start_daemon(llama_bundle, "--slots", "1", slow_step_s=0.04)
    daemons.append(d)
    sock, head = open_stream(d.socket_path, chat_body("hello cat", max_tokens=30))
    d.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: not d.socket_path.exists(), 5.0)  # stops accepting at once
    with pytest.raises(DaemonError):
        d.client(timeout=5).get("/v1/models")
    body = (head + read_to_end(sock)).decode()
    sock.close()
    events = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finals[-1] == "length"  # completed, not cut
    assert d.proc.wait(15) == 0
    assert not d.socket_path.exists()


def test_sigusr1_is_logged_and_sighup_drains_like_sigterm(llama_bundle: Path,  # noqa: F811
                                                          daemons: list[Daemon]) -> None:  # noqa: F811
    """Their default action killed the daemon mid-stream (exit -1/-10, no drain, socket left)."""
    d = start_daemon(llama_bundle, "--slots", "1", slow_step_s=0.04)
    daemons.append(d)
    sock, head = open_stream(d.socket_path, chat_body("hello cat", max_tokens=20))
    d.proc.send_signal(signal.SIGUSR1)
    assert wait_for(lambda: "ignoring SIGUSR1" in d.log())
    assert d.proc.poll() is None and status(d)["state"] == "ready"
    d.proc.send_signal(signal.SIGHUP)  # a closed terminal: the stream in flight still completes
    body = (head + read_to_end(sock)).decode()
    sock.close()
    assert '"finish_reason": "length"' in body and "data: [DONE]" in body
    assert d.proc.wait(15) == 0 and not d.socket_path.exists()


def test_drain_timeout_aborts_what_is_still_running(llama_bundle: Path, daemons: list[Daemon]) -> None:  # noqa: F811
    d = start_daemon(llama_bundle, "--slots", "1", "--drain-timeout", "0.3", slow_step_s=0.05)
    daemons.append(d)
    sock, head = open_stream(d.socket_path, chat_body("hello cat", max_tokens=60))
    d.proc.send_signal(signal.SIGTERM)
    body = (head + read_to_end(sock)).decode()
    finals = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in body.splitlines()
              if line.startswith("data: {")]
    assert finals[-1] == "abort" and "data: [DONE]" in body.split("abort")[-1]
    assert d.proc.wait(15) == 0


def test_stale_socket_file_is_replaced(llama_bundle: Path, daemons: list[Daemon],  # noqa: F811
                                       socket_dir: Path) -> None:  # noqa: F811
    path = socket_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a crashed daemon leaves behind
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    d = start_daemon(llama_bundle, socket_path=path)
    daemons.append(d)
    assert d.client().get("/v1/models")["data"]


def test_live_socket_and_non_socket_paths_are_refused(llama_bundle: Path, tmp_path: Path,  # noqa: F811
                                                      socket_dir: Path) -> None:  # noqa: F811
    path = socket_dir / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    plain = tmp_path / "plain-file"
    plain.write_text("not a socket")
    try:
        for target, message in ((path, "already listening"), (plain, "not a socket")):
            out = subprocess.run([sys.executable, "-m", "toolkit", "serve", str(llama_bundle), "--socket",
                                  str(target)], capture_output=True, text=True, timeout=30, cwd=REPO)
            assert out.returncode == 1 and message in out.stderr, out.stderr
        assert plain.read_text() == "not a socket" and path.exists()
    finally:
        listener.close()


def test_tcp_without_a_token_file_is_refused(llama_bundle: Path, socket_dir: Path) -> None:  # noqa: F811
    out = subprocess.run([sys.executable, "-m", "toolkit", "serve", str(llama_bundle), "--socket",
                          str(socket_dir / "x.sock"), "--tcp", "127.0.0.1:1"],
                         capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 1 and "--token-file" in out.stderr


def test_a_tcp_port_in_use_is_refused_at_once(llama_bundle: Path, socket_dir: Path) -> None:  # noqa: F811
    """The TCP listener fails after the Unix one exists: both daemons used to hang for good there
    (socketserver's shutdown() waits for a serve_forever that never started)."""
    import secrets
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    token = socket_dir / "token"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    token.chmod(0o600)
    port = busy.getsockname()[1]
    try:
        for argv in (["-m", "toolkit", "serve", str(llama_bundle)],
                     ["-m", "device.serve.deploy", "--store", str(socket_dir / "store")]):
            sock = socket_dir / "d.sock"
            try:
                out = subprocess.run([sys.executable, *argv, "--socket", str(sock), "--tcp",
                                      f"127.0.0.1:{port}", "--token-file", str(token)],
                                     capture_output=True, text=True, timeout=60, cwd=REPO)
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"{argv[1]} hung on a --tcp port in use: {e.stderr!r}")
            text = out.stderr + out.stdout  # the store daemon prints its error to stdout
            assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in text, text
            assert "Traceback" not in text and not sock.exists()
    finally:
        busy.close()


# --- encoders --------------------------------------------------------------------------------

def test_kserve_infer_and_embeddings_on_an_encoder(encoder_daemon: Daemon, tiny_bundle: Any) -> None:  # noqa: F811
    c = encoder_daemon.client()
    model = c.get("/v1/models")["data"][0]["id"]
    meta = c.get(f"/v2/models/{model}")
    assert meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["datatype"] == "FP32"
    texts = ["hello world", "the water is long"]
    out = c.post(f"/v2/models/{model}/infer", {"id": "r1", "inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": texts}]})
    assert out["id"] == "r1" and out["model_name"] == model
    emb = out["outputs"][0]
    assert emb["datatype"] == "FP32" and emb["shape"] == [2, 32] and len(emb["data"]) == 64
    vecs = np.array(emb["data"], dtype=np.float32).reshape(2, 32)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)  # normalize=True pooling
    # the same through /v1/embeddings, as floats and as base64
    floats = c.post("/v1/embeddings", {"input": texts, "model": model})
    assert np.allclose([d["embedding"] for d in floats["data"]], vecs, atol=1e-6)
    b64 = c.post("/v1/embeddings", {"input": texts, "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(b64["data"][1]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats["data"][1]["embedding"], dtype=np.float32))
    # and against the runtime in-process
    from device.runtime.runner import load_bundle
    from device.serve.embedder import EmbeddingEngine

    runner = load_bundle(tiny_bundle("bert"), threads=1)
    ref = EmbeddingEngine(runner.backend, runner.manifest.pooling).embed(
        [runner.tokenizer.encode(t) for t in texts])
    assert np.allclose(ref, vecs, atol=1e-6)


@pytest.mark.parametrize("inputs,needle", [
    ([{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}], "holds 3"),
    ([{"name": "text", "datatype": "BYTES", "shape": [2, 1], "data": ["a"]}], "holds 2"),
    ([{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}], "must be BYTES"),
    ([{"name": "text", "datatype": "BYTES", "shape": [1], "data": [5]}], "not a valid BYTES"),
    ([{"name": "text", "datatype": "INT8", "shape": [1], "data": [300]}], "not a valid INT8"),
    ([{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "one input 'text'"),
    ([{"name": "text", "datatype": "STRING", "shape": [1], "data": ["a"]}], "unknown datatype"),
    ([{"name": "text", "datatype": "BYTES", "shape": [-1], "data": ["a"]}], "non-negative"),
    ([], "non-empty list"),
])
def test_kserve_infer_validates_shape_datatype_and_data(encoder_daemon: Daemon, inputs: Any,  # noqa: F811
                                                         needle: str) -> None:
    model = encoder_daemon.client().get("/v1/models")["data"][0]["id"]
    code, err = raw_request(encoder_daemon.socket_path, "POST", f"/v2/models/{model}/infer",
                            json.dumps({"inputs": inputs}).encode())
    assert code == 400 and needle in err["error"], err
    assert encoder_daemon.client().request("GET", "/v2/health/ready").status == 200


def test_text_routes_refuse_an_encoder(encoder_daemon: Daemon) -> None:  # noqa: F811
    reply = encoder_daemon.client().request("POST", CHAT, chat_body("hi"))
    assert reply.status == 400 and reply.json()["error"]["code"] == "wrong_model_kind"


def test_unix_endpoint_without_daemon_is_a_clear_error(socket_dir: Path) -> None:  # noqa: F811
    with pytest.raises(DaemonError, match="no daemon is listening"):
        DaemonClient(Endpoint.unix(socket_dir / "none.sock")).get("/v1/status")
