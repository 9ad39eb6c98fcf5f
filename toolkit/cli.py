"""The `toolkit` command: a click group of small subcommands over library functions.

Each subcommand lives in toolkit/commands/<name>.py, parses its options (the shared groups are
in toolkit/options.py) and calls one library function; heavy imports (torch, onnxruntime,
tensorrt) happen inside the command, so `toolkit --help` is instant. A ToolkitError anywhere
below is printed without a traceback and exits non-zero; so is the import of a package that one
of the pip extras installs and this install lacks (toolkit/extras.py): one line naming the extra.
Ctrl-C is one `interrupted` line (with what was kept, where a command says: bundle/errors.py's
Interrupted) and exit status 130, as a shell reports a command SIGINT stopped; click's default
was "Aborted!" and 1. (`toolkit serve` turns SIGINT into a drain and a clean exit of its own.)
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from bundle import __version__
from bundle.errors import INTERRUPTED_EXIT, ToolkitError
from toolkit.extras import missing_extra, needs_extra

# "module:attribute" of each subcommand, in the order `toolkit --help` lists them.
COMMANDS = [
    "toolkit.commands.quickstart:quickstart",
    "toolkit.commands.convert:convert",
    "toolkit.commands.quantize:quantize",
    "toolkit.commands.compile:compile",
    "toolkit.commands.check:check",
    "toolkit.commands.targets:targets",
    "toolkit.commands.plan:plan",
    "toolkit.commands.serve:serve",
    "toolkit.commands.service:service",
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
            try:
                return super().invoke(ctx)
            except ModuleNotFoundError as e:
                missing = missing_extra(e)
                if missing is None:
                    raise
                raise ToolkitError(needs_extra(f"toolkit {ctx.invoked_subcommand}", *missing)) from e
        except ToolkitError as e:
            click.secho(f"error: {e.message}", fg="red", err=True)
            if e.hint:
                click.echo(f"  hint: {e.hint}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            kept = getattr(e, "kept", "")  # bundle.errors.Interrupted
            # on a terminal the line starts after the ^C it echoed (and any progress line)
            start = "\n" if sys.stderr.isatty() else ""
            click.secho(f"{start}interrupted{': ' + kept if kept else ''}", fg="red", err=True)
            sys.exit(INTERRUPTED_EXIT)


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
    (Polygraphy's MissingTool): one broken optional stack must not take the CLI down. When an
    extra's package is what is missing, the message names the extra."""
    missing = missing_extra(err)
    if missing:
        message, hint = needs_extra(f"toolkit {name}", *missing), None
        summary = f"(needs the [{missing[0]}] extra)"
    else:
        message, hint = f"the `{name}` command could not be loaded: {err}", \
            "reinstall the toolkit (pip install -e .)"
        summary = f"(unavailable: {err})"

    def run(args: tuple[str, ...]) -> None:
        raise ToolkitError(message, hint=hint)

    return click.Command(name, callback=run, help=summary, short_help=summary,
                         params=[click.Argument(["args"], nargs=-1)],
                         context_settings={"ignore_unknown_options": True})


def _register(entry: str) -> None:
    module, attr = entry.split(":")
    try:
        command = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        command = _missing(attr, e)  # the attribute is the command's name (deploy:rollback)
    main.add_command(command)


for _entry in COMMANDS:
    _register(_entry)
