"""Host-side client of the daemon: HTTP/1.1 over a Unix socket or TCP, standard library only.

    client = DaemonClient(Endpoint.unix("/run/user/1000/toolkit.sock"))
    client.get("/v1/status")
    for event in client.stream("/v1/chat/completions", {...,"stream": True}): ...

Where a daemon is:
  --socket PATH                       a Unix socket (default: the daemon's default path)
  --device NAME                       looked up in ~/.config/toolkit/devices.json:
                                        {"jetson": "tcp://192.168.1.20:8080",
                                         "local": "unix:///run/user/1000/toolkit.sock",
                                         "lab": {"uri": "tcp://10.0.0.5:8080", "token_file": "~/.lab-token"}}
A TCP endpoint sends `Authorization: Bearer` with the token from the entry's token_file, or
$TOOLKIT_TOKEN.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bundle.errors import ToolkitError
from device.serve.httpd import default_socket_path


class DaemonError(ToolkitError):
    """The daemon could not be reached, or answered with an error (status is then set)."""

    def __init__(self, message: str, hint: str | None = None, status: int | None = None,
                 body: Any = None) -> None:
        super().__init__(message, hint)
        self.status, self.body = status, body


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "unix" | "tcp"
    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None

    @classmethod
    def unix(cls, path: Path | str) -> Endpoint:
        return cls("unix", path=Path(path))

    @classmethod
    def tcp(cls, host: str, port: int, token: str | None = None) -> Endpoint:
        return cls("tcp", host=host, port=port, token=token)

    @classmethod
    def parse(cls, uri: str, token: str | None = None) -> Endpoint:
        """unix:///path.sock | tcp://host:port"""
        parts = urlsplit(uri)
        if parts.scheme == "unix" and parts.path:
            return cls.unix(parts.path)
        if parts.scheme == "tcp" and parts.hostname and parts.port:
            return cls.tcp(parts.hostname, parts.port, token or os.environ.get("TOOLKIT_TOKEN"))
        raise ToolkitError(f"{uri!r} is not a daemon address",
                           hint="use unix:///path/to.sock or tcp://host:port")

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.kind == "unix" else f"tcp://{self.host}:{self.port}"


def devices_file() -> Path:
    """The registry `toolkit devices` writes (host/deploy.py): $TOOLKIT_CONFIG_DIR, else
    $XDG_CONFIG_HOME/toolkit, else ~/.config/toolkit; the same entry format is read here."""
    if os.environ.get("TOOLKIT_CONFIG_DIR"):
        return Path(os.environ["TOOLKIT_CONFIG_DIR"]) / "devices.json"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "toolkit" / "devices.json"


def resolve_device(name: str) -> Endpoint:
    """A device name -> its endpoint, from devices.json (the registry a later issue manages)."""
    path = devices_file()
    try:
        registry = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"cannot read the devices registry {path}: {e}") from e
    entry = registry.get(name) if isinstance(registry, dict) else None
    if entry is None:
        known = ", ".join(sorted(registry)) if isinstance(registry, dict) and registry else "none"
        raise ToolkitError(f"device {name!r} is unknown (devices in {path}: {known})",
                           hint=f'add it to {path}, e.g. {{"{name}": "tcp://HOST:PORT"}}, or pass '
                                "--socket PATH for a daemon on this machine")
    if isinstance(entry, str):
        return Endpoint.parse(entry)
    if isinstance(entry, dict) and isinstance(entry.get("uri"), str):
        token = None
        if entry.get("token_file"):
            token_path = Path(str(entry["token_file"])).expanduser()
            try:
                token = token_path.read_text(encoding="utf-8").split()[0]
            except (OSError, IndexError) as e:
                raise ToolkitError(f"device {name!r}: cannot read its token file {token_path}") from e
        return Endpoint.parse(entry["uri"], token)
    raise ToolkitError(f"device {name!r} in {path} is neither a URI nor an object with 'uri'")


def endpoint_for(socket_path: Path | None = None, device: str | None = None) -> Endpoint:
    if socket_path and device:
        raise ToolkitError("give --socket or --device, not both")
    if device:
        return resolve_device(device)
    return Endpoint.unix(socket_path or default_socket_path())


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over AF_UNIX: the Host header says localhost, the socket is a path."""

    def __init__(self, path: Path, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = str(path)

    def connect(self) -> None:
        self.sock = connect_unix(self.socket_path, self.timeout)


CONNECT_BUSY_S = 2.0  # how long a connect keeps retrying a Unix socket whose backlog is full


def connect_unix(path: str | Path, timeout: float | None) -> socket.socket:
    """A connected AF_UNIX stream socket. With a timeout the socket is non-blocking inside, and
    a Unix socket whose listen backlog is full answers EAGAIN at once (TCP would retry its SYN),
    so a burst of clients retries for up to CONNECT_BUSY_S before giving up."""
    deadline = time.monotonic() + CONNECT_BUSY_S
    delay = 0.002
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise
        except OSError:
            sock.close()
            raise
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.1)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class DaemonClient:
    def __init__(self, endpoint: Endpoint, timeout: float | None = 600.0) -> None:
        self.endpoint, self.timeout = endpoint, timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.endpoint.kind == "unix":
            assert self.endpoint.path is not None
            return UnixHTTPConnection(self.endpoint.path, self.timeout)
        return http.client.HTTPConnection(self.endpoint.host, self.endpoint.port, timeout=self.timeout)

    def _send(self, method: str, path: str, body: Any = None) -> tuple[http.client.HTTPConnection,
                                                                       http.client.HTTPResponse]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.endpoint.token:
            headers["Authorization"] = f"Bearer {self.endpoint.token}"
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            return conn, conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            raise DaemonError(f"no daemon is listening at {self.endpoint}",
                              hint="start one with `toolkit serve BUNDLE`, or pass --socket/--device") from e
        except OSError as e:  # timeouts, resets, http.client's own errors
            conn.close()
            raise DaemonError(f"talking to the daemon at {self.endpoint} failed: {e}") from e

    def request(self, method: str, path: str, body: Any = None) -> Reply:
        conn, resp = self._send(method, path, body)
        try:
            return Reply(resp.status, dict(resp.getheaders()), resp.read())
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(f"the daemon at {self.endpoint} broke off its answer: {e}") from e
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        return self._checked(self.request("GET", path))

    def post(self, path: str, body: Any) -> Any:
        return self._checked(self.request("POST", path, body))

    def _checked(self, reply: Reply) -> Any:
        if reply.status >= 400:
            raise self._error(reply.status, reply.body)
        return reply.json()

    def _error(self, status: int, body: bytes) -> DaemonError:
        try:
            obj = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = None
        err = obj.get("error") if isinstance(obj, dict) else None
        message = err.get("message") if isinstance(err, dict) else err
        return DaemonError(f"the daemon answered {status}: {message or body[:200]!r}",
                           status=status, body=obj)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST with stream=true; yields each SSE data object until `data: [DONE]`. An error
        event inside the stream raises DaemonError."""
        conn, resp = self._send("POST", path, {**body, "stream": True})
        try:
            if resp.status >= 400:
                raise self._error(resp.status, resp.read())
            for line in resp:
                text = line.decode("utf-8").rstrip("\r\n")
                if not text.startswith("data:"):
                    continue  # blank separators and ": ping" comments
                data = text[5:].strip()
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise self._error(200, data.encode())
                yield event
        except (OSError, http.client.HTTPException) as e:
            raise DaemonError(f"the stream from {self.endpoint} broke off: {e}") from e
        finally:
            conn.close()


def stream_text(client: DaemonClient, prompt: str, chat: bool = True, **fields: Any
                ) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(text delta, None) for each piece of the answer, then ("", last event with usage)."""
    body: dict[str, Any]
    if chat:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}
    else:
        path, body = "/v1/completions", {"prompt": prompt}
    body.update({k: v for k, v in fields.items() if v is not None},
                stream_options={"include_usage": True})
    for event in client.stream(path, body):
        if event.get("usage"):
            yield "", event
            continue
        for choice in event.get("choices", []):
            text = choice.get("delta", {}).get("content") if chat else choice.get("text")
            if text:
                yield text, None
