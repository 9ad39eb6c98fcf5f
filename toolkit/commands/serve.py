"""toolkit serve BUNDLE | --store DIR: run the on-device daemon (device/serve/server.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from device.serve.config import (
    DECODE_MODES,
    DRAFT_TOKENS,
    SPECULATE_MODES,
    SWAP_MODES,
    ServeConfig,
    parse_prefill_chunk,
)
from device.serve.serial_link import DEFAULT_BAUD
from toolkit.options import threads_option

_D = ServeConfig(bundle=Path("."))  # defaults are defined once, on the dataclass


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path, exists=True, file_okay=False), required=False)
@click.option("--socket", "socket_path", type=click.Path(), default=None,  # a str: "" is refused
              help="Unix socket path. Default: $XDG_RUNTIME_DIR/toolkit.sock, else "
                   "/tmp/toolkit-$UID.sock.")
@click.option("--socket-group", default=None, metavar="GROUP",
              help="Make the Unix socket 0660 for this group (default: 0600, the owner only).")
@click.option("--tcp", default=None, metavar="HOST:PORT",
              help="Also listen on TCP (loopback when HOST is omitted). Needs --token-file.")
@click.option("--token-file", type=click.Path(), default=None,  # a str: "" is refused
              help="Token(s), one per line, mode 600: TCP clients' bearer token and the serial "
                   "link's shared secret.")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="PEM certificate (chain): the TCP listener speaks TLS. With --tls-key.")
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="The certificate's PEM private key (mode 600).")
@click.option("--max-connections", type=int, default=_D.max_connections, show_default=True,
              help="Open connections per listener; one more is refused at once (503).")
@click.option("--slots", type=int, default=_D.slots,
              help="Requests decoded at once (KV cache slots). Default: the bundle's --batch.")
@click.option("--queue", type=int, default=_D.queue, show_default=True,
              help="Requests that may wait for a slot; beyond that, 503 at once.")
@threads_option("Runtime threads. Default: all cores.")
@click.option("--drain-timeout", type=float, default=_D.drain_timeout, show_default=True,
              help="Seconds in-flight requests may take to finish after SIGTERM.")
@click.option("--decode-mode", type=click.Choice(DECODE_MODES), default=_D.decode_mode,
              show_default=True,
              help="auto: batch decode steps when the backend proves batch-invariant at start.")
@click.option("--prefix-cache-mb", type=int, default=_D.prefix_cache_mb, show_default=True,
              help="Memory for the KV rows of recent prompt prefixes (a shared system prompt is "
                   "computed once, then copied); 0: off.")
@click.option("--prefill-chunk", default="auto", show_default=True, metavar="auto|off|N",
              help="A prompt arriving while others decode is read in chunks between their steps: "
                   "auto sizes and paces them by measured time (the others' time per token stays "
                   "under 1.8x), N takes N tokens every step, off reads it at once (the others "
                   "wait).")
@click.option("--speculate", type=click.Choice(SPECULATE_MODES), default=_D.speculate, show_default=True,
              help="ngram: greedy requests draft tokens from their prompt and output so far "
                   "(prompt lookup) and verify them in one step; the output is unchanged.")
@click.option("--draft-tokens", type=int, default=_D.draft_tokens,
              help=f"The most draft tokens verified in one step (only with --speculate ngram). "
                   f"Default: {DRAFT_TOKENS}.")
@click.option("--store", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Serve the active bundle of this store and accept `toolkit deploy` into it "
                   "(instead of BUNDLE).")
@click.option("--serial", default=None, metavar="PORT",
              help="Also accept deploys over this serial port, e.g. /dev/ttyGS0. Needs --store and "
                   "--token-file.")
@click.option("--baud", type=int, default=_D.baud,
              help=f"The --serial port's speed (only with --serial). Default: {DEFAULT_BAUD}.")
@click.option("--rebuild-on-mismatch", is_flag=True,
              help="TensorRT bundles: rebuild an engine that was built for another TensorRT "
                   "version or GPU, instead of refusing it.")
@click.option("--swap", type=click.Choice(SWAP_MODES), default=_D.swap, show_default=True,
              help="How a deploy replaces the served bundle: hot loads the new one beside it (no "
                   "gap, both in memory for a moment), cold unloads it first (half the memory, "
                   "503 while loading); auto picks hot when the device's memory allows.")
def serve(bundle: Path | None, socket_path: str | None, tcp: str | None, token_file: str | None,
          tls_cert: Path | None, tls_key: Path | None, max_connections: int, slots: int | None,
          queue: int, threads: int | None, drain_timeout: float, decode_mode: str, speculate: str,
          draft_tokens: int | None, store: Path | None,
          serial: str | None, baud: int | None, rebuild_on_mismatch: bool, swap: str,
          socket_group: str | None, prefix_cache_mb: int, prefill_chunk: str) -> None:
    """Serve BUNDLE (or a store's active bundle) over a Unix socket: OpenAI and KServe v2
    routes, /metrics, /v1/status; with --store also /v1/deploy/* (`toolkit deploy`).

    \b
    Examples:
      toolkit serve bundles/smollm2-135m-cpu-fp32
      toolkit serve BUNDLE --socket /run/toolkit/api.sock --slots 4 --queue 8
      toolkit serve --store /var/lib/toolkit/store --socket /run/toolkit/toolkit.sock --socket-group toolkit
      toolkit serve BUNDLE --tcp 127.0.0.1:8080 --token-file ~/.config/toolkit/token
      toolkit serve BUNDLE --tcp 0.0.0.0:8443 --token-file F --tls-cert cert.pem --tls-key key.pem
      toolkit serve --store /var/lib/toolkit --tcp 0.0.0.0:8080 --token-file F --serial /dev/ttyGS0
    """
    from device.serve.server import serve as run

    config = ServeConfig(bundle, socket_path, tcp, token_file, slots, queue, threads,
                         drain_timeout, decode_mode, speculate, draft_tokens, store=store,
                         serial=serial, baud=baud,
                         rebuild_on_mismatch=rebuild_on_mismatch, swap=swap, tls_cert=tls_cert,
                         tls_key=tls_key, max_connections=max_connections, socket_group=socket_group,
                         prefix_cache_mb=prefix_cache_mb,
                         prefill_chunk=parse_prefill_chunk(prefill_chunk))
    sys.exit(run(config))
