"""toolkit bench BUNDLE: latency, throughput, memory and power of a bundle, measured here.

The measurement is device/bench.run_bench, next to the model. This command loads the bundle,
runs it, streams its progress events to the terminal and writes the report. The daemon-driven
form (`--device NAME` / `--socket PATH`, the same run inside the daemon with the events streamed
back) plugs in at `_measure`: everything around it - options, progress, files - stays as is.
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path
from typing import Any

import click

from bundle.benchreport import BenchConfig
from bundle.errors import ToolkitError
from host.report import fmt

DEFAULTS = BenchConfig()  # every default is the dataclass's, defined once


def _int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers "
                                 "(e.g. 128,512)") from None


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


@click.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--prompt-lens", default=_csv(DEFAULTS.prompt_lens), show_default=True,
              callback=_int_list, help="Prompt lengths in tokens (synthetic prompts, exact).")
@click.option("--gen-len", type=int, default=DEFAULTS.gen_len, show_default=True,
              help="Tokens each request generates (greedy, EOS ignored: exactly this many).")
@click.option("--concurrency", default=_csv(DEFAULTS.concurrency), show_default=True,
              callback=_int_list, help="Requests at once, one KV slot each.")
@click.option("--runs", type=int, default=DEFAULTS.runs, show_default=True,
              help="Measured rounds per prompt length x concurrency.")
@click.option("--warmup", type=int, default=DEFAULTS.warmup, show_default=True,
              help="Unmeasured rounds before them (same shapes, a few tokens).")
@click.option("--threads", type=int, default=None,
              help="ONNX Runtime intra-op threads. Default: TOOLKIT_THREADS, else every core.")
@click.option("--no-power", is_flag=True, help="Do not start tegrastats / read power rails.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Report JSON; the HTML page and PNG plots go beside it, same stem. Default: "
                   "./bench-<bundle>-<time>.json")
@click.option("--no-html", is_flag=True, help="Write the JSON only (no matplotlib needed).")
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              help="Bench inside the daemon listening on this Unix socket (instead of BUNDLE).")
@click.option("--device", default=None,
              help="Bench inside the daemon of this registered device (`toolkit devices`).")
def bench(bundle: Path | None, prompt_lens: tuple[int, ...], gen_len: int,
          concurrency: tuple[int, ...], runs: int, warmup: int, threads: int | None,
          no_power: bool, output: Path | None, no_html: bool, socket_path: Path | None,
          device: str | None) -> None:
    """Benchmark BUNDLE on this machine: TTFT, time per output token, request latency
    (p50/p90/p95/p99), prefill and decode tokens/s, requests/s per concurrency, peak memory,
    KV cache, power and energy per token (Jetson), beside the roofline prediction.

    \b
    Examples:
      toolkit bench bundles/smollm2-135m-cpu-fp32
      toolkit bench bundles/smol --prompt-lens 128 --gen-len 64 --concurrency 1,2 -o smol.json
      toolkit bench --device orin-nano-01 --prompt-lens 128,512 --concurrency 1,4
      toolkit report show smol.json

    With --device or --socket the bench runs inside the daemon, on the device (the network is
    not what is measured); progress streams back and the report is written here.
    """
    config = BenchConfig(prompt_lens=prompt_lens, gen_len=gen_len, concurrency=concurrency,
                         runs=runs, warmup=warmup, power=not no_power)
    if socket_path or device:
        if bundle is not None:
            raise ToolkitError("give either BUNDLE (bench here) or --device/--socket (bench in "
                               "a daemon), not both")
        report = _measure_remote(socket_path, device, config)
    elif bundle is None:
        raise ToolkitError("give the BUNDLE folder to benchmark, or --device/--socket",
                           hint="toolkit bench bundles/<name>   or   toolkit bench --device NAME")
    else:
        report = _measure(bundle, config, threads)
    out = output or Path(f"bench-{report['environment']['bundle']['name']}-"
                         f"{_dt.datetime.now():%Y%m%d-%H%M%S}.json")
    _write_and_show(report, out, html_page=not no_html)
    if not report["complete"]:
        if report.get("error"):
            click.echo(report["error"], err=True)
        click.secho(f"the bench stopped early: {report['stopped_because']} (the report above "
                    "is partial)", fg="red", err=True)
        sys.exit(130 if "Ctrl-C" in str(report["stopped_because"]) else 1)


def _measure(bundle: Path, config: BenchConfig, threads: int | None) -> dict[str, Any]:
    """Load the bundle here and run the bench in this process. (The daemon form will send
    config.to_json() and read the same events back, then rebuild the report with
    host.report.report_from_events.)"""
    from device.runtime.bench import mem_available, run_bench
    from device.runtime.runner import load_bundle

    before = mem_available()
    click.echo(f"loading {bundle} …", err=True)
    runner = load_bundle(bundle, slots=max(config.concurrency), threads=threads)
    try:
        if not runner.is_decoder:
            raise ToolkitError(f"{bundle} is an encoder bundle; the bench measures decoders "
                               "(TTFT, tokens/s)")
        return run_bench(runner, config, progress=echo_progress, before_load=before).to_json()
    finally:
        runner.close()


def _measure_remote(socket_path: Path | None, device: str | None,
                    config: BenchConfig) -> dict[str, Any]:
    """POST the settings to the daemon's /v1/bench and rebuild the report from its events:
    the final report when it comes, else the partial one from the rounds that did."""
    from bundle.benchreport import report_from_events
    from host.client import DaemonClient, DaemonError, endpoint_for

    endpoint = endpoint_for(socket_path, device)
    click.echo(f"benchmarking in the daemon at {endpoint} …", err=True)
    events: list[dict[str, Any]] = []
    stopped = "the daemon's event stream ended before the final report (the daemon died?)"
    try:
        for event in DaemonClient(endpoint, timeout=None).stream("/v1/bench", config.to_json()):
            if event.get("event") == "error":
                raise ToolkitError(f"the daemon could not run the bench: {event.get('message')}")
            events.append(event)
            echo_progress(event)
    except DaemonError as e:
        if not events:
            raise ToolkitError(str(e), hint=e.hint) from e
        stopped = f"the daemon stopped answering mid-run ({e})"
    return report_from_events(events, stopped_because=stopped)


def _write_and_show(report: dict[str, Any], out: Path, html_page: bool) -> None:
    from host.report import render_table, with_predictions
    from host.report_html import write_report_files

    report = with_predictions(report)  # the roofline needs the target catalogue: added here
    files = write_report_files(report, out, html_page=html_page)
    click.echo(render_table(report))
    click.echo()
    click.echo(f"wrote {files.json}")
    if files.html:
        click.echo(f"      {files.html} (self-contained) and {len(files.pngs)} PNG plots beside "
                   f"it: {', '.join(p.name for p in files.pngs)}")


def echo_progress(event: dict[str, Any]) -> None:
    """One terminal line per progress event (device/runtime/bench.py lists them), on stderr."""
    kind = event["event"]
    if kind == "start":
        cfg, env = event["config"], event["environment"]
        cells = len(cfg["prompt_lens"]) * len(cfg["concurrency"])
        click.echo(f"benchmarking {env['bundle']['name']} ({env['bundle']['precision']}) on "
                   f"{env['target']['name']}: {cells} cells x {cfg['runs']} rounds "
                   f"(+{cfg['warmup']} warm-up), gen {cfg['gen_len']} tokens", err=True)
    elif kind == "cell":
        click.echo(f"[{event['cell'] + 1}/{event['cells']}] prompt {event['prompt_len']}, "
                   f"concurrency {event['concurrency']}", err=True)
    elif kind == "round":
        r = event["round"]
        reqs = r["requests"]
        ttft = max(q["ttft_s"] for q in reqs) * 1e3
        tpot = [q["tpot_s"] * 1e3 for q in reqs if q["tpot_s"] is not None]
        rate = r["decode_tokens"] / r["decode_s"] if r["decode_s"] > 0 else None
        click.echo(f"  round {r['run'] + 1}: {len(reqs)} req in {fmt(r['wall_s'])} s, "
                   f"TTFT max {fmt(ttft)} ms, TPOT mean "
                   f"{fmt(sum(tpot) / len(tpot) if tpot else None)} ms, decode {fmt(rate)} tok/s",
                   err=True)
    elif kind == "stopped":
        click.secho(f"stopped: {event['stopped_because']}", fg="red", err=True)
