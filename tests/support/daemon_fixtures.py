"""Fixtures for the daemon tests: tiny bundles built in-test, and real daemon processes.

The tiny Llama is a random transformers checkpoint saved with a word-level tokenizer made here
(no download; every generated token decodes to whole words, so stream deltas and stop strings
are easy to reason about) whose EOS is never the likeliest token, so streams run to max_tokens.
It goes through the real convert pipeline. The encoder is the shared tiny BERT of conftest.py.

Daemons are real processes (`python -m toolkit serve ...` or `toolkit serve`), on temporary
sockets; every wait is bounded and every process is killed in teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from paths import REPO  # noqa: E402

HARNESS = Path(__file__).with_name("daemon_harness.py")
WORDS = ("the a an of to in on at for with and or but is are was were be been it this that "
         "these those cat dog bird fish tree road car house river hill sun moon star sky rain "
         "snow wind fire water stone light dark red blue green small big old new fast slow "
         "good bad happy sad one two three four five six seven eight nine ten run walk fly "
         "swim read write sing play eat drink sleep think know see hear say go come make take "
         "give find tell ask work call try feel leave put mean keep let begin seem help talk "
         "turn start show move live believe bring happen hello world edge device model token "
         "stream socket daemon slot queue cache metric user assistant system").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TINY_MAX_SEQ = 64
TINY_SLOTS = 4


def _word_tokenizer() -> Any:
    """A tokenizers WordLevel tokenizer over WORDS with an im_start/im_end chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(WORDS)) + list(".,!?"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, tidies punctuation
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer (400 tokens, trained here on WORDS and a little JSON) with the
    same specials and chat template: one the grammar engine (llguidance) reads, which refuses
    the word tokenizer's WordPiece decoder, so response_format runs on a tiny model too."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = " ".join(WORDS)
    tok.train_from_iterator([text, '{"name": "cat", "count": 12}', text[::-1]] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(folder: Path, byte_level: bool = False) -> Path:
    """A 2-layer random Llama with GQA (4 heads / 2 kv heads) and the word tokenizer (or the
    byte-level one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_tokenizer() if byte_level else _word_tokenizer()
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=eos,
                         pad_token_id=1, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Random weights emit EOS now and then; a test that wants a long stream wants it never.
        # A zero lm_head row gives EOS logit 0, below the max of ~100 random logits.
        model.lm_head.weight[eos].zero_()
        model.lm_head.weight *= 8.0  # sharper distributions: fewer near-ties in greedy argmax
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def convert_folder(folder: Path, out: Path, max_seq: int = TINY_MAX_SEQ, batch: int = TINY_SLOTS) -> Path:
    from convert.pipeline import convert_model

    convert_model(str(folder), "cpu", out, max_seq=max_seq, batch=batch, threads=1)
    return out


# --- daemon processes --------------------------------------------------------------------------

def short_socket_dir() -> Path:
    """AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can exceed that."""
    return Path(tempfile.mkdtemp(prefix="tkd-", dir="/tmp"))


def serve_store_in_thread(store: Path, **kwargs: Any) -> tuple[threading.Event, threading.Thread]:
    """device.serve.deploy.serve_store in a thread of this process, once it is ready: (the event
    that stops it, its thread). A store that fails to start raises here."""
    from device.serve.deploy import serve_store

    stop, ready = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def body() -> None:
        try:
            serve_store(store, stop=stop, ready=ready.set, **kwargs)
        except BaseException as e:  # reported below
            failed.append(e)
            ready.set()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    assert ready.wait(20)
    if failed:
        raise failed[0]
    return stop, thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path
    tcp: tuple[str, int] | None = None
    token: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def client(self, **kw: Any) -> Any:
        from host.client import DaemonClient, Endpoint

        return DaemonClient(Endpoint.unix(self.socket_path), **kw)

    def tcp_client(self, token: str | None = None) -> Any:
        from host.client import DaemonClient, Endpoint

        assert self.tcp is not None
        return DaemonClient(Endpoint.tcp(*self.tcp, token=token if token is not None else self.token))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.log_path.parent, ignore_errors=True)  # socket dir, log, token file
        return int(self.proc.returncode)


def start_daemon(bundle: Path, *args: str, socket_path: Path | None = None, slow_step_s: float = 0.0,
                 tcp: bool = False, token: str = "s3cret-token-for-tests-0123456789", wait: bool = True,
                 timeout: float = 60.0, via_cli: bool = False) -> Daemon:
    """Start a daemon process and wait (bounded) until /v2/health/ready answers 200.

    slow_step_s > 0 runs it through tests/support/daemon_harness.py, which delays every backend step:
    a slow device, so that queueing, disconnects and drains can be observed deterministically."""
    sock_dir = short_socket_dir()
    socket_path = socket_path or sock_dir / "d.sock"
    log_path = sock_dir / "daemon.log"
    cmd = ([sys.executable, str(HARNESS), str(slow_step_s)] if slow_step_s
           else ([shutil.which("toolkit") or "toolkit", "serve"] if via_cli
                 else [sys.executable, "-m", "toolkit", "serve"]))
    cmd += [str(bundle), "--socket", str(socket_path), "--threads", "1", *args]
    tcp_addr = None
    if tcp:
        tcp_addr = ("127.0.0.1", free_port())
        token_file = sock_dir / "token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        cmd += ["--tcp", f"{tcp_addr[0]}:{tcp_addr[1]}", "--token-file", str(token_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                                preexec_fn=sighup_default)
    daemon = Daemon(proc, socket_path, log_path, tcp_addr, token if tcp else None)
    if wait:
        wait_ready(daemon, timeout)
    return daemon


def wait_ready(daemon: Daemon, timeout: float = 60.0) -> None:
    from host.client import DaemonClient, DaemonError, Endpoint

    deadline = time.monotonic() + timeout
    client = DaemonClient(Endpoint.unix(daemon.socket_path), timeout=5)
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            if client.request("GET", "/v2/health/ready").status == 200:
                return
        except DaemonError:
            pass
        time.sleep(0.05)
    daemon.proc.kill()
    raise RuntimeError(f"daemon not ready after {timeout} s:\n{daemon.log()}")


_BUILT: dict[str, Path] = {}  # test modules import the fixture, each gets its own FixtureDef:
                              # this module-level cache makes it one build per session anyway


@pytest.fixture(scope="session")
def llama_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as a bundle: max_seq 64, 4 slots."""
    if "llama" not in _BUILT:
        root = tmp_path_factory.mktemp("daemon-llama")
        _BUILT["llama"] = convert_folder(make_tiny_llama(root / "tiny-llama"), root / "bundle")
    return _BUILT["llama"]


@pytest.fixture(scope="session")
def byte_llama_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with the byte-level tokenizer (response_format works on it): max_seq 64,
    4 slots."""
    if "byte-llama" not in _BUILT:
        root = tmp_path_factory.mktemp("daemon-byte-llama")
        _BUILT["byte-llama"] = convert_folder(make_tiny_llama(root / "tiny-llama", byte_level=True),
                                              root / "bundle")
    return _BUILT["byte-llama"]


@pytest.fixture(scope="module")
def encoder_daemon(tiny_bundle: Any) -> Iterator[Daemon]:
    """A daemon serving the shared tiny BERT bundle (conftest.py), one per test module."""
    d = start_daemon(tiny_bundle("bert"))
    yield d
    d.stop()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Collects daemons a test starts; all are stopped (SIGTERM, then SIGKILL) at teardown."""
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)
        shutil.rmtree(d.log_path.parent, ignore_errors=True)


def sighup_default() -> None:
    """In the daemon's child before exec: SIGHUP at its default, as a terminal starts it. A test
    run under nohup would hand its ignore down, and the daemon keeps an inherited ignore."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short temporary folder for socket files, removed afterwards."""
    path = short_socket_dir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def raw_request(sock_path: Path, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | None]:
    """A request with arbitrary bytes as body (our client only sends valid JSON)."""
    from host.client import UnixHTTPConnection

    conn = UnixHTTPConnection(sock_path, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None
    finally:
        conn.close()
