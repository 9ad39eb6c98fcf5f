"""toolkit plan MODEL --target T: will it fit, at which precision and context, and how fast."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

import click

from targets import DEFAULT_TARGET, GIB

if TYPE_CHECKING:
    from targets.plan import PlanResult


@click.command()
@click.argument("model")
@click.option("--target", "-t", "target_name", default=DEFAULT_TARGET, show_default=True,
              help="Deployment target (see `toolkit targets`).")
@click.option("--precision", "-p", default=None,
              help="Precision to judge. Default: the most accurate one that fits.")
@click.option("--max-seq", type=int, default=None,
              help="Static KV cache capacity in tokens. Default: the target's default, capped "
                   "at the model's limit.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="KV cache slots: requests served at once.")
@click.option("--prefill-chunk", type=int, default=None,
              help="Tokens per prefill step. Default: the whole prompt in one step.")
@click.option("--json", "as_json", is_flag=True, help="The whole plan as JSON.")
@click.option("--check", is_flag=True, help="Exit with status 2 when it does not fit.")
def plan(model: str, target_name: str, precision: str | None, max_seq: int | None, batch: int,
         prefill_chunk: int | None, as_json: bool, check: bool) -> None:
    """Say whether MODEL fits a target, before converting anything.

    Reads only the model's config (no weights: a Hugging Face folder with just config.json, the
    config.json itself, a .gguf file or a packaged name). Prints memory per precision (weights,
    KV cache, activations, runtime, OS reserve), the verdict, the largest context and batch that
    fit, and a roofline estimate of decode and prefill speed.

    \b
    Examples:
      toolkit plan ./Meta-Llama-3-8B/config.json --target jetson-orin-nano-8gb
      toolkit plan smollm2-135m --target cpu --max-seq 8192
      toolkit plan ./my-llama --target jetson-orin-nx-16gb --precision fp16 --json
    """
    from targets.plan import plan_from_model

    result = plan_from_model(model, target_name, precision and precision.lower(), max_seq, batch,
                             prefill_chunk=prefill_chunk)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(render(result))
    if check and not result.fits:
        sys.exit(2)


def render(r: PlanResult) -> str:
    """The table of components per precision, the verdict and the warnings."""
    from toolkit.commands.targets import table


    def gib(n: int) -> str:
        return f"{n / GIB:.2f}"

    chunk = f"{r.prefill_chunk}-token" if r.prefill_chunk else "whole-prompt"
    head = (f"{r.model} on {r.target} ({r.runtime}): max_seq {r.max_seq}, batch {r.batch}, "
            f"{chunk} prefill; memory {gib(r.memory_total)} GiB ({r.memory_source})")
    header = ("precision", "format", "weights", "KV cache", "activations", "runtime",
              "OS reserve", "total GiB", "fits", "decode tok/s", f"prefill {r.max_seq} s")
    rows = []
    for row in r.rows:
        c = row.components
        mark = " *" if row.precision == r.precision else ""
        rows.append((row.precision + mark, row.format,
                     gib(c.weights), gib(c.kv_cache), gib(c.activations), gib(c.runtime),
                     gib(c.os_reserve), gib(c.total), "yes" if row.fits else "no",
                     f"{row.speed.decode_tokens_s:.1f}", f"{row.speed.prefill_s:.2f}"))
    verdict = ("FITS" if r.fits else "DOES NOT FIT") + f": {r.explain()}"
    lines = [head, "", table(header, rows), "", verdict]
    lines += [f"warning: {w}" for w in r.warnings]
    lines.append("(* the precision judged; speeds are roofline estimates from the target's "
                 "bandwidth and dense peak; --json lists the formulas)")
    return "\n".join(lines)
