"""StopOnSignal: a signal sets the Event without the handler taking its lock (device/serve/stop_signal.py).

Each case runs in a child process: the failure being guarded against is a hang of the main thread."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from daemon_fixtures import REPO

# The main loop of serve() (Event.wait with a timeout, over and over), made to hold the Event's
# lock most of the time (the Event stays set, so every wait returns at once), while a signal
# arrives every millisecond. With `signal.signal(SIGALRM, lambda *_: stop.set())` this child
# hangs, or dies of a RecursionError from handlers nested in the blocked acquire, within a second.
STORM = """
import signal, threading, time
from device.serve.stop_signal import StopOnSignal
stop = threading.Event()
seen = 0
with StopOnSignal(stop, signals=(signal.SIGALRM,)) as s:
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    t0 = time.monotonic()
    while time.monotonic() - t0 < {seconds}:
        seen += stop.wait(0.0005)
    signal.setitimer(signal.ITIMER_REAL, 0, 0)
    print("ok", seen, s.signum == signal.SIGALRM, flush=True)
print("restored", signal.getsignal(signal.SIGALRM) is signal.SIG_DFL, signal.set_wakeup_fd(-1), flush=True)
"""


def _child(code: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the child hung (a signal handler blocked on a lock?): {e.stdout!r} {e.stderr!r}")


def test_a_signal_storm_never_blocks_the_waiting_main_thread() -> None:
    out = _child(STORM.format(seconds=2.0), timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    ok, seen, signum = lines[0].split()
    assert ok == "ok" and signum == "True"
    assert int(seen) > 100  # the waits that found the Event set
    assert lines[1] == "restored True -1"  # the old handler and no wakeup fd afterwards


def test_sigterm_sets_the_event_and_nothing_else_does() -> None:
    code = """
    import os, signal, threading
    from device.serve.stop_signal import StopOnSignal
    stop = threading.Event()
    with StopOnSignal(stop) as s:
        signal.signal(signal.SIGUSR1, lambda *_: None)  # another handled signal also writes a byte
        os.kill(os.getpid(), signal.SIGUSR1)
        print("usr1", stop.wait(0.5), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        print("term", stop.wait(10), s.signum == signal.SIGTERM, flush=True)
    """
    out = _child(code, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:2] == ["usr1 False", "term True True"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_signal_no_longer_kills_while_the_context_is_open(sig: signal.Signals) -> None:
    code = f"""
    import os, signal, threading
    from device.serve.stop_signal import StopOnSignal
    stop = threading.Event()
    with StopOnSignal(stop):
        os.kill(os.getpid(), {int(sig)})
        stop.wait(10)
    print("alive", stop.is_set(), flush=True)
    """
    out = _child(code, timeout=60)
    assert (out.returncode, out.stdout.strip()) == (0, "alive True"), out.stderr[-3000:]


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sighup_stops_unless_it_was_ignored_by_nohup(inherited: str) -> None:
    code = f"""
    import os, signal, threading
    # SIG_IGN is what `nohup` hands the daemon; the default set explicitly, for a test run that
    # is itself under nohup
    signal.signal(signal.SIGHUP, signal.SIG_IGN if {inherited == "ignored"} else signal.SIG_DFL)
    from device.serve.stop_signal import StopOnSignal
    stop = threading.Event()
    with StopOnSignal(stop):
        os.kill(os.getpid(), signal.SIGHUP)
        print("stopped", stop.wait(1.0), flush=True)
    print("after", signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, flush=True)
    """
    out = _child(code, timeout=60)
    assert out.returncode == 0, out.stderr[-3000:]
    stops = inherited == "default"
    assert out.stdout.split("\n")[:2] == [f"stopped {stops}", f"after {not stops}"]
