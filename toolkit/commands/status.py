"""toolkit status: what a running daemon serves, and how it is doing (GET /v1/status)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


@click.command()
@click.option("--socket", "socket_path", type=click.Path(path_type=Path), default=None,
              help="The daemon's Unix socket. Default: the daemon's default path.")
@click.option("--device", default=None, help="A device name from ~/.config/toolkit/devices.json.")
@click.option("--json", "as_json", is_flag=True, help="The raw status record.")
def status(socket_path: Path | None, device: str | None, as_json: bool) -> None:
    """Show the daemon's bundle, backend, memory, slots and uptime.

    \b
    Examples:
      toolkit status
      toolkit status --socket /run/toolkit/api.sock --json
    """
    from host.client import DaemonClient, endpoint_for

    endpoint = endpoint_for(socket_path, device)
    record = DaemonClient(endpoint, timeout=30).get("/v1/status")
    click.echo(json.dumps(record, indent=2) if as_json else render_status(record, str(endpoint)))


def _mib(n: Any) -> str:
    return f"{n / 2**20:.1f} MiB" if isinstance(n, (int, float)) else "?"


def render_status(rec: dict[str, Any], where: str) -> str:
    b, mem = rec.get("bundle", {}), rec.get("memory", {})
    lines = [f"daemon   {where}  [{rec.get('state')}]  pid {rec.get('pid')}, "
             f"up {rec.get('uptime_s', 0):.0f} s, toolkit {rec.get('version')}"]
    if "name" in b:
        lines.append(f"bundle   {b['name']} [{b.get('kind')}, {b.get('precision')}]  {b.get('path')}")
        lines.append(f"         source sha256 {str(b.get('source_sha256'))[:16]}…, "
                     f"manifest sha256 {str(b.get('manifest_sha256'))[:16]}…")
    if "target" in rec:
        be = rec.get("backend", {})
        lines.append(f"runtime  target {rec['target'].get('name')} on a {rec['target'].get('device_family')} "
                     f"device; {be.get('backend')} {be.get('providers', '')}, {be.get('threads')} thread(s)")
    sch = rec.get("scheduler")
    if sch:
        lines.append(f"slots    {sch['running']}/{sch['slots']} running, {sch['waiting']} waiting "
                     f"(queue limit {sch['queue_limit']}), decode {sch['decode_mode']}")
    lines.append(f"memory   RSS {_mib(mem.get('rss_bytes'))}, KV cache {_mib(mem.get('kv_cache_bytes'))}, "
                 f"available {_mib(mem.get('mem_available_bytes'))}")
    return "\n".join(lines)
