"""Option groups shared by the commands (Polygraphy style): one spelling, default and help each.

    @click.command()
    @daemon_options                      # --socket PATH / --device NAME -> endpoint
    @threads_option("Runtime threads. Default: all cores.")
    @json_option("The raw status record.")
    def status(endpoint: Endpoint, threads: int | None, as_json: bool) -> None: ...

Nothing here imports more than click: `toolkit --help` stays instant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from bundle.errors import ToolkitError
from targets import DEFAULT_TARGET

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

SOCKET_HELP = "The daemon's Unix socket. Default: the daemon's default path."
DEVICE_HELP = "A device name from `toolkit devices list`."


def daemon_options(fn: Callable[..., Any] | None = None, *,
                   instead_of: str | None = None) -> Any:
    """--socket PATH and --device NAME (not both), passed on as `endpoint` (host.client.Endpoint).

    Without either the endpoint is the daemon's default socket; with instead_of="BUNDLE" the
    command works on its argument instead, and `endpoint` is None."""
    also = f" (instead of {instead_of})" if instead_of else ""
    socket_help = SOCKET_HELP if not instead_of else f"The daemon's Unix socket{also}."
    device_help = DEVICE_HELP if not instead_of else f"{DEVICE_HELP[:-1]}{also}."

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, socket_path: str | None, device: str | None, **kwargs: Any) -> Any:
            if socket_path == "":  # as a Path it was ".": "no daemon is listening at unix://."
                raise ToolkitError("--socket is empty", hint="give the daemon's socket path, or leave "
                                   "--socket out for the default ($XDG_RUNTIME_DIR/toolkit.sock)")
            if device is not None and not device.strip():  # was taken as not given: the default socket
                raise ToolkitError("--device is empty", hint="give a name from `toolkit devices list`")
            endpoint = None
            if socket_path or device or not instead_of:
                from host.client import endpoint_for

                endpoint = endpoint_for(Path(socket_path) if socket_path else None, device)
            return f(*args, endpoint=endpoint, **kwargs)

        wrapper = click.option("--device", default=None, metavar="NAME", help=device_help)(wrapper)
        return click.option("--socket", "socket_path", type=click.Path(), default=None,  # a str: "" seen
                            help=socket_help)(wrapper)

    return decorate(fn) if fn is not None else decorate


def device_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """A required --device NAME from the registry, passed on as `device_name` (deploy, rollback)."""
    return click.option("--device", "device_name", required=True, metavar="NAME", help=DEVICE_HELP)(f)


def threads_option(help: str) -> Decorator:
    """--threads N (None: the library's default); the help says what the threads run."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan passes every bound check)."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


FRACTION = FiniteFloat(0.0, 1.0)  # the accuracy gate's minimums: top-1, greedy, cosine
PERCENT = FiniteFloat(min=0.0)  # the accuracy gate's largest perplexity increase


def gate_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The accuracy gate's limits (quantize/gate.py), passed on as `limits`: a dict of
    max_ppl_increase (a fraction), min_top1, min_greedy, min_cosine; None where not given (the
    format's or the precision's default)."""
    @click.option("--max-ppl-increase", type=PERCENT, default=None, metavar="PCT",
                  help="Gate: largest perplexity increase over fp32, in percent (default per "
                       "precision: fp16 1, int8 1 weight-only (cpu) or 10 with the activations "
                       "quantized (Jetson W8A8), fp8 10, int4 5).")
    @click.option("--min-top1", type=FRACTION, default=None, metavar="FRACTION",
                  help="Gate: smallest top-1 next-token agreement with fp32.")
    @click.option("--min-greedy", type=FRACTION, default=None, metavar="FRACTION",
                  help="Gate: smallest fraction of greedy tokens matching fp32 before divergence.")
    @click.option("--min-cosine", type=FRACTION, default=None, metavar="COS",
                  help="Gate (encoders): smallest embedding cosine similarity to fp32.")
    @functools.wraps(f)
    def wrapper(*args: Any, max_ppl_increase: float | None, min_top1: float | None,
                min_greedy: float | None, min_cosine: float | None, **kwargs: Any) -> Any:
        limits = {"max_ppl_increase": None if max_ppl_increase is None else max_ppl_increase / 100.0,
                  "min_top1": min_top1, "min_greedy": min_greedy, "min_cosine": min_cosine}
        return f(*args, limits=limits, **kwargs)
    return wrapper


def shape_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--max-seq and --batch: the static KV cache a bundle is converted or planned for."""
    f = click.option("--batch", type=int, default=1, show_default=True,
                     help="KV cache slots: requests the device serves at once.")(f)
    return click.option("--max-seq", type=int, default=None,
                        help="Static KV cache capacity in tokens (prompt + generated). "
                             "Default: the target's default, capped at the model's limit.")(f)


def target_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """--target/-t NAME, passed on as `target`."""
    return click.option("--target", "-t", default=DEFAULT_TARGET, show_default=True,
                        help="Deployment target (see `toolkit targets`).")(f)


def json_option(help: str) -> Decorator:
    """--json, passed on as `as_json`; the help says what the JSON holds."""
    return click.option("--json", "as_json", is_flag=True, default=False, help=help)


def int_list(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    """A click callback: "128,512" -> (128, 512); anything else is a usage error."""
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers "
                                 "(e.g. 128,512)") from None


def csv(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))
