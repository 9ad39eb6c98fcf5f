"""The devices registry: names for daemons, so commands take `--device jetson`.

    add_device("jetson", "https://192.168.1.20:8443?pin=sha256:...", new_token=True)
    get_device("jetson").endpoint()          # host/endpoint.py: how to connect

The registry is devices.json in config_dir() ($TOOLKIT_CONFIG_DIR, else
$XDG_CONFIG_HOME/toolkit, else ~/.config/toolkit), written 0600 by rename:

    {"jetson": {"uri": "https://192.168.1.20:8443?pin=sha256:...",
                "token_file": "/home/me/.config/toolkit/tokens/jetson.token"},
     "local":  {"uri": "unix:///run/user/1000/toolkit.sock"},
     "board":  {"uri": "serial:///dev/ttyUSB0?baud=921600",
                "token_file": "/home/me/.config/toolkit/tokens/board.token"}}

(a bare string value is read as {"uri": value}). A generated token (`new_token`) is 32 random
bytes (secrets.token_urlsafe) in tokens/NAME.token beside the registry, mode 0600: the same
line goes into the board's --token-file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from bundle.atomic import write_output
from bundle.errors import ToolkitError
from device.serve.serial_link import DEFAULT_BAUD
from host.endpoint import FORMS, TLS_SCHEMES, Endpoint, Trust

DEVICE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALL_FORMS = f"{FORMS}, or serial:///dev/ttyUSB0[?baud=921600]; add ?token-file=FILE for a token"


def config_dir() -> Path:
    if os.environ.get("TOOLKIT_CONFIG_DIR"):
        return Path(os.environ["TOOLKIT_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "toolkit"


def registry_path() -> Path:
    return config_dir() / "devices.json"


@dataclass(frozen=True)
class Device:
    name: str
    uri: str  # unix:///path | tcp://host:port | https://host:port?pin=.. | serial:///dev/ttyX?baud=N
    token_file: str | None = None

    @property
    def transport(self) -> str:
        scheme = urlsplit(self.uri).scheme
        return "tls" if scheme in TLS_SCHEMES else scheme

    def to_json(self) -> dict[str, str]:
        return {"uri": self.uri, **({"token_file": self.token_file} if self.token_file else {})}

    def endpoint(self) -> Endpoint:
        """Where to connect (HTTP transports only; serial has its own client)."""
        if self.transport == "serial":
            raise ToolkitError(f"device {self.name!r} is a serial device; it takes deploys, "
                               "not API requests", hint="use an HTTP address for this command")
        return Endpoint.parse(self.uri, token_of(self) if self.transport in ("tcp", "tls") else None)


@dataclass(frozen=True)
class Added:
    device: Device
    token: str | None  # a token generated for it (to put on the board), or None


def parse_uri(uri: str) -> tuple[str, str | None]:
    """A device URI -> (the URI to store, token file); ToolkitError with the accepted forms."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    token = query.get("token-file", [None])[0]
    if token:
        token = str(Path(token).expanduser().absolute())
    if parts.scheme == "unix" and parts.path.startswith("/") and not parts.netloc:
        return f"unix://{parts.path}", None
    if parts.scheme == "serial" and parts.path.startswith("/") and not parts.netloc:
        baud = query.get("baud", [str(DEFAULT_BAUD)])[0]
        if not baud.isdigit() or int(baud) <= 0:
            raise ToolkitError(f"{uri!r}: baud {baud!r} is not a number", hint="e.g. ?baud=921600")
        return f"serial://{parts.path}?baud={int(baud)}", token
    if parts.scheme in ("tcp", *TLS_SCHEMES) and parts.hostname:
        try:
            port = parts.port
        except ValueError:
            port = None
        if not port:
            raise ToolkitError(f"{uri!r} has no valid port", hint=f"use one of: {ALL_FORMS}")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        if parts.scheme == "tcp":
            return f"tcp://{host}:{port}", token
        trust = Trust(pin=query.get("pin", [None])[0], ca_file=query.get("ca", [None])[0])
        suffix = ""
        if trust.pin:
            suffix = f"?pin={trust.pin.lower()}"
        elif trust.ca_file:
            ca = Path(trust.ca_file).expanduser().absolute()
            if not ca.is_file():
                raise ToolkitError(f"the CA file {ca} does not exist")
            suffix = f"?ca={quote(str(ca))}"
        return f"https://{host}:{port}{suffix}", token
    raise ToolkitError(f"{uri!r} is not a device address", hint=f"use one of: {ALL_FORMS}")


def load_devices() -> dict[str, Device]:
    path = registry_path()
    if not path.exists():
        return {}
    try:  # a folder or a file we may not read is an error, not an empty registry
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"cannot read the devices registry {path}: {e}",
                           hint="fix or remove the file") from e
    if not isinstance(data, dict):
        raise ToolkitError(f"the devices registry {path} is not a JSON object", hint="fix or remove the file")
    devices = {}
    for name, entry in data.items():
        if isinstance(entry, str):
            devices[name] = Device(name, entry)
        elif isinstance(entry, dict) and isinstance(entry.get("uri"), str):
            token_file = entry.get("token_file")
            devices[name] = Device(name, entry["uri"], str(token_file) if token_file else None)
        else:
            raise ToolkitError(f"device {name!r} in {path} is neither a URI nor an object with 'uri'",
                               hint="fix the entry, or `toolkit devices remove` and add it again")
    return devices


def save_devices(devices: dict[str, Device]) -> Path:
    """Write the registry by rename (readers never see half a file), mode 0600."""
    path = registry_path()
    data: dict[str, Any] = {}
    if path.is_file():  # keep entries other tools wrote in forms we do not model
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
    data = {k: v for k, v in data.items() if k in devices}
    data.update({name: d.to_json() for name, d in devices.items()})
    _write_config(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), "the devices registry")
    return path


def _write_config(path: Path, data: bytes, what: str) -> None:
    """Write one of our config files by rename, mode 0600, in a folder only we may enter (0700).
    A read-only or root-owned config folder (an earlier `sudo toolkit`) must not be a traceback."""
    write_output(path, data, "check that the folder is writable by you and that the path is a file "
                 "(or set $TOOLKIT_CONFIG_DIR to another folder)", what=what, mode=0o600, folder_mode=0o700)


def add_device(name: str, uri: str, replace: bool = False, new_token: bool = False,
               pin_cert: Path | str | None = None) -> Added:
    """Register NAME at URI; with new_token, generate its bearer token (and say it once); with
    pin_cert, pin the board's certificate read from that PEM file (an https:// URI without ?pin=
    or ?ca=)."""
    if not DEVICE_NAME_RE.fullmatch(name):
        raise ToolkitError(f"device name {name!r} is not allowed",
                           hint="use letters, digits, '.', '_' and '-' (64 at most)")
    stored, token_file = parse_uri(uri)
    if pin_cert is not None:
        stored = _pinned(stored, Path(pin_cert))
    if new_token and token_file:
        raise ToolkitError("give ?token-file=FILE or --new-token, not both")
    if new_token and stored.startswith("unix:"):
        raise ToolkitError("a Unix socket takes no token (its file mode guards it)",
                           hint="drop --new-token")
    if token_file and not Path(token_file).is_file():
        raise ToolkitError(f"the token file {token_file} does not exist",
                           hint="write the daemon's token there (chmod 600) first, or pass --new-token")
    devices = load_devices()
    if name in devices and not replace:
        raise ToolkitError(f"device {name!r} already exists ({devices[name].uri})",
                           hint="pass --replace to change it, or remove it first")
    token = None
    if new_token:
        token = secrets.token_urlsafe(32)
        path = config_dir() / "tokens" / f"{name}.token"
        _write_config(path, (token + "\n").encode(), "the token file")
        token_file = str(path)
    devices[name] = Device(name, stored, token_file)
    save_devices(devices)
    return Added(devices[name], token)


def _pinned(stored: str, cert: Path) -> str:
    """The stored https:// URI with the pin of the PEM certificate `cert`."""
    from device.serve.httpd import cert_fingerprint

    if urlsplit(stored).scheme not in TLS_SCHEMES:
        raise ToolkitError(f"--pin-cert pins a TLS certificate, so the address must be https://, "
                           f"not {stored}",
                           hint="e.g. toolkit devices add NAME https://HOST:8443 --pin-cert cert.pem")
    if urlsplit(stored).query:
        raise ToolkitError(f"{stored} already says how to trust the board: give ?pin=/?ca= or --pin-cert, "
                           "not both")
    return f"{stored}?pin={cert_fingerprint(cert)}"


def remove_device(name: str) -> Device:
    devices = load_devices()
    if name not in devices:
        raise _unknown(name, devices)
    gone = devices.pop(name)
    save_devices(devices)
    return gone


def get_device(name: str) -> Device:
    devices = load_devices()
    if name not in devices:
        raise _unknown(name, devices)
    return devices[name]


def _unknown(name: str, devices: dict[str, Device]) -> ToolkitError:
    known = ", ".join(sorted(devices)) or "none"
    return ToolkitError(f"device {name!r} is unknown (registered: {known}; registry {registry_path()})",
                        hint=f"add it: toolkit devices add {name} https://HOST:PORT?pin=... --new-token "
                             "(or tcp://, unix://, serial://)")


def token_of(device: Device) -> str | None:
    """The device's bearer token: its token file's first word, else $TOOLKIT_TOKEN."""
    if device.token_file:
        path = Path(device.token_file).expanduser()
        try:
            return path.read_text(encoding="utf-8").split()[0]
        except (OSError, UnicodeDecodeError, IndexError) as e:  # absent, unreadable, binary, empty
            raise ToolkitError(f"device {device.name!r}: cannot read its token file {path}",
                               hint="check the path and permissions, or re-add the device") from e
    return os.environ.get("TOOLKIT_TOKEN")
