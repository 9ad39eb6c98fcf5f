"""systemd's service notifications (sd_notify) and a watchdog that pings only a working daemon.

Written by hand, not with python-systemd: that package is libsystemd's C bindings, which a
JetPack venv (and the lean device install) lacks, and the protocol is one datagram: "KEY=VALUE"
lines sent to the AF_UNIX datagram socket named by $NOTIFY_SOCKET (sd_notify(3)). A name that
starts with '@' is in the abstract namespace (a leading NUL byte). Outside systemd (no
$NOTIFY_SOCKET) every call is a no-op.

    notifier = Notifier.from_env()
    notifier.send("STATUS=loading smollm2", "READY=1")

The watchdog (WatchdogSec= in the unit, $WATCHDOG_USEC here) must prove the daemon works, not
that some timer thread still runs: `Watchdog.healthy` passes only when the HTTP listener threads
are alive and the engine either made progress since the last look (tokens, finished or failed
requests) or is idle-waiting (its lock can be taken and nothing runs or waits). A wedged engine
(a hung GPU step, a deadlock) stops the pings, and systemd restarts the unit (Restart=on-failure
counts a watchdog timeout as a failure).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Notifier:
    address: str | None  # the socket address to send to; None: not under systemd
    watchdog_s: float | None = None  # WatchdogSec, when systemd asked this process for pings

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET") or None
        address: str | None = None
        if raw and raw[0] == "@":
            address = "\0" + raw[1:]
        elif raw and raw[0] == "/":
            address = raw
        # (vsock: addresses are for VMs talking to their host; a board's daemon never gets one)
        watchdog_s = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog_s = int(usec) / 1e6
        return cls(address, watchdog_s)

    def send(self, *lines: str) -> bool:
        """Send one notification ("READY=1", "STATUS=...", ...); False when not under systemd
        or the socket is gone (systemd restarting): never an error for the daemon."""
        if self.address is None:
            return False
        message = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall(message)
        except OSError:
            return False
        return True


class Watchdog:
    """Decides, every tick of the daemon's main loop, whether to send WATCHDOG=1."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.interval = notifier.watchdog_s / 2 if notifier.watchdog_s else None  # sd_watchdog_enabled(3)
        self._last_ping = 0.0
        self._mark: tuple[float, int] | None = None  # (progress total, engine) at the last ping
        self.last_problem = ""

    def tick(self, daemon: Any, listeners: list[threading.Thread]) -> bool:
        """Ping when due and the daemon is healthy; True when a ping was sent."""
        if self.interval is None or time.monotonic() - self._last_ping < self.interval:
            return False
        problem, mark = self.problem(daemon, listeners)
        self.last_problem = problem  # the daemon's STATUS= line shows it while it lasts
        if problem:
            return False
        self._last_ping, self._mark = time.monotonic(), mark
        return self.notifier.send("WATCHDOG=1")

    def problem(self, daemon: Any, listeners: list[threading.Thread]) -> tuple[str, Any]:
        """('' when the daemon works, else what does not; the progress mark seen). Progress
        counts since the last ping, so a slow step (a long prefill on a small board) only has
        to end within the WatchdogSec/2 left before systemd gives up."""
        dead = [t.name for t in listeners if not t.is_alive()]
        if dead:
            return f"listener thread(s) {', '.join(dead)} ended", None
        engine = daemon.engine
        if engine is None:  # empty store, or a cold swap loading in a deploy thread: the
            return "", None  # listeners answer (503 switching), which is the daemon working
        thread = getattr(engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            return "the engine thread ended", None
        mark = (_progress(daemon.metrics), id(engine))
        if mark != self._mark:
            return "", mark
        # no progress since the last look: fine only if the engine is idle-waiting, which its
        # lock proves (the engine thread holds it only between waits, never across a step)
        lock = engine.admission.lock
        if not lock.acquire(timeout=1.0):
            return "the engine's lock is held (a deadlock?)", mark
        try:
            idle = engine.running == 0 and engine.waiting == 0
        finally:
            lock.release()
        return ("" if idle else f"no progress with {engine.running} running and {engine.waiting} "
                                "waiting request(s)"), mark


def _progress(metrics: Any) -> float:
    """A number that grows whenever the engine does work: tokens in and out, requests ended."""
    total = 0.0
    for counter in (metrics.prompt_tokens, metrics.generation_tokens, metrics.success, metrics.failure):
        with counter.lock:
            total += sum(counter.values.values())
    total += sum(metrics.e2e.counts)  # embeddings record their latency, not tokens
    return total
