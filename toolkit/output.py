"""Terminal output of the CLI itself: what more than one command prints (the commands never
import each other), and the live upload line of `toolkit deploy`."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click

from toolkit.extras import plots_need_extra

if TYPE_CHECKING:
    from host.bench import BenchRun


def echo_bench_progress(event: dict[str, Any]) -> None:
    """One line per bench progress event, on stderr (red when the bench stopped)."""
    from host.bench import progress_line

    line = progress_line(event)
    if line is not None:
        click.secho(line, fg="red" if event["event"] == "stopped" else None, err=True)


def echo_bench_run(run: BenchRun) -> None:
    """The report's table and the files written; without matplotlib, which extra draws the plots."""
    click.echo(run.summary)
    if run.files.plots_missing:
        click.echo(plots_need_extra(run.files.plots_missing), err=True)


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
