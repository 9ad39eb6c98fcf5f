"""toolkit plan MODEL --target T: will it fit, at which precision and context, and how fast."""

from __future__ import annotations

import json
import sys

import click

from toolkit.options import json_option, shape_options, target_option


@click.command()
@click.argument("model")
@target_option
@click.option("--precision", "-p", default=None,
              help="Precision to judge. Default: the most accurate one that fits.")
@shape_options
@click.option("--prefill-chunk", type=int, default=None,
              help="Tokens per prefill step. Default: the whole prompt in one step.")
@json_option("The whole plan as JSON.")
@click.option("--check", is_flag=True, help="Exit with status 2 when it does not fit.")
def plan(model: str, target: str, precision: str | None, max_seq: int | None, batch: int,
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
    from targets.show import render_plan

    result = plan_from_model(model, target, precision and precision.lower(), max_seq, batch,
                             prefill_chunk=prefill_chunk)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        click.echo(render_plan(result))
    if check and not result.fits:
        sys.exit(2)
