"""toolkit quickstart: the whole main job on this machine, end to end, on the cpu target
(host/quickstart.py): convert SmolLM2-135M, serve it from a temporary daemon, deploy, ask,
bench inside the daemon, stop the daemon."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.options import int_list, threads_option
from toolkit.output import echo_bench_progress, echo_bench_run


@click.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=Path("bundles/smollm2-135m-cpu-fp32"), show_default=True,
              help="Where the converted bundle goes (reused when it is already there, intact).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("quickstart-report.json"),
              show_default=True, help="The bench report (HTML and PNG plots beside it).")
@click.option("--prompt-lens", default="128", show_default=True, callback=int_list,
              help="Bench prompt lengths.")
@click.option("--gen-len", type=int, default=64, show_default=True, help="Bench tokens per request.")
@click.option("--concurrency", default="1,2", show_default=True, callback=int_list,
              help="Bench concurrency levels.")
@threads_option("Daemon threads. Default: every core.")
def quickstart(bundle_dir: Path, output: Path, prompt_lens: tuple[int, ...], gen_len: int,
               concurrency: tuple[int, ...], threads: int | None) -> None:
    """Convert SmolLM2-135M for the CPU, serve it from a daemon on a temporary Unix socket,
    deploy to it, stream one answer, benchmark it on the "device" and print the report."""
    from host.quickstart import QuickstartOutput
    from host.quickstart import quickstart as run

    run(bundle_dir, output, prompt_lens, gen_len, concurrency, threads, QuickstartOutput(
        step=lambda line: click.secho(line, bold=True, err=True),
        log=lambda line: click.echo(line, err=True),
        answer=lambda text: click.echo(text, nl=False),
        progress=echo_bench_progress, report=echo_bench_run))
