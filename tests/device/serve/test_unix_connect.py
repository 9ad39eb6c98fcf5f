"""connect_unix: a Unix socket whose listen backlog is full answers EAGAIN at once; the client
retries for a while instead of failing the request (TCP would have retried its SYN)."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from device.serve.httpd import UnixServer
from host import client


def full_listener(path: Path) -> tuple[socket.socket, list[socket.socket]]:
    """A listener with backlog 0 that nobody accepts from, filled until connects fail."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(0)
    held = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return srv, held
        held.append(s)


def test_a_full_backlog_is_retried_until_the_server_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        path = Path(d) / "s.sock"
        srv, held = full_listener(path)
        plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        plain.settimeout(5.0)  # as the clients set it: non-blocking inside
        with pytest.raises(BlockingIOError):  # what a client got before: EAGAIN at once
            plain.connect(str(path))
        plain.close()
        monkeypatch.setattr(client, "CONNECT_BUSY_S", 0.2)
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):  # nobody ever accepts: it gives up after a while
            client.connect_unix(path, timeout=5.0)
        assert time.monotonic() - t0 >= 0.15
        monkeypatch.setattr(client, "CONNECT_BUSY_S", 5.0)
        threading.Timer(0.1, lambda: srv.accept()[0].close()).start()  # room frees up
        sock = client.connect_unix(path, timeout=5.0)
        sock.close()
        for s in held:
            s.close()
        srv.close()


def test_the_daemon_listens_with_room_for_a_burst() -> None:
    assert UnixServer.request_queue_size >= 64
