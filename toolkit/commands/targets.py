"""toolkit targets [show T]: what each deployment target is and can run (targets/*.toml)."""

from __future__ import annotations

import json

import click

from toolkit.options import json_option


@click.group(invoke_without_command=True)
@json_option("Every target's fields as JSON.")
@click.pass_context
def targets(ctx: click.Context, as_json: bool) -> None:
    """List the deployment targets: runtime, memory, bandwidth, precisions, TensorRT.

    \b
    Examples:
      toolkit targets
      toolkit targets show jetson-orin-nano-8gb
    """
    if ctx.invoked_subcommand is not None:
        return
    from targets import list_targets
    from targets.show import TARGETS_FOOTER, targets_table

    all_targets = list_targets()
    if as_json:
        click.echo(json.dumps([t.to_json() for t in all_targets], indent=2))
        return
    click.echo(targets_table(all_targets))
    click.echo("\n" + TARGETS_FOOTER)


@targets.command("show")
@click.argument("name")
@json_option("The target's fields as JSON.")
def show(name: str, as_json: bool) -> None:
    """Explain one target: what it is, its facts, and where they come from."""
    from targets import load_target
    from targets.show import describe

    t = load_target(name)  # an unknown name is a ToolkitError listing the known ones
    if as_json:
        click.echo(json.dumps(t.to_json(), indent=2))
        return
    click.echo(describe(t))
