"""Deploys, rollbacks and the devices registry as terminal text (`toolkit deploy`, `rollback`,
`devices`): host/deploy.py does the work, this says what happened.

    result = deploy(bundle, "jetson")
    print(sent_line(result))
    for line, alarm in install_lines(result.install):   # alarm: the bundle was rolled back
        print(line, file=sys.stderr if alarm else sys.stdout)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from targets.show import table

if TYPE_CHECKING:
    from device.store.store import InstallResult, UploadInfo
    from host.deploy import DeployResult, PingResult
    from host.devices import Added, Device
    from host.transfer import InstallPhase


def sent_line(result: DeployResult) -> str:
    """What went over the wire: MB, seconds, rate, what the device already held, connections."""
    sent = (f"sent {result.sent_bytes / 1e6:.1f} MB in {result.upload_s:.1f} s "
            f"({result.mb_per_s:.2f} MB/s)")
    if result.held_at_start:
        sent += f"; {result.held_at_start / 1e6:.1f} MB were already on the device"
    if result.attempts > 1:
        sent += f"; {result.attempts} connections"
    return sent


def install_lines(r: InstallResult) -> list[tuple[str, bool]]:
    """The install result, line by line: what was verified, switched and smoke-tested, and what
    is active; each with True for the line that says the device rolled back."""
    lines: list[tuple[str, bool]] = []
    if r.verify_s:
        lines.append((f"verified every file against the manifest ({r.verify_s:.2f} s)", False))
    if r.smoke is not None:
        state = "passed" if r.smoke.ok else "FAILED"
        lines.append((f"smoke test {state} ({r.smoke.seconds:.2f} s): {r.smoke.detail}", False))
    if r.rolled_back:
        lines.append((f"rolled back: {r.message}", True))
    else:
        lines.append((r.message, False))
    active = r.active.dir if r.active else "none"
    previous = r.previous.dir if r.previous else "none"
    lines.append((f"active {active}; previous {previous}", False))
    return lines


def added_lines(added: Added) -> list[str]:
    """What `toolkit devices add` did, and for a generated token what to do on the board."""
    from host.devices import registry_path

    device = added.device
    token = f" (token from {device.token_file})" if device.token_file else ""
    lines = [f"added {device.name}: {device.uri}{token} to {registry_path()}"]
    if added.token:
        lines += ["On the board, put this line in the daemon's token file (chmod 600) and pass it "
                  "as --token-file:", f"  {added.token}"]
    return lines


def devices_listing(found: Mapping[str, Device]) -> str:
    """The registered devices as a table (or how to add one)."""
    from host.devices import registry_path

    if not found:
        return f"no devices in {registry_path()}; add one with `toolkit devices add NAME URI`"
    rows = [(d.name, d.transport, d.uri, d.token_file or "-") for d in found.values()]
    return table(("name", "via", "address", "token file"), rows)


def ping_record(result: PingResult) -> dict[str, Any]:
    """The device's hello record, with the round trip in ms."""
    h = result.hello
    return {**h.raw, "rtt_ms": round(h.rtt_s * 1e3, 3)}


def ping_text(name: str, result: PingResult) -> str:
    """What the device is: target, backend, active bundle, free memory, round trip."""
    h = result.hello
    f = h.facts
    active = h.active
    free = f"{f.memory_available / 2**30:.2f}" if f.memory_available is not None else "?"
    return "\n".join([
        f"{name}  {result.device.uri}",
        f"  device   {f.family} ({f.arch}), TensorRT {f.tensorrt or 'none'}",
        f"  target   {(h.target or {}).get('name', '-')}, backend {h.backend}",
        f"  active   {active['dir'] if active else 'none'}"
        + (f" (previous {h.previous['dir']})" if h.previous else ""),
        f"  memory   {free} GiB free of {f.memory_total / 2**30:.2f} GiB",
        f"  rtt      {h.rtt_s * 1e3:.2f} ms",
    ])


class PhaseLines:
    """The device's install progress as lines: one when a phase ends (with its time), and a
    "still building" line every `every_s` of a long phase, so a 10-minute engine build is
    visibly alive. Call with each polled InstallPhase; returns the lines to print."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.done = 0
        self.every_s = every_s
        self.last_note = 0.0

    def __call__(self, p: InstallPhase) -> list[str]:
        lines = [f"device: {phase} {seconds:.1f} s" for phase, seconds in p.phases[self.done:]]
        if len(p.phases) > self.done:
            self.done, self.last_note = len(p.phases), 0.0
        if p.state == "running" and p.phase_s - self.last_note >= self.every_s:
            self.last_note = p.phase_s
            lines.append(f"device: {p.phase} … {p.phase_s:.0f} s (install {p.elapsed_s:.0f} s)")
        if p.state != "running":
            lines.append(f"device: {p.op} {p.state} after {p.elapsed_s:.1f} s")
        return lines


def uploads_table(device: str, found: list[UploadInfo], removed: list[UploadInfo]) -> str:
    """Uploads in progress on a device (and the ones just removed)."""
    mib = 1 << 20
    out = [f"removed {u.upload_id[:12]} {u.name} ({u.held_bytes / mib:.1f} MiB freed)" for u in removed]
    if not found:
        out.append(f"no uploads in progress on {device}")
    else:
        rows = [(u.upload_id[:12], u.name, f"{u.held_bytes / mib:.1f} / {u.total_bytes / mib:.1f} MiB",
                 _age(u.age_s)) for u in found]
        out.append(table(("id", "bundle", "held / total", "idle"), rows))
        out.append(f"remove with `toolkit devices uploads {device} --remove ID` (or --remove-all, "
                   "--older-than 1d)")
    return "\n".join(out)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def failure_lines(record: Mapping[str, Any]) -> list[str]:
    """A daemon status record's failed bundle, if any: which, why, and what serves instead."""
    failure = record.get("failure")
    if not isinstance(failure, dict):
        return []
    serving = failure.get("serving") or "nothing (the daemon is not ready; deploy a bundle)"
    return [f"failed bundle  {failure.get('bundle')}: {failure.get('reason')}",
            f"serving        {serving}"]
