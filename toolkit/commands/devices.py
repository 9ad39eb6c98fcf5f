"""toolkit devices add|list|remove|ping: the devices a bundle can be deployed to (host/deploy.py)."""

from __future__ import annotations

import json

import click

from toolkit.options import json_option


@click.group()
def devices() -> None:
    """Register devices by name and check that they answer.

    \b
    Addresses:
      unix:///run/user/1000/toolkit.sock                   a daemon on this machine
      tcp://192.168.1.20:8080?token-file=~/.jetson.token    over the network (bearer token)
      serial:///dev/ttyUSB0?baud=921600&token-file=F       over a serial cable (the same token)

    \b
    Examples:
      toolkit devices add jetson tcp://192.168.1.20:8080?token-file=~/.config/toolkit/jetson.token
      toolkit devices ping jetson
      toolkit deploy bundles/smollm2-135m-jetson --device jetson
    """


@devices.command("add")
@click.argument("name")
@click.argument("uri")
@click.option("--replace", is_flag=True, help="Replace an existing device of that name.")
def add(name: str, uri: str, replace: bool) -> None:
    """Register device NAME at URI (the registry is ~/.config/toolkit/devices.json)."""
    from host.deploy import add_device
    from host.deploy_show import added_line

    click.echo(added_line(add_device(name, uri, replace)))


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
