"""toolkit generate "prompt": stream a completion from a running daemon to the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from bundle.errors import ToolkitError
from toolkit.options import FiniteFloat, daemon_options

if TYPE_CHECKING:
    from host.client import Endpoint


@click.command()
@click.argument("prompt")
@daemon_options
@click.option("--chat/--no-chat", default=True, show_default=True,
              help="Wrap PROMPT in the model's chat template (else: a plain completion).")
@click.option("--max-tokens", type=int, default=256, show_default=True,
              help="At most this many new tokens (fewer when the KV cache fills up).")
@click.option("--temperature", type=FiniteFloat(min=0.0), default=0.0, show_default=True,
              help="0 = greedy (reproducible); higher = more varied.")
@click.option("--top-p", type=FiniteFloat(0.0, 1.0, min_open=True), default=None,
              help="Nucleus sampling mass (0, 1]; with --temperature above 0.")
@click.option("--top-k", type=int, default=None,
              help="Sample among the k likeliest tokens; with --temperature above 0.")
@click.option("--seed", type=int, default=None,
              help="Makes sampling reproducible; with --temperature above 0.")
def generate(prompt: str, endpoint: Endpoint, chat: bool, max_tokens: int, temperature: float,
             top_p: float | None, top_k: int | None, seed: int | None) -> None:
    """Generate text for PROMPT on a running daemon, printing it as it streams.

    \b
    Examples:
      toolkit generate "What is the capital of France?"
      toolkit generate --no-chat --max-tokens 40 "Once upon a time"
      toolkit generate --device jetson --temperature 0.7 --seed 1 "Write a haiku"
    """
    sampling = [f"--{n}" for n, v in (("top-p", top_p), ("top-k", top_k), ("seed", seed)) if v is not None]
    if sampling and temperature == 0:  # greedy takes the likeliest token: they would change nothing
        raise ToolkitError(f"{', '.join(sampling)} shape sampling, and --temperature 0 (the default) "
                           "is greedy", hint=f"add --temperature 0.7 (for example), or drop "
                           f"{', '.join(sampling)}")
    from host.daemon import generate as run
    from host.daemon import usage_line

    final, printed = None, False
    try:
        for text, event in run(endpoint, prompt, chat, max_tokens=max_tokens, temperature=temperature,
                               top_p=top_p, top_k=top_k, seed=seed):
            if event is not None:
                final = event
            click.echo(text, nl=False)
            printed = printed or bool(text)
    except (ToolkitError, KeyboardInterrupt):
        if printed:  # end the partial answer's line (stdout: a redirected answer ends whole), so
            click.echo()  # that the error or `interrupted` starts on a line of its own
        raise
    click.echo()
    if final:
        click.secho(usage_line(final), err=True, dim=True)
