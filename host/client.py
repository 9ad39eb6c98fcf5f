"""Host-side client of the daemon: HTTP/1.1 over a Unix socket, TCP or TLS, standard library only.

    client = DaemonClient(Endpoint.unix("/run/user/1000/toolkit.sock"))
    client.get("/v1/status")
    for event in client.stream("/v1/chat/completions", {...,"stream": True}): ...

Where a daemon is:
  --socket PATH                       a Unix socket (default: the daemon's default path)
  --device NAME                       looked up in the registry `toolkit devices` keeps
                                      (host/devices.py; address forms: host/endpoint.py)
A TCP or TLS endpoint sends `Authorization: Bearer` with the token from the entry's token_file,
or $TOOLKIT_TOKEN.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.errors import ToolkitError
from device.serve.httpd import default_socket_path
from host.endpoint import CONNECT_BUSY_S, Endpoint, Trust, UnixHTTPConnection, connect_unix

__all__ = ["CONNECT_BUSY_S", "DaemonClient", "DaemonError", "Endpoint", "Trust",
           "UnixHTTPConnection", "connect_unix", "endpoint_for", "resolve_device", "stream_text"]


# A daemon that is not ready says which state it is in (the 503's error code); what to do about it
STATE_HINTS = {
    "empty": "its store has no bundle yet: send one with `toolkit deploy BUNDLE --device NAME`",
    "loading": "it is loading its bundle: try again in a moment (`toolkit status` says when it is ready)",
    "switching": "it is switching bundles: try again in a moment (`toolkit status` says when it is ready)",
    "failed": "its bundle failed to load: `toolkit status` says why; deploy a working bundle",
    "draining": "it is shutting down: start it again, or wait for systemd to restart it",
    "benchmarking": "it is running `toolkit bench`: try again when the bench is done",
}


class DaemonError(ToolkitError):
    """The daemon could not be reached, or answered with an error (status is then set)."""

    def __init__(self, message: str, hint: str | None = None, status: int | None = None,
                 body: Any = None) -> None:
        super().__init__(message, hint)
        self.status, self.body = status, body


def resolve_device(name: str) -> Endpoint:
    """A device name -> its endpoint, from the registry `toolkit devices` keeps (host/devices.py)."""
    from host.devices import get_device

    return get_device(name).endpoint()


def endpoint_for(socket_path: Path | None = None, device: str | None = None) -> Endpoint:
    if socket_path and device:
        raise ToolkitError("give --socket or --device, not both")
    if device:
        return resolve_device(device)
    return Endpoint.unix(socket_path or default_socket_path())


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
        return self.endpoint.connection(self.timeout)

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
        except (OSError, http.client.HTTPException) as e:  # timeouts, resets, replies not HTTP
            conn.close()
            raise DaemonError(f"talking to the daemon at {self.endpoint} failed: {e or type(e).__name__}",
                              hint=self.endpoint.failure_hint(e)) from e

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
        code = str(err.get("code")) if isinstance(err, dict) else ""
        # the daemon's message as text (its own "hint:" line included); raw bytes only quoted
        said = message if isinstance(message, str) and message else repr(body[:200])
        return DaemonError(f"the daemon answered {status}: {said}",
                           hint=STATE_HINTS.get(code) if status == 503 else None, status=status, body=obj)

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST with stream=true; yields each SSE data object until `data: [DONE]`. An error
        event inside the stream, or a stream that ends without [DONE], raises DaemonError."""
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
            # every stream the daemon sends ends in [DONE]; one that stops short was cut off
            # (the daemon died or restarted), and its text must not pass for a whole answer
            raise DaemonError(f"the stream from {self.endpoint} ended before it finished "
                              "(the daemon stopped or restarted mid-answer)",
                              hint="check the daemon's log, then run the request again")
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
