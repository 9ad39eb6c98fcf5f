"""toolkit devices add|list|remove|ping: the devices a bundle can be deployed to (host/deploy.py)."""

from __future__ import annotations

import json

import click


@click.group()
def devices() -> None:
    """Register devices by name and check that they answer.

    \b
    Addresses:
      unix:///run/user/1000/toolkit.sock                   a daemon on this machine
      tcp://192.168.1.20:8080?token-file=~/.jetson.token    over the network (bearer token)
      serial:///dev/ttyUSB0?baud=921600                    over a serial cable

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
    from host.deploy import add_device, registry_path

    device = add_device(name, uri, replace)
    token = f" (token from {device.token_file})" if device.token_file else ""
    click.echo(f"added {device.name}: {device.uri}{token} to {registry_path()}")


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="The registry as JSON.")
def list_(as_json: bool) -> None:
    """List the registered devices."""
    from host.deploy import load_devices, registry_path
    from toolkit.commands.targets import table

    found = load_devices()
    if as_json:
        click.echo(json.dumps({n: d.to_json() for n, d in found.items()}, indent=2))
        return
    if not found:
        click.echo(f"no devices in {registry_path()}; add one with `toolkit devices add NAME URI`")
        return
    rows = [(d.name, d.transport, d.uri, d.token_file or "-") for d in found.values()]
    click.echo(table(("name", "via", "address", "token file"), rows))


@devices.command("remove")
@click.argument("name")
def remove(name: str) -> None:
    """Forget device NAME."""
    from host.deploy import remove_device

    gone = remove_device(name)
    click.echo(f"removed {gone.name} ({gone.uri})")


@devices.command("ping")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The device's hello record as JSON.")
def ping(name: str, as_json: bool) -> None:
    """Ask device NAME what it is: target, backend, active bundle, free memory, round trip."""
    from host.deploy import ping as run

    result = run(name)
    h = result.hello
    if as_json:
        click.echo(json.dumps({**h.raw, "rtt_ms": round(h.rtt_s * 1e3, 3)}, indent=2))
        return
    f = h.facts
    active = h.active
    click.echo(f"{name}  {result.device.uri}")
    click.echo(f"  device   {f.family} ({f.arch}), TensorRT {f.tensorrt or 'none'}")
    click.echo(f"  target   {(h.target or {}).get('name', '-')}, backend {h.backend}")
    click.echo(f"  active   {active['dir'] if active else 'none'}"
               + (f" (previous {h.previous['dir']})" if h.previous else ""))
    free = f"{f.memory_available / 2**30:.2f}" if f.memory_available is not None else "?"
    click.echo(f"  memory   {free} GiB free of {f.memory_total / 2**30:.2f} GiB")
    click.echo(f"  rtt      {h.rtt_s * 1e3:.2f} ms")
