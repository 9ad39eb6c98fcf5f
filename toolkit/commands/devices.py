"""toolkit devices add|list|remove|ping: the devices a bundle can be deployed to (host/deploy.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from toolkit.options import json_option


@click.group()
def devices() -> None:
    """Register devices by name and check that they answer.

    \b
    Addresses:
      unix:///run/user/1000/toolkit.sock                a daemon on this machine
      https://192.168.1.20:8443?pin=sha256:HEX         TLS, the board's certificate pinned
      https://orin.lab:8443?ca=ca.pem                   TLS, verified against a CA
      tcp://192.168.1.20:8080                           plain HTTP (a trusted wire only)
      serial:///dev/ttyUSB0?baud=921600                 over a serial cable
    Network and serial addresses take a token: ?token-file=FILE, or --new-token.

    \b
    Examples:
      toolkit devices add jetson https://192.168.1.20:8443?pin=sha256:... --new-token
      toolkit devices add jetson https://192.168.1.20:8443 --pin-cert jetson-cert.pem
      toolkit devices ping jetson
      toolkit devices uploads jetson --older-than 1d
      toolkit deploy bundles/smollm2-135m-jetson --device jetson
    """


@devices.command("add")
@click.argument("name")
@click.argument("uri")
@click.option("--replace", is_flag=True, help="Replace an existing device of that name.")
@click.option("--new-token", is_flag=True,
              help="Generate its bearer token (32 random bytes), keep it beside the registry and "
                   "print the line to put in the board's --token-file.")
@click.option("--pin-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              metavar="PEM",
              help="Pin this certificate (the board's --tls-cert, a copy here): adds ?pin=sha256:... "
                   "to an https:// URI.")
def add(name: str, uri: str, replace: bool, new_token: bool, pin_cert: Path | None) -> None:
    """Register device NAME at URI (the registry is ~/.config/toolkit/devices.json)."""
    from host.deploy_show import added_lines
    from host.devices import add_device

    click.echo("\n".join(added_lines(add_device(name, uri, replace, new_token, pin_cert))))


@devices.command("list")
@json_option("The registry as JSON.")
def list_(as_json: bool) -> None:
    """List the registered devices."""
    from host.deploy import load_devices
    from host.deploy_show import devices_listing

    found = load_devices()
    if as_json:
        click.echo(json.dumps({n: d.to_json() for n, d in found.items()}, indent=2))
        return
    click.echo(devices_listing(found))


@devices.command("remove")
@click.argument("name")
def remove(name: str) -> None:
    """Forget device NAME."""
    from host.deploy import remove_device

    gone = remove_device(name)
    click.echo(f"removed {gone.name} ({gone.uri})")


@devices.command("ping")
@click.argument("name")
@json_option("The device's hello record as JSON.")
def ping(name: str, as_json: bool) -> None:
    """Ask device NAME what it is: target, backend, active bundle, free memory, round trip."""
    from host.deploy import ping as run
    from host.deploy_show import ping_record, ping_text

    result = run(name)
    click.echo(json.dumps(ping_record(result), indent=2) if as_json else ping_text(name, result))


@devices.command("uploads")
@click.argument("name")
@click.option("--remove", "remove", multiple=True, metavar="ID",
              help="Remove this upload (an id or a unique prefix; repeatable).")
@click.option("--remove-all", is_flag=True, help="Remove every upload in progress.")
@click.option("--older-than", metavar="AGE",
              help="Remove uploads idle at least this long (90s, 30m, 12h, 7d).")
def uploads(name: str, remove: tuple[str, ...], remove_all: bool, older_than: str | None) -> None:
    """List the uploads in progress on device NAME (id, bundle, bytes held, idle time), or
    remove abandoned ones to free their disk space."""
    from host.deploy import parse_duration
    from host.deploy import uploads as run
    from host.deploy_show import uploads_table

    if remove and (remove_all or older_than):
        raise click.UsageError("--remove names uploads; do not combine it with --remove-all/--older-than")
    found, removed = run(name, list(remove), remove_all,
                         parse_duration(older_than) if older_than else None)
    click.echo(uploads_table(name, found, removed))
