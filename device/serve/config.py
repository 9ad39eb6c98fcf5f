"""The daemon's settings: one dataclass, defaults defined once (the CLI reads them from here).

Kept free of heavy imports so that `toolkit --help` stays instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from bundle.errors import ToolkitError
from device.runtime.procmem import check_fits
from device.runtime.threads import check_threads, env_threads
from device.serve.httpd import MAX_CONNECTIONS, default_socket_path, parse_tcp
from device.serve.serial_link import DEFAULT_BAUD

SWAP_MODES = ("auto", "hot", "cold")  # see device/store/swap.py

# How the engine runs a decode step over several requests (see device/serve/scheduler.py):
# auto = batched when the backend proves batch-invariant at start, else per-row.
DECODE_MODES = ("auto", "batched", "per-row")

# Prompt-lookup drafting for greedy requests (device/runtime/draft.py, device/serve/scheduler.py):
# off, or ngram (the default, the last entry): up to DRAFT_TOKENS tokens verified per step, each
# draft as long as the row's acceptance and the measured step times make worth it
# (device/serve/draft_plan.py: draft_length). 15: the longest verify step that stays on ONNX
# Runtime's bound fast path (ort_backend.BOUND_T = 16 tokens). Against 4, on SmolLM2-135M fp32
# through the daemon (bench/speculate.py, 3 rounds, ratios to --speculate off): copy 5.88x vs
# 3.40x, plain 4.11x vs 2.76x, open 1.17x vs 1.04x, output identical. (Before draft lengths
# were costed, 8 had lost to 4 on text that does not copy: 0.98x vs 1.33x.)
SPECULATE_MODES = ("off", "ngram")
DRAFT_TOKENS = 15
# The most a user may ask for: 5,000 was taken, the start-up probe (draft.verify_step_deviation)
# then ran a 2,045-token step whose float sums differ from single steps', and drafting went off.
MAX_DRAFT_TOKENS = 64


# The most KV slots a daemon takes: past this, a step reads more rows than any board (or this
# project's CPUs) decodes at once. --slots 100000 on a tiny bundle once ended in the kernel's OOM
# killer (exit 137, nothing said). Memory is checked too, when the cache is allocated
# (kvcache.StaticKVCache).
MAX_SLOTS = 256

# The prefix cache's default budget (device/serve/prefix_cache.py): a fixed 64 MiB, not a share
# of the KV cache, so what it adds to the daemon's memory is known before the bundle is (an 8 GB
# board's budget is set per process). It holds ~1,450 tokens of SmolLM2-135M's fp32 KV (46 KB a
# token: two 600-token system prompts), ~2,000 of an fp16 1B Llama's.
PREFIX_CACHE_MB = 64


def check_drain_timeout(seconds: float) -> None:
    """--drain-timeout, for the daemon and the service unit that starts it: finite and 0 or more
    (NaN fails the comparison too)."""
    if not 0 <= seconds < math.inf:
        raise ToolkitError(f"--drain-timeout must be a finite number of seconds, 0 or more "
                           f"(got {seconds:g})")


def parse_prefill_chunk(text: str) -> int | None:
    """--prefill-chunk: "auto" (None: sized by time, device/serve/prefill.py), "off" (0), or a
    number of tokens."""
    if text == "auto":
        return None
    if text == "off":
        return 0
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise ToolkitError(f"--prefill-chunk {text!r} is not auto, off or a number of tokens")
    return n


def check_budget(nbytes: int) -> None:
    """Refuse a --prefix-cache-mb budget this machine's free memory cannot hold: checked when
    the daemon starts (before anything loads) and again when the scheduler is made. Here, not in
    prefix_cache.py: this module is imported by the CLI's --help, which must not import numpy."""
    check_fits(nbytes, f"a prefix cache of {nbytes >> 20} MiB",
               "pass a smaller --prefix-cache-mb (0 turns it off)")


@dataclass
class ServeConfig:
    """Every daemon setting, with its default defined once (the CLI reads them from here)."""

    bundle: Path | None  # None: serve the active bundle of `store`
    socket: Path | str | None = None  # None: default_socket_path(); "" is refused
    tcp: str | None = None  # "HOST:PORT"; TCP is off unless given
    token_file: Path | str | None = None  # required with tcp and with serial
    slots: int | None = None  # None: the bundle's batch
    queue: int = 16  # requests that may wait for a slot; beyond, 503
    threads: int | None = None  # runtime intra-op threads; None: all cores
    drain_timeout: float = 30.0  # seconds in-flight requests may take after SIGTERM
    decode_mode: str = "auto"  # see device/serve/scheduler.py
    speculate: str = SPECULATE_MODES[-1]  # prompt-lookup drafting for greedy requests, or "off"
    draft_tokens: int | None = None  # the most draft tokens verified in one step; None: DRAFT_TOKENS
    # (only with speculate ngram: off drafts nothing)
    store: Path | None = None  # a bundle store (device/store/store.py): serve its active bundle,
    # accept deploys
    serial: str | None = None  # also take deploys over this serial port (needs store)
    baud: int | None = None  # None: DEFAULT_BAUD; only with serial (else it would set nothing)
    rebuild_on_mismatch: bool = False  # TensorRT: rebuild an engine built for another TRT/GPU
    swap: str = "auto"  # how a deploy replaces the served bundle: auto | hot | cold (device/store/swap.py)
    tls_cert: Path | None = None  # PEM certificate (chain): TCP speaks TLS
    tls_key: Path | None = None  # its PEM private key
    max_connections: int = MAX_CONNECTIONS  # per listener; one more is refused at once
    socket_group: str | None = None  # the Unix socket is 0660 for this group (else 0600)
    prefix_cache_mb: int = PREFIX_CACHE_MB  # KV rows of recent prompt prefixes; 0: off
    prefill_chunk: int | None = None  # tokens per interleaved prefill chunk; None: auto, 0: off

    def __post_init__(self) -> None:
        # an empty value was taken as not given: --tcp "" and --serial "" opened no listener,
        # silently; --socket "" bound "." ("exists and is not a socket")
        if self.socket is not None and not str(self.socket):
            raise ToolkitError("--socket is empty", hint="give the socket's path, or leave --socket out "
                               "for the default ($XDG_RUNTIME_DIR/toolkit.sock)")
        if self.token_file is not None and not str(self.token_file):  # was "Is a directory" (".")
            raise ToolkitError("--token-file is empty", hint="give the file that holds the token(s), "
                               "one per line, mode 600")
        if self.tcp is not None:
            parse_tcp(self.tcp)  # "" included: "is not HOST:PORT"
        if self.serial is not None and not self.serial.strip():
            raise ToolkitError("--serial is empty", hint="give the serial port, e.g. --serial /dev/ttyGS0")
        if self.slots is not None and not 1 <= self.slots <= MAX_SLOTS:
            raise ToolkitError(f"--slots must be 1 to {MAX_SLOTS} (got {self.slots})")
        if self.queue < 0:
            raise ToolkitError(f"--queue must be 0 or more (got {self.queue})")
        check_drain_timeout(self.drain_timeout)
        check_threads(self.threads)
        if self.decode_mode not in DECODE_MODES:
            raise ToolkitError(f"--decode-mode {self.decode_mode!r} is not one of {', '.join(DECODE_MODES)}")
        if self.speculate not in SPECULATE_MODES:
            raise ToolkitError(f"--speculate {self.speculate!r} is not one of {', '.join(SPECULATE_MODES)}")
        if self.draft_tokens is not None and self.speculate == "off":
            raise ToolkitError("--draft-tokens sets the length of drafts, and --speculate off drafts nothing",
                               hint="drop --draft-tokens, or --speculate off")
        if self.draft_tokens is not None and not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise ToolkitError(f"--draft-tokens must be 1 to {MAX_DRAFT_TOKENS} (got {self.draft_tokens})",
                               hint="--speculate off turns drafting off")
        if (self.bundle is None) == (self.store is None):
            raise ToolkitError("give a BUNDLE to serve, or --store DIR to serve the bundles deployed "
                               "there, not both", hint="`toolkit deploy` installs bundles into a --store")
        if self.swap not in SWAP_MODES:
            raise ToolkitError(f"--swap {self.swap!r} is not one of {', '.join(SWAP_MODES)}")
        if self.serial and self.store is None:
            raise ToolkitError("--serial carries deploys, so it needs --store DIR")
        if self.baud is not None and not self.serial:
            raise ToolkitError("--baud sets the speed of the --serial port; without --serial there is none",
                               hint="drop --baud, or add --serial PORT")
        if self.baud is not None and self.baud < 1:
            raise ToolkitError(f"--baud must be a positive speed (got {self.baud})",
                               hint=f"e.g. --baud {DEFAULT_BAUD}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ToolkitError("--tls-cert and --tls-key go together")
        if self.tls_cert and not self.tcp:
            raise ToolkitError("--tls-cert secures the TCP listener, so it needs --tcp HOST:PORT")
        if self.max_connections < 1:
            raise ToolkitError(f"--max-connections must be at least 1 (got {self.max_connections})")
        if self.serial and not self.token_file:
            raise ToolkitError("--serial needs --token-file: the serial link authenticates every session "
                               "with the token",
                               hint="write a random token to a file (chmod 600) and pass it")
        if self.prefix_cache_mb < 0:
            raise ToolkitError(f"--prefix-cache-mb must be 0 (off) or more (got {self.prefix_cache_mb})")
        if self.prefill_chunk is not None and self.prefill_chunk < 0:
            raise ToolkitError(f"--prefill-chunk must be auto, off or a number of tokens "
                               f"(got {self.prefill_chunk})")
        if self.socket_group is not None:
            self.socket_gid  # noqa: B018 - an unknown group is refused before anything starts
        if self.tcp and not self.token_file:
            raise ToolkitError("--tcp needs --token-file: every TCP request must carry a bearer token",
                               hint="write a random token to a file (chmod 600) and pass it")
        if self.token_file and not (self.tcp or self.serial):  # it would guard nothing, silently
            raise ToolkitError("--token-file guards the --tcp and --serial listeners; the Unix socket "
                               "takes no token (its file mode guards it: --socket-group)",
                               hint="drop --token-file, or add --tcp HOST:PORT")

    def check_machine(self) -> None:
        """What the flags ask of this machine, checked when the daemon starts and before anything
        loads. Not in __post_init__: the CLI builds a ServeConfig of defaults when it is imported,
        which must not fail on (or read) this machine's state.

        The prefix cache's budget against MemAvailable: the scheduler checks it again with the
        model loaded, but found only there, with --store, the flag's error was blamed on the
        active bundle, a rollback was tried and the daemon stayed up serving nothing. The same
        for TOOLKIT_THREADS (the default of --threads), which load_bundle read: 'abc' was a
        ValueError traceback there."""
        if self.threads is None:
            check_threads(env_threads())
        check_budget(self.prefix_cache_mb << 20)

    @property
    def socket_gid(self) -> int | None:
        """The numeric id of --socket-group (a name, or a number), None without one."""
        if self.socket_group is None:
            return None
        import grp

        try:
            if self.socket_group.isdigit():
                return grp.getgrgid(int(self.socket_group)).gr_gid
            return grp.getgrnam(self.socket_group).gr_gid
        except KeyError:
            raise ToolkitError(f"--socket-group {self.socket_group!r}: no such group",
                               hint="create it (groupadd) or name an existing group; "
                                    "`getent group` lists them") from None

    @property
    def draft_limit(self) -> int:
        """The most draft tokens verified in one step: --draft-tokens, else DRAFT_TOKENS."""
        return DRAFT_TOKENS if self.draft_tokens is None else self.draft_tokens

    @property
    def serial_baud(self) -> int:
        """The serial port's speed: --baud, else DEFAULT_BAUD."""
        return DEFAULT_BAUD if self.baud is None else self.baud

    @property
    def socket_path(self) -> Path:
        return Path(self.socket) if self.socket is not None else default_socket_path()
