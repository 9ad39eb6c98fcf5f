"""The systemd unit of the daemon: device/serve/toolkit.service.in, filled in for a board.

    text = render_unit(UnitOptions(tcp="0.0.0.0:8443", socket_group="toolkit"))

The unit runs `VENV/bin/toolkit serve --store ... --socket /run/NAME/toolkit.sock` as a
dedicated system user in the GPU groups, Type=notify (device/serve/notify.py), with the store
under StateDirectory= (/var/lib/NAME) and the TCP token (and TLS key) handed over by systemd
as credentials (LoadCredential=: root-owned files in /etc/NAME that the service user cannot
read; the daemon reads its copy in $CREDENTIALS_DIRECTORY, the unit's %d).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import PurePosixPath

from bundle.errors import ToolkitError
from device.serve.config import check_drain_timeout
from device.serve.httpd import parse_tcp

TEMPLATE = "toolkit.service.in"
GPU_GROUPS = ("video", "render")  # who may open the GPU nodes on JetPack
# JetPack 6 (nvgpu) nodes by path, then device groups (matched against /proc/devices with globs,
# so nodes that appear later, and JetPack 7's OpenRM /dev/nvidia*, are covered too)
GPU_DEVICES = ("/dev/nvmap", "/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu",
               "/dev/nvhost-as-gpu", "/dev/nvhost-prof-gpu", "/dev/nvhost-tsg-gpu",
               "/dev/nvhost-dbg-gpu", "/dev/nvhost-ctxsw-gpu", "/dev/nvhost-sched-gpu",
               "/dev/nvhost-power-gpu", "/dev/nvhost-nvsched-gpu", "char-nvhost*", "char-nvgpu*",
               "char-nvmap", "char-nvidia*")
_SAFE = re.compile(r"[A-Za-z0-9_./:@+,=-]+")  # no quoting, no %-specifiers, no $-expansion
_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
# PrivateTmp= and ProtectHome= in the unit: what the daemon writes there nobody else sees
_HIDDEN = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")


@dataclass
class UnitOptions:
    """What differs between boards; the rest of the unit is the same everywhere."""

    venv: str = "/opt/toolkit/venv"  # the venv the device package is installed in
    user: str = "toolkit"  # the dedicated system user (the Ansible role creates it)
    name: str = "toolkit"  # /run/NAME, /var/lib/NAME, /etc/NAME
    store: str | None = None  # default /var/lib/NAME/store (inside StateDirectory=)
    socket: str | None = None  # default /run/NAME/toolkit.sock (inside RuntimeDirectory=)
    socket_group: str | None = None  # the socket is 0660 for this group
    tcp: str | None = None  # HOST:PORT; then the token is a credential
    token_file: str | None = None  # default /etc/NAME/token (root-owned, 0600); with tcp or serial
    tls_cert: str | None = None  # PEM files on the board, loaded as credentials
    tls_key: str | None = None
    serial: str | None = None  # also take deploys over this serial port
    drain_timeout: float = 30.0
    watchdog_s: int = 60
    start_timeout: str = "20min"
    extra_groups: list[str] = field(default_factory=list)

    def paths(self) -> dict[str, str]:
        return {"store": self.store or f"/var/lib/{self.name}/store",
                "socket": self.socket or f"/run/{self.name}/toolkit.sock",
                "token": self.token_file or f"/etc/{self.name}/token"}


def exec_start(o: UnitOptions) -> list[str]:
    """The daemon's command line, as ExecStart= runs it."""
    p = o.paths()
    cmd = [f"{o.venv}/bin/toolkit", "serve", "--store", p["store"], "--socket", p["socket"]]
    if o.socket_group:
        cmd += ["--socket-group", o.socket_group]
    if o.tcp:
        cmd += ["--tcp", o.tcp]
        if o.tls_cert:
            cmd += ["--tls-cert", "%d/tls-cert", "--tls-key", "%d/tls-key"]
    if o.serial:
        cmd += ["--serial", o.serial]
    if o.tcp or o.serial:  # both authenticate with the token (the daemon refuses either without it)
        cmd += ["--token-file", "%d/token"]
    cmd += ["--drain-timeout", f"{o.drain_timeout:g}"]
    return cmd


def render_unit(o: UnitOptions) -> str:
    _check(o)
    p = o.paths()
    groups = [*GPU_GROUPS, *o.extra_groups]
    if o.socket_group and o.socket_group not in groups:
        groups.append(o.socket_group)
    if o.serial:
        groups.append("dialout")
    credentials = []
    if o.tcp or o.serial:
        credentials.append(f"LoadCredential=token:{p['token']}")
    if o.tcp:
        if o.tls_cert and o.tls_key:
            credentials += [f"LoadCredential=tls-cert:{o.tls_cert}", f"LoadCredential=tls-key:{o.tls_key}"]
    state_root = f"/var/lib/{o.name}"
    # the store inside StateDirectory= and the socket inside RuntimeDirectory= need nothing more
    # under ProtectSystem=strict; elsewhere each must be named writable (and exist: the role
    # creates the store; the daemon binds its socket in a folder that is there)
    writable = [] if PurePosixPath(p["store"]).is_relative_to(state_root) else [p["store"]]
    socket_dir = str(PurePosixPath(p["socket"]).parent)
    if not PurePosixPath(socket_dir).is_relative_to(f"/run/{o.name}"):
        writable.append(socket_dir)
    read_write = f"ReadWritePaths={' '.join(writable)}" if writable else ""
    devices = [f"DeviceAllow={d} rw" for d in GPU_DEVICES]
    if o.serial:
        devices.append(f"DeviceAllow={o.serial} rw")
    values = {
        "STORE": p["store"], "NAME": o.name, "USER": o.user, "GROUPS": " ".join(groups),
        "EXEC_START": " ".join(exec_start(o)), "WATCHDOG": str(o.watchdog_s),
        "START_TIMEOUT": o.start_timeout,
        # the drain, then RESPONSE_FLUSH_S (5 s) for the last chunks and the engine's close
        "STOP_TIMEOUT": f"{o.drain_timeout + 15:g}",
        "CREDENTIALS": "\n".join(credentials) or "# (no TCP listener or serial link: no token credential)",
        "READ_WRITE": read_write or f"# the store is in StateDirectory= ({state_root})",
        "DEVICES": "\n".join(devices),
    }
    text = resources.files("device.serve").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], text)


def _check(o: UnitOptions) -> None:
    for what, value, example in [("--venv", o.venv, "/opt/toolkit/venv"),
                                 ("--store", o.store, "/var/lib/toolkit/store"),
                                 ("--socket", o.socket, "/run/toolkit/toolkit.sock"),
                                 ("--token-file", o.token_file, "/etc/toolkit/token"),
                                 ("--tls-cert", o.tls_cert, "/etc/toolkit/cert.pem"),
                                 ("--tls-key", o.tls_key, "/etc/toolkit/key.pem"),
                                 ("--serial", o.serial, "/dev/ttyGS0")]:
        if value is None:
            continue
        if not value.startswith("/") or not _SAFE.fullmatch(value):
            raise ToolkitError(f"{what} {value!r}: the unit needs an absolute path of plain "
                               "characters (no spaces, quotes, % or $)", hint=f"e.g. {what} {example}")
        hidden = next((h for h in _HIDDEN if PurePosixPath(value).is_relative_to(h)), None)
        if hidden and what in ("--store", "--socket"):
            raise ToolkitError(f"{what} {value}: the service cannot use a path under {hidden} (the unit's "
                               "PrivateTmp= and ProtectHome= hide it: the daemon would get a private "
                               "or empty copy that clients never see)", hint=f"e.g. {what} {example}")
    for what, value in [("--user", o.user), ("--name", o.name), ("--socket-group", o.socket_group),
                        *[("--group", g) for g in o.extra_groups]]:
        if value is not None and not _NAME.fullmatch(value):
            raise ToolkitError(f"{what} {value!r} is not a valid user or group name",
                               hint="lowercase letters, digits, _ and -, e.g. toolkit")
    if o.tcp and not _SAFE.fullmatch(o.tcp):
        raise ToolkitError(f"--tcp {o.tcp!r} is not HOST:PORT", hint="e.g. --tcp 0.0.0.0:8443")
    if o.tcp:
        parse_tcp(o.tcp)  # the port the daemon would refuse at start, refused here
    check_drain_timeout(o.drain_timeout)
    if (o.tls_cert is None) != (o.tls_key is None):
        raise ToolkitError("--tls-cert and --tls-key go together")
    if o.tls_cert and not o.tcp:
        raise ToolkitError("--tls-cert secures the TCP listener, so it needs --tcp HOST:PORT")
    if o.token_file is not None and not (o.tcp or o.serial):  # it would be left out of the unit
        raise ToolkitError("--token-file guards the --tcp and --serial listeners; the Unix socket "
                           "takes no token (its file mode guards it: --socket-group)",
                           hint="drop --token-file, or add --tcp HOST:PORT")
    if o.watchdog_s < 2:
        raise ToolkitError(f"--watchdog {o.watchdog_s}: at least 2 seconds",
                           hint="the daemon looks every 0.5 s and pings every WatchdogSec/2")
