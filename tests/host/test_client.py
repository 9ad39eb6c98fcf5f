"""The host side: endpoints, the devices registry, and `toolkit generate` / `toolkit status`
against a real daemon."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from daemon_fixtures import REPO, Daemon, llama_bundle, short_socket_dir, start_daemon  # noqa: F401

from bundle.errors import ToolkitError
from host.client import Endpoint, endpoint_for, resolve_device
from toolkit.cli import main


@pytest.fixture(scope="module")
def daemon(llama_bundle: Path) -> Iterator[Daemon]:  # noqa: F811
    d = start_daemon(llama_bundle)
    yield d
    d.stop()


def test_endpoint_uris() -> None:
    assert Endpoint.parse("unix:///run/t.sock") == Endpoint.unix("/run/t.sock")
    tcp = Endpoint.parse("tcp://10.0.0.2:8080", token="t")
    assert (tcp.kind, tcp.host, tcp.port, tcp.token) == ("tcp", "10.0.0.2", 8080, "t")
    with pytest.raises(ToolkitError, match="not a daemon address"):
        Endpoint.parse("http://x")


def test_devices_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOOLKIT_CONFIG_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    with pytest.raises(ToolkitError, match="device 'jetson' is unknown"):
        resolve_device("jetson")
    (tmp_path / "toolkit").mkdir()
    token = tmp_path / "token"
    token.write_text("abc\n")
    (tmp_path / "toolkit" / "devices.json").write_text(json.dumps({
        "jetson": "tcp://192.168.1.20:8080", "local": "unix:///tmp/x.sock",
        "lab": {"uri": "tcp://10.0.0.5:9000", "token_file": str(token)}}))
    assert resolve_device("jetson") == Endpoint.tcp("192.168.1.20", 8080)
    assert endpoint_for(device="local") == Endpoint.unix("/tmp/x.sock")
    assert resolve_device("lab").token == "abc"
    with pytest.raises(ToolkitError, match="jetson, lab, local"):
        resolve_device("nano")


def test_generate_streams_the_same_text_as_the_api(daemon: Daemon) -> None:
    expected = daemon.client().post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hello cat"}], "max_tokens": 8, "temperature": 0})
    result = CliRunner().invoke(main, ["generate", "--socket", str(daemon.socket_path), "hello cat",
                                       "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == expected["choices"][0]["message"]["content"]
    assert "8 generated tokens" in result.stderr


def test_generate_without_chat_uses_completions(daemon: Daemon) -> None:
    expected = daemon.client().post("/v1/completions", {"prompt": "the dog", "max_tokens": 5,
                                                         "temperature": 0})
    result = CliRunner().invoke(main, ["generate", "--socket", str(daemon.socket_path), "--no-chat",
                                       "the dog", "--max-tokens", "5"])
    assert result.stdout.rstrip("\n") == expected["choices"][0]["text"]


def test_status_prints_the_status_route(daemon: Daemon) -> None:
    result = CliRunner().invoke(main, ["status", "--socket", str(daemon.socket_path)])
    assert result.exit_code == 0, result.output
    assert "[ready]" in result.stdout and "decode batched" in result.stdout
    raw = CliRunner().invoke(main, ["status", "--socket", str(daemon.socket_path), "--json"])
    assert json.loads(raw.stdout)["scheduler"]["slots"] == 4


def test_a_token_file_that_is_not_text_is_a_clear_error(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path))
    token = tmp_path / "token"
    token.write_bytes(b"\xda\xff\x00binary")  # e.g. a key file given by mistake
    (tmp_path / "devices.json").write_text(json.dumps(
        {"lab": {"uri": "tcp://127.0.0.1:9", "token_file": str(token)}}))
    result = CliRunner().invoke(main, ["devices", "ping", "lab"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # not a traceback
    assert "cannot read its token file" in result.output and "Traceback" not in result.output


def test_a_registry_that_cannot_be_read_or_written_is_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path))
    (tmp_path / "devices.json").mkdir()  # stands for any path we cannot replace (read-only, root-owned)
    r = CliRunner().invoke(main, ["devices", "list"])
    assert r.exit_code == 1 and "cannot read the devices registry" in r.output  # not "no devices"
    r = CliRunner().invoke(main, ["devices", "add", "x", "unix:///tmp/x.sock"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)  # not a traceback
    assert "devices registry" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.json"]  # no temp file left


def test_cli_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["generate", "--device", "nano", "hi"])
    assert result.exit_code == 1 and "device 'nano' is unknown" in result.output
    result = CliRunner().invoke(main, ["status", "--socket", str(tmp_path / "none.sock")])
    assert result.exit_code == 1 and "no daemon is listening" in result.output


def _cut_off_daemon(sock_path: Path) -> threading.Thread:
    """A fake daemon that answers one streamed request with one event and then closes the
    connection without `data: [DONE]` (and without the chunk that ends the response): a daemon
    killed mid-answer."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn, server:
            request = b""
            while b"\r\n\r\n" not in request:  # the headers, then the body they announce
                request += conn.recv(65536)
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < length:
                body += conn.recv(65536)
            event = b'data: {"choices": [{"index": 0, "text": "half an"}]}\n\n'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n"
                         + f"{len(event):x}\r\n".encode() + event + b"\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_generate_cut_off_mid_stream_is_an_error_not_a_short_answer() -> None:
    folder = short_socket_dir()
    try:
        thread = _cut_off_daemon(folder / "d.sock")
        result = CliRunner().invoke(main, ["generate", "--no-chat", "--socket", str(folder / "d.sock"), "hi"])
        thread.join(10)
        assert result.exit_code == 1, result.output
        assert "half an\n" in result.output and "ended before it finished" in result.output
        assert "Traceback" not in result.output
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_generate_on_an_empty_store_daemon_says_to_deploy(tmp_path: Path) -> None:
    folder = short_socket_dir()
    sock = folder / "d.sock"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", "--store", str(tmp_path / "store"),
                             "--socket", str(sock), "--threads", "1"], cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while CliRunner().invoke(main, ["status", "--socket", str(sock)]).exit_code != 0:
            assert time.monotonic() < deadline and proc.poll() is None, "the store daemon did not start"
            time.sleep(0.2)
        result = CliRunner().invoke(main, ["generate", "--socket", str(sock), "hi"])
        assert result.exit_code == 1 and "the daemon is empty" in result.output, result.output
        assert "hint: its store has no bundle yet: send one with `toolkit deploy" in result.output
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
