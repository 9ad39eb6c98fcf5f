"""Terminal output that more than one command prints (the commands never import each other)."""

from __future__ import annotations

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
