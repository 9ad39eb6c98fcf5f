"""Asking a running daemon from the host: its status, and a streamed completion.

    rec = status(endpoint);  print(render_status(rec, str(endpoint)))
    for text, final in generate(endpoint, "What is the capital of France?"):
        print(text, end="")
    print(usage_line(final))       # the last event's usage and timings

`toolkit status` and `toolkit generate` are thin layers over this (host/client.py speaks HTTP).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # host.client imports the daemon's socket default (device/): not at import time
    from host.client import Endpoint


def status(endpoint: Endpoint) -> dict[str, Any]:
    """GET /v1/status: what the daemon serves, and how it is doing."""
    from host.client import DaemonClient

    return DaemonClient(endpoint, timeout=30).get("/v1/status")


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


def generate(endpoint: Endpoint, prompt: str, chat: bool = True, max_tokens: int = 256,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
             seed: int | None = None) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(text, None) for each piece of the answer as it streams, then ("", the last event: usage
    and timings)."""
    from host.client import DaemonClient, stream_text

    client = DaemonClient(endpoint)
    yield from stream_text(client, prompt, chat, max_tokens=max_tokens, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed)


def usage_line(final: dict[str, Any]) -> str:
    """`[12 prompt + 40 generated tokens; first token 35 ms, 80.1 tokens/s]`"""
    usage, t = final["usage"], final.get("timings", {})
    return (f"[{usage['prompt_tokens']} prompt + {usage['completion_tokens']} generated tokens; "
            f"first token {t.get('ttft_ms', 0):.0f} ms, "
            f"{t.get('predicted_per_second', 0):.1f} tokens/s]")
