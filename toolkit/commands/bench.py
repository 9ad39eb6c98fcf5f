"""toolkit bench BUNDLE: latency, throughput, memory and power of a bundle (host/bench.py).

The measurement is device/runtime/bench.run_bench, next to the model: here, or inside the daemon
with `--device NAME` / `--socket PATH` (the events stream back). This command parses the options,
prints the progress events and the table, and exits non-zero for a partial report.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bundle.benchreport import BenchConfig
from toolkit.options import csv, daemon_options, int_list, threads_option
from toolkit.output import echo_bench_progress, echo_bench_run

if TYPE_CHECKING:
    from host.client import Endpoint

DEFAULTS = BenchConfig()  # every default is the dataclass's, defined once


@click.command()
@click.argument("bundle", required=False, type=click.Path(path_type=Path))
@click.option("--prompt-lens", default=csv(DEFAULTS.prompt_lens), show_default=True,
              callback=int_list, help="Prompt lengths in tokens (synthetic prompts, exact).")
@click.option("--gen-len", type=int, default=DEFAULTS.gen_len, show_default=True,
              help="Tokens each request generates (greedy, EOS ignored: exactly this many).")
@click.option("--concurrency", default=csv(DEFAULTS.concurrency), show_default=True,
              callback=int_list, help="Requests at once, one KV slot each.")
@click.option("--runs", type=int, default=DEFAULTS.runs, show_default=True,
              help="Measured rounds per prompt length x concurrency.")
@click.option("--warmup", type=int, default=DEFAULTS.warmup, show_default=True,
              help="Unmeasured rounds before them (same shapes, a few tokens).")
@threads_option("ONNX Runtime intra-op threads. Default: TOOLKIT_THREADS, else every core.")
@click.option("--no-power", is_flag=True, help="Do not start tegrastats / read power rails.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Report JSON; the HTML page and PNG plots go beside it, same stem. Default: "
                   "./bench-<bundle>-<time>.json")
@click.option("--no-html", is_flag=True, help="Write the JSON only (no matplotlib needed).")
@daemon_options(instead_of="BUNDLE")
def bench(bundle: Path | None, prompt_lens: tuple[int, ...], gen_len: int,
          concurrency: tuple[int, ...], runs: int, warmup: int, threads: int | None,
          no_power: bool, output: Path | None, no_html: bool, endpoint: Endpoint | None) -> None:
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
    from host.bench import bench as run

    config = BenchConfig(prompt_lens=prompt_lens, gen_len=gen_len, concurrency=concurrency,
                         runs=runs, warmup=warmup, power=not no_power)
    result = run(bundle, endpoint, config, threads, output, html_page=not no_html,
                 progress=echo_bench_progress, log=lambda line: click.echo(line, err=True))
    echo_bench_run(result)
    if not result.complete:
        if result.report.get("error"):
            click.echo(result.report["error"], err=True)
        click.secho(result.stopped, fg="red", err=True)
        sys.exit(result.exit_code)
