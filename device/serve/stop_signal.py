"""SIGTERM/SIGINT/SIGHUP turned into a threading.Event, with no lock taken in the signal handler.

    stop = threading.Event()
    with StopOnSignal(stop):  # or .install() ... .restore()
        while not stop.wait(0.5):
            ...  # the daemon's main loop

Why not `signal.signal(SIGTERM, lambda *_: stop.set())`: CPython runs a signal handler in the
main thread between two bytecodes, and when the main thread is inside `stop.wait()` just then
(at its entry, or reacquiring after the timeout) it holds the Event's lock, a plain Lock:
`stop.set()` in the handler waits for that lock, which its own thread holds and never releases.
The daemon is then deaf to the signal for good. One CI run saw a daemon still running 30 s after
SIGTERM (tests/device/serve/test_service.py, not reproduced since); this is the one way found in
the stop path for that to happen, and `tests/device/serve/test_stop_signal.py` makes it happen
within a second by holding the lock most of the time while a signal arrives every millisecond.

How: `signal.set_wakeup_fd` has the interpreter's C-level handler write the signal's number to a
pipe (no Python code, no lock), the Python handler itself does nothing, and a small thread reads
the pipe and sets the Event from outside the main thread, where taking its lock is safe. The
same as asyncio's loop does for its signal handlers.

SIGHUP, SIGUSR1 and SIGUSR2 ended the process at once (their default action): a closed terminal
or an operator's `kill -HUP` (the habit of reloading nginx or sshd) killed the daemon mid-stream,
without a drain, and left its socket file behind. SIGHUP now stops it like SIGTERM, drained: the
terminal of a foreground daemon is gone (nobody watches it; staying up orphaned would be a
surprise), and the daemon has nothing to reload (its settings are its flags; `toolkit deploy`
swaps bundles); under `nohup` (SIGHUP inherited ignored) it stays ignored. SIGUSR1 and SIGUSR2
are only logged.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import TracebackType
from typing import Any

_STOP_WATCHER = 0  # the byte `restore` writes to end the watcher thread (no signal has number 0)
STOPPING = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # drain and stop (module docstring)
IGNORED = (signal.SIGUSR1, signal.SIGUSR2)  # logged, not fatal

log = logging.getLogger("toolkit.daemon")


class StopOnSignal:
    """Sets `event` when one of `signals` arrives, for as long as the context is open. Only the
    main thread can enter it (as for signal.signal); the previous handlers and wakeup fd come
    back on exit. `signum` is the last signal that stopped it (0: none). `ignored` signals are
    logged and change nothing."""

    def __init__(self, event: threading.Event,
                 signals: tuple[signal.Signals, ...] = STOPPING,
                 ignored: tuple[signal.Signals, ...] = IGNORED) -> None:
        self.event = event
        self.signals = signals
        self.ignored = tuple(s for s in ignored if s not in signals)
        self.signum = 0
        self._previous: dict[signal.Signals, Any] = {}
        self._old_fd = -1
        self._read = self._write = -1
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.restore()

    def install(self) -> StopOnSignal:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd's requirement: a full pipe drops a byte
        self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in (*self.signals, *self.ignored):
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue  # `nohup toolkit serve &`: asked to outlive the terminal, it does
            self._previous[sig] = signal.signal(sig, self._ignore)
        self._watcher = threading.Thread(target=self._watch, name="stop-signal", daemon=True)
        self._watcher.start()
        return self

    def restore(self) -> None:
        """The previous handlers and wakeup fd back, the watcher ended; a no-op when not installed."""
        if self._watcher is None:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set from C
        signal.set_wakeup_fd(self._old_fd)
        os.set_blocking(self._write, True)
        os.write(self._write, bytes([_STOP_WATCHER]))
        self._watcher.join(5)
        self._watcher = None
        os.close(self._read)
        os.close(self._write)

    @staticmethod
    def _ignore(signum: int, frame: Any) -> None:
        """The Python-level handler: nothing (the C-level one already wrote to the pipe)."""

    def _watch(self) -> None:
        wanted = {int(s) for s in self.signals}
        ignored = {int(s) for s in self.ignored}
        while True:
            # blocks until a signal arrives (any signal with a Python handler writes its number)
            # or `restore` writes its byte
            for byte in os.read(self._read, 512):
                if byte == _STOP_WATCHER:
                    return
                if byte in wanted:
                    self.signum = byte
                    self.event.set()
                elif byte in ignored:
                    log.warning("ignoring %s: the daemon has nothing to reload (its settings are its "
                                "flags); SIGTERM or SIGHUP drains and stops it", signal.Signals(byte).name)
