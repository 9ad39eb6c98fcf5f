"""Where a daemon is and how to open a connection to it: a Unix socket, TCP, or TLS over TCP.

    unix:///run/toolkit/api.sock
    tcp://192.168.1.20:8080                       plain HTTP: a loopback or a trusted wire only
    https://192.168.1.20:8443?pin=sha256:HEX      TLS, the board's certificate pinned
    https://orin.lab:8443?ca=/etc/toolkit/ca.pem  TLS, verified against a CA (and the host name)
    tcps://...                                    the same as https://

A pin is the SHA-256 of the certificate's DER bytes, which the daemon logs when it starts
(`TLS certificate ...: pin it with sha256:...`): the usual way to trust a self-signed board
certificate without running a CA. With neither pin nor CA the system's CAs verify it. Either
way the bearer token is sent only after the peer is verified.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from bundle.errors import ToolkitError

FORMS = ("unix:///path/to.sock, tcp://HOST:PORT, or https://HOST:PORT?pin=sha256:HEX "
         "(or ?ca=FILE)")
TLS_SCHEMES = ("https", "tcps")


@dataclass(frozen=True)
class Trust:
    """How a TLS client checks the daemon: a pinned certificate, or a CA file (None: the
    system's CAs)."""

    pin: str | None = None  # "sha256:<64 hex>"
    ca_file: str | None = None

    def __post_init__(self) -> None:
        if self.pin is not None and not _valid_pin(self.pin):
            raise ToolkitError(f"pin {self.pin!r} is not sha256:<64 hex digits>",
                               hint="copy it from the daemon's start-up log line 'pin it with ...'")
        if self.pin and self.ca_file:
            raise ToolkitError("give ?pin= or ?ca=, not both")

    def context(self) -> ssl.SSLContext:
        if self.pin:  # the pin is checked after the handshake (check_pin); no chain to verify
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as e:
                raise ToolkitError(f"cannot load the CA file {self.ca_file}: {e}") from e
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def check(self, sock: ssl.SSLSocket, where: str) -> None:
        """Refuse a peer whose certificate is not the pinned one (before anything is sent)."""
        if not self.pin:
            return
        der = sock.getpeercert(binary_form=True) or b""
        got = "sha256:" + hashlib.sha256(der).hexdigest()
        if got != self.pin.lower():
            sock.close()
            raise ToolkitError(f"{where} presented a certificate that is not the pinned one "
                               f"(got {got})", hint="if the board's certificate was replaced on "
                               "purpose, re-add the device with the new pin; otherwise something "
                               "else answers at that address")


def _valid_pin(pin: str) -> bool:
    algo, _, digest = pin.partition(":")
    return algo == "sha256" and len(digest) == 64 and all(c in "0123456789abcdefABCDEF" for c in digest)


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "unix" | "tcp" | "tls"
    path: Path | None = None
    host: str = "127.0.0.1"
    port: int = 0
    token: str | None = None
    trust: Trust | None = None  # kind "tls" only

    @classmethod
    def unix(cls, path: Path | str) -> Endpoint:
        return cls("unix", path=Path(path))

    @classmethod
    def tcp(cls, host: str, port: int, token: str | None = None) -> Endpoint:
        return cls("tcp", host=host, port=port, token=token)

    @classmethod
    def tls(cls, host: str, port: int, token: str | None = None, trust: Trust | None = None) -> Endpoint:
        return cls("tls", host=host, port=port, token=token, trust=trust or Trust())

    @classmethod
    def parse(cls, uri: str, token: str | None = None) -> Endpoint:
        """One of FORMS; a TCP or TLS endpoint without a token takes $TOOLKIT_TOKEN."""
        parts = urlsplit(uri)
        if parts.scheme == "unix" and parts.path and not parts.netloc:
            return cls.unix(parts.path)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme in ("tcp", *TLS_SCHEMES) and parts.hostname and port:
            token = token or os.environ.get("TOOLKIT_TOKEN")
            if parts.scheme == "tcp":
                return cls.tcp(parts.hostname, port, token)
            query = parse_qs(parts.query)
            return cls.tls(parts.hostname, port, token,
                           Trust(pin=query.get("pin", [None])[0], ca_file=query.get("ca", [None])[0]))
        raise ToolkitError(f"{uri!r} is not a daemon address", hint=f"use one of: {FORMS}")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.kind == 'tls' else 'tcp'}://{host}:{self.port}"

    def failure_hint(self, e: BaseException) -> str | None:
        """What to do about a connection that failed with `e`, where the address itself is the
        likely mistake: a self-signed board certificate without a pin, or plain tcp:// to a
        daemon that speaks TLS (it drops the connection, or answers bytes that are not HTTP)."""
        if self.kind == "tls" and isinstance(e, ssl.SSLCertVerificationError) and self.trust \
                and not (self.trust.pin or self.trust.ca_file):
            return ("a board's certificate is usually self-signed: pin it, https://HOST:PORT?pin=sha256:... "
                    "(the daemon logs 'pin it with ...' when it starts), or give ?ca=FILE")
        if self.kind == "tcp" and isinstance(e, (ConnectionResetError, http.client.BadStatusLine)):
            return ("a daemon started with --tls-cert speaks TLS: address it as "
                    "https://HOST:PORT?pin=sha256:... instead of tcp://")
        return None

    def connection(self, timeout: float | None) -> http.client.HTTPConnection:
        """A fresh http.client connection (it connects on its first request)."""
        if self.kind == "unix":
            assert self.path is not None
            return UnixHTTPConnection(self.path, timeout)
        if self.kind == "tls":
            assert self.trust is not None
            return PinnedHTTPSConnection(self.host, self.port, self.trust, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def socket(self, timeout: float | None) -> socket.socket:
        """A connected (and for TLS, verified) socket, for callers that speak HTTP themselves."""
        if self.kind == "unix":
            assert self.path is not None
            return connect_unix(self.path, timeout)
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.kind != "tls":
            return sock
        assert self.trust is not None
        try:
            tls = self.trust.context().wrap_socket(sock, server_hostname=self.host)
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        self.trust.check(tls, str(self))
        return tls


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS whose peer is checked against a Trust right after the handshake, before the
    request (and its bearer token) is written."""

    def __init__(self, host: str, port: int, trust: Trust, timeout: float | None) -> None:
        super().__init__(host, port, timeout=timeout, context=trust.context())
        self.trust = trust

    def connect(self) -> None:
        super().connect()
        assert isinstance(self.sock, ssl.SSLSocket)
        self.trust.check(self.sock, f"https://{self.host}:{self.port}")


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
