"""Bench a bundle from the host: here (in this process) or inside a daemon, then write the report.

    run = bench(Path("bundles/smol"), None, BenchConfig(), threads=None, progress=print_event)
    print(run.summary)               # the table and the files written
    sys.exit(run.exit_code)          # 0, or 1 / 130 (Ctrl-C) for a partial report

The measurement itself is device/runtime/bench.run_bench, next to the model: here it runs in
this process (`bench_local`); with an endpoint the daemon runs it and streams the same progress
events back (`bench_remote`), from which the report is rebuilt, partial when the stream dies.
Either way the host adds the roofline (it has the target catalogue), writes the JSON and, beside
it, the HTML page and PNG plots, and renders the table. `toolkit bench` and `toolkit quickstart`
are thin layers over this.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bundle.benchreport import BenchConfig, check_report_path
from bundle.errors import ToolkitError
from host.report import fmt

if TYPE_CHECKING:  # host.client imports the daemon's socket default (device/): not at import time
    from host.client import Endpoint
    from host.report_html import ReportFiles

Progress = Callable[[dict[str, Any]], None]  # one progress event (device/runtime/bench.py EVENTS)
Log = Callable[[str], None]  # one line about what is happening


def _quiet(_: Any) -> None:
    pass


@dataclass(frozen=True)
class BenchRun:
    """A written bench report: the report (with the roofline), its files and its table."""

    report: dict[str, Any]
    files: ReportFiles
    table: str

    @property
    def summary(self) -> str:
        """The table, then the files written."""
        lines = [self.table, "", f"wrote {self.files.json}"]
        if self.files.html and self.files.plots_missing:
            lines.append(f"      {self.files.html} (self-contained, without plots)")
        elif self.files.html:
            lines.append(f"      {self.files.html} (self-contained) and {len(self.files.pngs)} PNG "
                         f"plots beside it: {', '.join(p.name for p in self.files.pngs)}")
        return "\n".join(lines)

    @property
    def complete(self) -> bool:
        return bool(self.report["complete"])

    @property
    def stopped(self) -> str:
        """Why a partial report stopped (empty for a complete one)."""
        if self.complete:
            return ""
        return (f"the bench stopped early: {self.report['stopped_because']} (the report above "
                "is partial)")

    @property
    def exit_code(self) -> int:
        if self.complete:
            return 0
        return 130 if "Ctrl-C" in str(self.report["stopped_because"]) else 1


def bench(bundle: Path | None, endpoint: Endpoint | None, config: BenchConfig, threads: int | None,
          output: Path | None = None, html_page: bool = True, progress: Progress = _quiet,
          log: Log = _quiet) -> BenchRun:
    """Bench BUNDLE here, or the daemon at `endpoint` (one of the two), and write the report to
    `output` (default ./bench-<bundle>-<time>.json) with its HTML page and plots beside it."""
    if output is not None:
        check_report_path(output)  # before the measurement, which would be lost
    if endpoint is not None:
        if bundle is not None:
            raise ToolkitError("give either BUNDLE (bench here) or --device/--socket (bench in "
                               "a daemon), not both")
        if threads is not None:  # the daemon's engine runs with the threads it was started with
            raise ToolkitError("--threads sets the threads of a bench here; a daemon benches with its own",
                               hint="drop --threads, or restart the daemon with `toolkit serve --threads N`")
        report = bench_remote(endpoint, config, progress, log)
    elif bundle is None:
        raise ToolkitError("give the BUNDLE folder to benchmark, or --device/--socket",
                           hint="toolkit bench bundles/<name>   or   toolkit bench --device NAME")
    else:
        report = bench_local(bundle, config, threads, progress, log)
    return write_report(report, output or default_output(report), html_page=html_page)


def bench_local(bundle: Path, config: BenchConfig, threads: int | None,
                progress: Progress = _quiet, log: Log = _quiet) -> dict[str, Any]:
    """Load the bundle here and run the bench in this process."""
    from device.runtime.bench import mem_available, run_bench
    from device.runtime.runner import load_bundle

    before = mem_available()
    log(f"loading {bundle} …")
    runner = load_bundle(bundle, slots=max(config.concurrency), threads=threads)
    try:
        if not runner.is_decoder:
            raise ToolkitError(f"{bundle} is an encoder bundle; the bench measures decoders "
                               "(TTFT, tokens/s)")
        return run_bench(runner, config, progress=progress, before_load=before).to_json()
    finally:
        runner.close()


def bench_remote(endpoint: Endpoint, config: BenchConfig, progress: Progress = _quiet,
                 log: Log = _quiet) -> dict[str, Any]:
    """POST the settings to the daemon's /v1/bench and rebuild the report from its events:
    the final report when it comes, else the partial one from the rounds that did."""
    from bundle.benchreport import report_from_events
    from host.client import DaemonClient, DaemonError

    log(f"benchmarking in the daemon at {endpoint} …")
    events: list[dict[str, Any]] = []
    stopped = "the daemon's event stream ended before the final report (the daemon died?)"
    try:
        for event in DaemonClient(endpoint, timeout=None).stream("/v1/bench", config.to_json()):
            if event.get("event") == "error":
                raise ToolkitError(f"the daemon could not run the bench: {event.get('message')}")
            events.append(event)
            progress(event)
    except DaemonError as e:
        if not events:
            raise ToolkitError(e.message, hint=e.hint) from e
        stopped = f"the daemon stopped answering mid-run ({e.message})"
    except KeyboardInterrupt:
        if not events:
            raise
        # the rounds measured so far are kept, as a bench here keeps them (exit 130)
        stopped = "interrupted (Ctrl-C)"
    return report_from_events(events, stopped_because=stopped)


def default_output(report: dict[str, Any]) -> Path:
    """./bench-<bundle>-<YYYYmmdd-HHMMSS>.json"""
    return Path(f"bench-{report['environment']['bundle']['name']}-"
                f"{_dt.datetime.now():%Y%m%d-%H%M%S}.json")


def write_report(report: dict[str, Any], out: Path, html_page: bool = True) -> BenchRun:
    """Add the roofline (it needs the target catalogue: the host's), write the JSON and, with
    html_page, the HTML page and PNG plots beside it; the plots are left out (files.plots_missing
    says why) where matplotlib is not installed."""
    from host.report import render_table, with_predictions
    from host.report_html import write_report_files

    report = with_predictions(report)
    files = write_report_files(report, out, html_page=html_page)
    return BenchRun(report, files, render_table(report))


def progress_line(event: dict[str, Any]) -> str | None:
    """One terminal line per progress event (device/runtime/bench.py lists them); None for the
    events that show nothing."""
    kind = event["event"]
    if kind == "start":
        cfg, env = event["config"], event["environment"]
        cells = len(cfg["prompt_lens"]) * len(cfg["concurrency"])
        return (f"benchmarking {env['bundle']['name']} ({env['bundle']['precision']}) on "
                f"{env['target']['name']}: {cells} cells x {cfg['runs']} rounds "
                f"(+{cfg['warmup']} warm-up), gen {cfg['gen_len']} tokens")
    if kind == "cell":
        return (f"[{event['cell'] + 1}/{event['cells']}] prompt {event['prompt_len']}, "
                f"concurrency {event['concurrency']}")
    if kind == "round":
        r = event["round"]
        reqs = r["requests"]
        ttft = max(q["ttft_s"] for q in reqs) * 1e3
        tpot = [q["tpot_s"] * 1e3 for q in reqs if q["tpot_s"] is not None]
        rate = r["decode_tokens"] / r["decode_s"] if r["decode_s"] > 0 else None
        return (f"  round {r['run'] + 1}: {len(reqs)} req in {fmt(r['wall_s'])} s, "
                f"TTFT max {fmt(ttft)} ms, TPOT mean "
                f"{fmt(sum(tpot) / len(tpot) if tpot else None)} ms, decode {fmt(rate)} tok/s")
    if kind == "stopped":
        return f"stopped: {event['stopped_because']}"
    return None
