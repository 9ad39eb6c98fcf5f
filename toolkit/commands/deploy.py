"""toolkit deploy BUNDLE --device NAME, toolkit rollback --device NAME (host/deploy.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from device.store.store import InstallResult


class ProgressLine:
    """`uploading  12.3/45.6 MB  [#####.....]  8.1 MB/s  ETA 0:04` on one line of stderr (a
    line every 10 % when stderr is not a terminal). Speed counts this run's bytes only, so a
    resumed upload shows the line's speed, not an inflated one."""

    def __init__(self, width: int = 24) -> None:
        self.width = width
        self.t0 = time.perf_counter()
        self.start: int | None = None
        self.last_draw = 0.0
        self.last_decile = -1
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start, self.t0 = done, now
            if done:
                click.echo(f"resuming: the device already holds {done / 1e6:.1f} of {total / 1e6:.1f} MB",
                           err=True)
        final = done >= total
        decile = int(10 * done / total) if total else 10
        if self.tty and not final and now - self.last_draw < 0.1:
            return
        if not self.tty and decile == self.last_decile and not final:
            return
        self.last_draw, self.last_decile = now, decile
        elapsed = max(now - self.t0, 1e-9)
        rate = (done - self.start) / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        filled = int(self.width * done / total) if total else self.width
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"uploading  {done / 1e6:.1f}/{total / 1e6:.1f} MB  [{bar}]  {rate / 1e6:.2f} MB/s  "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            click.echo("\r" + line + ("\n" if final else ""), nl=False, err=True)
        else:
            click.echo(line, err=True)


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--device", "device_name", required=True, help="A name from `toolkit devices list`.")
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

    click.echo(f"verifying {bundle} …", err=True)
    result = run(bundle, device_name, progress=ProgressLine(), retries=retries,
                 on_retry=lambda msg: click.echo(f"\nconnection lost: {msg}", err=True))
    sent = (f"sent {result.sent_bytes / 1e6:.1f} MB in {result.upload_s:.1f} s "
            f"({result.mb_per_s:.2f} MB/s)")
    if result.held_at_start:
        sent += f"; {result.held_at_start / 1e6:.1f} MB were already on the device"
    if result.attempts > 1:
        sent += f"; {result.attempts} connections"
    click.echo(sent)
    report(result.install)
    if not result.install.ok:
        sys.exit(1)


@click.command()
@click.option("--device", "device_name", required=True, help="A name from `toolkit devices list`.")
def rollback(device_name: str) -> None:
    """Switch a device back to its previous bundle (after a smoke test of it)."""
    from host.deploy import rollback as run

    result = run(device_name)
    report(result)
    if not result.ok:
        sys.exit(1)


def report(r: InstallResult) -> None:
    """The install result: what was verified, switched and smoke-tested, and what is active."""
    if r.verify_s:
        click.echo(f"verified every file against the manifest ({r.verify_s:.2f} s)")
    if r.smoke is not None:
        state = "passed" if r.smoke.ok else "FAILED"
        click.echo(f"smoke test {state} ({r.smoke.seconds:.2f} s): {r.smoke.detail}")
    if r.rolled_back:
        click.secho(f"rolled back: {r.message}", fg="red", err=True)
    else:
        click.echo(r.message)
    active = r.active.dir if r.active else "none"
    previous = r.previous.dir if r.previous else "none"
    click.echo(f"active {active}; previous {previous}")
