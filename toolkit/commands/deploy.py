"""toolkit deploy BUNDLE --device NAME, toolkit rollback --device NAME (host/deploy.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from toolkit.options import device_option
from toolkit.output import ProgressLine

if TYPE_CHECKING:
    from collections.abc import Callable

    from device.store.store import InstallResult
    from host.transfer import InstallPhase


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@device_option
@click.option("--retries", type=int, default=3, show_default=True,
              help="Reconnect and resume this many times in a row when the connection drops.")
def deploy(bundle: Path, device_name: str, retries: int) -> None:
    """Send BUNDLE to a device, install it and switch the daemon to it.

    The bundle is verified here first; a bundle the device cannot run (TensorRT on a CPU
    device, a plan that does not fit its memory) is refused before any byte is sent. An
    interrupted upload resumes: run the same command again. The device verifies every file,
    switches atomically, smoke-tests the new bundle and rolls back if it fails.

    \b
    Examples:
      toolkit deploy bundles/smollm2-135m-cpu-fp32 --device local
      toolkit deploy bundles/smollm2-135m-jetson --device jetson
    """
    from host.deploy import deploy as run
    from host.deploy_show import sent_line

    click.echo(f"verifying {bundle} …", err=True)
    result = run(bundle, device_name, progress=ProgressLine(), retries=retries,
                 on_retry=lambda msg: click.echo(f"\nconnection lost: {msg}", err=True),
                 on_phase=_phase_printer())
    click.echo(sent_line(result))
    _echo_install(result.install)
    if not result.install.ok:
        sys.exit(1)


@click.command()
@device_option
def rollback(device_name: str) -> None:
    """Switch a device back to its previous bundle (after a smoke test of it)."""
    from host.deploy import rollback as run

    result = run(device_name, on_phase=_phase_printer())
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
