"""The `toolkit` command: a click group of small subcommands over library functions.

Each subcommand lives in toolkit/commands/<name>.py, parses its options and calls one library
function; heavy imports (torch, onnxruntime, tensorrt) happen inside the command, so
`toolkit --help` is instant. A ToolkitError anywhere below is printed without a traceback
and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from bundle import __version__
from bundle.errors import ToolkitError

# "module:attribute" of each subcommand, in the order `toolkit --help` lists them.
COMMANDS = [
    "toolkit.commands.quickstart:quickstart",
    "toolkit.commands.convert:convert",
    "toolkit.commands.quantize:quantize",
    "toolkit.commands.compile:compile",
    "toolkit.commands.targets:targets",
    "toolkit.commands.plan:plan",
    "toolkit.commands.serve:serve",
    "toolkit.commands.generate:generate",
    "toolkit.commands.status:status",
    "toolkit.commands.devices:devices",
    "toolkit.commands.deploy:deploy",
    "toolkit.commands.deploy:rollback",
    "toolkit.commands.bench:bench",
    "toolkit.commands.report:report",
]


class ToolkitGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            click.secho(f"error: {e.message}", fg="red", err=True)
            if e.hint:
                click.echo(f"  hint: {e.hint}", err=True)
            sys.exit(e.exit_code)


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="toolkit")
def main() -> None:
    """Edge inference toolkit: convert models into bundles for Jetson boards and CPUs, serve them
    from an on-device daemon, and bring latency and memory reports home.

    \b
    Start here:
      toolkit convert smollm2-135m --target cpu     # HF folder, .gguf, .onnx or a packaged name
      toolkit targets                               # what each target can run
    """


def _missing(name: str, err: Exception) -> click.Command:
    """A command whose module failed to import still shows in --help and says why when run
    (Polygraphy's MissingTool): one broken optional stack must not take the CLI down."""

    def run() -> None:
        raise ToolkitError(f"the `{name}` command could not be loaded: {err}",
                           hint="reinstall the toolkit (pip install -e .)")

    return click.Command(name, callback=run, help=f"(unavailable: {err})")


def _register(entry: str) -> None:
    module, attr = entry.split(":")
    try:
        command = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        command = _missing(module.rsplit(".", 1)[-1], e)
    main.add_command(command)


for _entry in COMMANDS:
    _register(_entry)
