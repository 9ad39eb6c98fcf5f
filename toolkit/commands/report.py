"""toolkit report show|compare|html: read bench reports on the host (no onnxruntime needed)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def report() -> None:
    """Read bench reports written by `toolkit bench`: show one, compare several, re-render.

    \b
    Examples:
      toolkit report show smol-fp32.json
      toolkit report compare smol-fp32.json smol-int8.json
      toolkit report html smol-fp32.json
    """


@report.command("show")
@click.argument("file", type=click.Path(path_type=Path))
def show(file: Path) -> None:
    """The table of one report: latency percentiles, throughput, memory, power."""
    from bundle.benchreport import load_report
    from host.report import render_table

    click.echo(render_table(load_report(file)))


@report.command("compare")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--names", is_flag=True,
              help="Label each column with its file's name without .json (a fleet's BOARD.json "
                   "reports: one column per board) instead of A, B, C...")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also write the table to this file.")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also draw decode tokens/s and TTFT of every report side by side into this PNG "
                   "(the [report] extra).")
def compare(files: tuple[Path, ...], names: bool, output: Path | None, plot: Path | None) -> None:
    """Reports side by side, per prompt length x concurrency, with ratios to the first (B/A...).

    For latencies and memory a ratio below 1 is better; for tokens/s and requests/s above 1.

    \b
    A fleet (the edge.toolkit Ansible collection writes one report per board):
      toolkit report compare --names reports/orin-01.json reports/orin-02.json reports/thor-01.json \
          --plot fleet.png
    """
    from bundle.benchreport import load_report
    from bundle.errors import ToolkitError
    from host.report import compare_reports
    from host.report_html import write_output

    if len(files) < 2:
        raise ToolkitError("compare needs at least two report files",
                           hint="toolkit report compare A.json B.json [C.json ...]")
    labels = [f.stem for f in files] if names else None
    reports = [(str(f), load_report(f)) for f in files]
    table = compare_reports(reports, labels)
    if output is not None:
        write_output(output, (table + "\n").encode("utf-8"))
    click.echo(table)
    if plot is not None:
        from host.report import column_labels
        from host.report_html import write_compare_plot

        drawn = write_compare_plot([r for _, r in reports], labels or column_labels(len(files)), plot)
        click.echo(f"wrote {drawn}")


@report.command("html")
@click.argument("file", type=click.Path(path_type=Path))
def html(file: Path) -> None:
    """Write FILE's HTML page and PNG plots beside it (e.g. for a report pulled off a device)."""
    from bundle.benchreport import load_report
    from host.report_html import write_html_files
    from toolkit.extras import plots_need_extra

    files = write_html_files(load_report(file), file)
    if files.plots_missing:
        click.echo(f"wrote {files.html} (without plots)")
        click.echo(plots_need_extra(files.plots_missing), err=True)
        return
    click.echo(f"wrote {files.html} and {len(files.pngs)} PNG plots beside it: "
               f"{', '.join(p.name for p in files.pngs)}")
