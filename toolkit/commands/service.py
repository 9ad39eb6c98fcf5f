"""toolkit service unit [options]: print the daemon's systemd unit (device/serve/unit.py)."""

from __future__ import annotations

from pathlib import Path

import click

from device.serve.unit import UnitOptions

_D = UnitOptions()


@click.group()
def service() -> None:
    """Run the daemon as a system service (systemd).

    \b
    Examples:
      toolkit service unit > /etc/systemd/system/toolkit.service
      toolkit service unit --tcp 0.0.0.0:8443 --socket-group toolkit --venv /opt/toolkit/venv
    """


@service.command("unit")
@click.option("--venv", default=_D.venv, show_default=True,
              help="The venv the toolkit is installed in (ExecStart= runs VENV/bin/toolkit).")
@click.option("--user", default=_D.user, show_default=True, help="The system user the daemon runs as.")
@click.option("--name", default=_D.name, show_default=True,
              help="Names /run/NAME, /var/lib/NAME and /etc/NAME.")
@click.option("--store", default=None, help="The bundle store. Default: /var/lib/NAME/store.")
@click.option("--socket", "socket_path", default=None,
              help="The Unix socket. Default: /run/NAME/toolkit.sock.")
@click.option("--socket-group", default=None, metavar="GROUP",
              help="Make the socket 0660 for this group (the daemon's user joins it).")
@click.option("--tcp", default=None, metavar="HOST:PORT", help="Also listen on TCP (token required).")
@click.option("--token-file", default=None,
              help="The token file on the board, handed over as a credential (with --tcp or "
                   "--serial). Default: /etc/NAME/token.")
@click.option("--tls-cert", default=None, help="PEM certificate on the board (a credential).")
@click.option("--tls-key", default=None, help="Its PEM key on the board (a credential).")
@click.option("--serial", default=None, metavar="PORT",
              help="Also take deploys over this serial port (the token authenticates them).")
@click.option("--drain-timeout", type=float, default=_D.drain_timeout, show_default=True,
              help="Seconds in-flight requests may take after SIGTERM (TimeoutStopSec= adds 15).")
@click.option("--watchdog", type=int, default=_D.watchdog_s, show_default=True,
              help="WatchdogSec=: restart the daemon when it stops proving it works.")
@click.option("--group", "extra_groups", multiple=True, help="One more supplementary group (repeatable).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the unit to this file instead of printing it.")
def unit(venv: str, user: str, name: str, store: str | None, socket_path: str | None,
         socket_group: str | None, tcp: str | None, token_file: str | None, tls_cert: str | None,
         tls_key: str | None, serial: str | None, drain_timeout: float, watchdog: int,
         extra_groups: tuple[str, ...], output: Path | None) -> None:
    """Print the systemd unit that runs `toolkit serve --store` for these options.

    Type=notify (ready once the bundle is loaded), WatchdogSec= fed by the daemon, a dedicated
    user in the GPU groups, the socket in /run/NAME, the store in /var/lib/NAME, the TCP token
    as a credential, ProtectSystem=strict and the GPU device nodes allowed."""
    from bundle.atomic import write_output
    from device.serve.unit import render_unit

    text = render_unit(UnitOptions(venv, user, name, store, socket_path, socket_group, tcp, token_file,
                                   tls_cert, tls_key, serial, drain_timeout, watchdog,
                                   start_timeout=_D.start_timeout, extra_groups=list(extra_groups)))
    if output is None:
        click.echo(text, nl=False)
    else:
        # temp file + rename: a full disk leaves the unit that was there, not half a unit
        write_output(output, text.encode("utf-8"),
                     "pass -o with a path in an existing folder this user can write")
        click.echo(f"wrote {output}", err=True)
