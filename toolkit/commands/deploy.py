"""toolkit deploy BUNDLE --device NAME, toolkit rollback --device NAME (host/deploy.py)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from bundle.errors import Interrupted
from toolkit.options import device_option, json_option
from toolkit.output import ProgressLine

if TYPE_CHECKING:
    from collections.abc import Callable

    from device.store.store import InstallResult
    from host.deploy import DeployResult
    from host.transfer import InstallPhase


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@device_option
@click.option("--retries", type=click.IntRange(min=0), default=3, show_default=True,
              help="Reconnect and resume this many times in a row when the connection drops.")
@json_option("One JSON record (no progress): bytes sent, what the device already held, the "
             "install result, and `changed` (false when the device already served the bundle).")
def deploy(bundle: Path, device_name: str, retries: int, as_json: bool) -> None:
    """Send BUNDLE to a device, install it and switch the daemon to it.

    The bundle is verified here first; a bundle the device cannot run (TensorRT on a CPU
    device, a plan that does not fit its memory) is refused before any byte is sent. An
    interrupted upload resumes: run the same command again. The device verifies every file,
    switches atomically, smoke-tests the new bundle and rolls back if it fails.

    \b
    Examples:
      toolkit deploy bundles/smollm2-135m-cpu-fp32 --device local
      toolkit deploy bundles/smollm2-135m-jetson --device jetson
      toolkit deploy bundles/smol --device orin-01 --json    # for scripts and Ansible
    """
    from host.deploy import deploy as run
    from host.deploy import ping
    from host.deploy_show import sent_line

    # what the device served before: a repeated commit of the active bundle is answered with
    # the stored result of the install that made it active, so only this tells "no change"
    before = _active_sha(ping(device_name).hello.active) if as_json else None
    click.echo(f"verifying {bundle} …", err=True)
    where = _HowFar(None if as_json else ProgressLine(), None if as_json else _phase_printer())
    try:
        result = run(bundle, device_name, progress=where.progress, retries=retries,
                     on_retry=lambda msg: click.echo(f"\nconnection lost: {msg}", err=True),
                     on_phase=where.phase)
    except KeyboardInterrupt as e:
        raise Interrupted(where.kept(device_name)) from e
    if as_json:
        click.echo(json.dumps(deploy_record(result, before)))
    else:
        click.echo(sent_line(result))
        _echo_install(result.install)
    if not result.install.ok:
        sys.exit(1)


class _HowFar:
    """How far a deploy got, passing the progress and the install phases on: what a Ctrl-C
    leaves is what `kept` says (the device keeps the bytes it received; a re-run resumes)."""

    def __init__(self, progress: Callable[[int, int], None] | None,
                 on_phase: Callable[[InstallPhase], None] | None) -> None:
        self._progress, self._on_phase = progress, on_phase
        self.held: int | None = None  # bytes the device holds, once `begin` said
        self.total = 0
        self.installing = False  # the device accepted the commit

    def progress(self, done: int, total: int) -> None:
        self.held, self.total = done, total
        if self._progress:
            self._progress(done, total)

    def phase(self, p: InstallPhase) -> None:
        self.installing = True
        if self._on_phase:
            self._on_phase(p)

    def kept(self, device: str) -> str:
        if self.installing:
            return (f"{device} goes on with the install; `toolkit status --device {device}` shows "
                    "what it serves")
        if self.held is None:
            return f"no bundle file was sent to {device}"
        if self.held >= self.total:
            return (f"{device} holds the whole bundle; the same `toolkit deploy` again installs it "
                    "without sending it again")
        # chunks in flight may have landed after the last one acknowledged: "at least"
        return (f"{device} keeps what it received (at least {self.held / 1e6:.1f} of "
                f"{self.total / 1e6:.1f} MB); the same `toolkit deploy` again resumes from there")


def _active_sha(active: dict[str, Any] | None) -> str | None:
    return str(active.get("manifest_sha256")) if active else None


def deploy_record(result: DeployResult, active_before: str | None) -> dict[str, Any]:
    """`toolkit deploy --json`: `changed` is what a fleet tool reports (Ansible's changed_when):
    bytes went to the device, or it serves another bundle than before."""
    from device.store.store import to_json

    install = result.install
    active_after = install.active.manifest_sha256 if install.active else None
    return {"device": result.device.name, "bundle": str(result.bundle), "upload_id": result.upload_id,
            "total_bytes": result.total_bytes, "held_at_start": result.held_at_start,
            "sent_bytes": result.sent_bytes, "upload_s": round(result.upload_s, 3),
            "attempts": result.attempts, "ok": install.ok,
            "changed": bool(result.sent_bytes) or active_after != active_before,
            "install": to_json(install)}


@click.command()
@device_option
@click.option("--from", "from_bundle", type=click.Path(path_type=Path, exists=True, file_okay=False),
              default=None, help="Roll back only if the device serves this bundle (so that running "
                                 "the same rollback twice does not switch back again).")
@json_option("One JSON record: the install result and `changed`.")
def rollback(device_name: str, from_bundle: Path | None, as_json: bool) -> None:
    """Switch a device back to its previous bundle (after a smoke test of it).

    \b
    Examples:
      toolkit rollback --device orin-01
      toolkit rollback --device orin-01 --from bundles/smol-int4 --json   # idempotent
    """
    from device.store.store import to_json
    from host.deploy import ping
    from host.deploy import rollback as run

    if from_bundle is not None:
        from bundle.manifest import MANIFEST, read_manifest

        read_manifest(from_bundle)  # a folder that is not a bundle: its ToolkitError, not a traceback
        sha = hashlib.sha256((from_bundle / MANIFEST).read_bytes()).hexdigest()
        active = ping(device_name).hello.active
        if not active or active.get("manifest_sha256") != sha:
            serving = active.get("dir") if active else "nothing"
            message = f"{device_name} does not serve {from_bundle.name} (it serves {serving}): nothing to do"
            if as_json:
                click.echo(json.dumps({"device": device_name, "ok": True, "changed": False,
                                       "message": message, "active": active}))
            else:
                click.echo(message)
            return
    result = run(device_name, on_phase=None if as_json else _phase_printer())
    if as_json:
        click.echo(json.dumps({"device": device_name, "ok": result.ok, "changed": result.changed,
                               "message": result.message, "install": to_json(result)}))
    else:
        _echo_install(result)
    if not result.ok:
        sys.exit(1)


def _phase_printer() -> Callable[[InstallPhase], None]:
    """The device's install phases on stderr as the host polls them."""
    from host.deploy_show import PhaseLines

    lines = PhaseLines()

    def show(p: InstallPhase) -> None:
        for line in lines(p):
            click.echo(line, err=True)

    return show


def _echo_install(r: InstallResult) -> None:
    from host.deploy_show import install_lines

    for line, rolled_back in install_lines(r):
        if rolled_back:
            click.secho(line, fg="red", err=True)
        else:
            click.echo(line)
