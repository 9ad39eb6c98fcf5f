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
    from device.store.store import InstallResult
    from host.deploy import DeployResult, PingResult
    from host.devices import Added, Device


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
