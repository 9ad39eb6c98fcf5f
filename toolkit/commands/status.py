"""toolkit status: what a running daemon serves, and how it is doing (GET /v1/status)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from toolkit.options import daemon_options, json_option

if TYPE_CHECKING:
    from host.client import Endpoint


@click.command()
@daemon_options
@json_option("The raw status record.")
def status(endpoint: Endpoint, as_json: bool) -> None:
    """Show the daemon's bundle, backend, memory, slots and uptime.

    \b
    Examples:
      toolkit status
      toolkit status --socket /run/toolkit/api.sock --json
    """
    from host.daemon import render_status
    from host.daemon import status as get_status
    from host.deploy_show import failure_lines

    record = get_status(endpoint)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(render_status(record, str(endpoint)))
    for line in failure_lines(record):  # a bundle that failed to load: which, why, what serves
        click.secho(line, fg="red")
