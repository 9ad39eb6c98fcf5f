"""A serial line without hardware: two pseudo-terminals joined by a relay that can emulate a baud
rate and damage the bytes it carries (protocols.md §3.3). Used by the tests and bench/deploy.py.

    relay = PtyRelay(rate=92160, faults=Faults(corrupt=0.005, drop=0.005), seed=1).start()
    host_port = serial.Serial(relay.host_path)      # what the host CLI opens
    device_port = serial.Serial(relay.device_path)  # what the daemon opens (--serial)

A pty pair alone does not throttle to its termios speed (the kernel copies as fast as the reader
reads), so `rate` (bytes/s, per direction) paces the relay: 921600 baud 8N1 = 92160 B/s. The
relay reads little at a time, so a writer faster than the line blocks, as on a real UART.
Faults are seeded: `corrupt` and `drop` are per-byte probabilities of an event that damages or
removes a burst of 1..`burst` bytes; `affected` counts the bytes hit.

For the serial link's security tests the relay also plays a second peer on the same line:
`intruder=True` adds a third pty (`intruder_path`) whose writes are merged into the line to the
device and which hears a copy of everything the device sends (a second cable on a shared bus);
`record=True` keeps every byte the host sent (`recorded`), and `inject(data)` puts bytes on the
line to the device, e.g. a recorded session replayed.
"""

from __future__ import annotations

import os
import random
import select
import threading
import time
import tty
from dataclasses import dataclass, field

SERIAL_BYTES_PER_S = {921600: 92160, 460800: 46080, 115200: 11520}  # 8N1: 10 bits per byte


@dataclass(frozen=True)
class Faults:
    corrupt: float = 0.0  # per byte: start of a burst of bit flips
    drop: float = 0.0  # per byte: start of a burst of lost bytes
    burst: int = 1  # longest burst, bytes


@dataclass
class DirectionStats:
    bytes_in: int = 0
    bytes_out: int = 0
    affected: int = 0  # bytes corrupted or dropped
    gap: float = -1.0  # bytes until the next fault event (carried across reads)

    @property
    def affected_ratio(self) -> float:
        return self.affected / self.bytes_in if self.bytes_in else 0.0


@dataclass
class RelayStats:
    to_device: DirectionStats = field(default_factory=DirectionStats)
    to_host: DirectionStats = field(default_factory=DirectionStats)


class PtyRelay:
    def __init__(self, rate: float | None = None, faults: Faults | None = None, seed: int = 0,
                 fault_to_host: bool = True, intruder: bool = False, record: bool = False) -> None:
        self.rate = rate
        self.faults = faults or Faults()
        self.fault_to_host = fault_to_host  # damage the reverse direction (acks, replies) too
        self.stats = RelayStats()
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._blackout_until = 0.0
        self._host_master, self._host_slave = os.openpty()
        self._dev_master, self._dev_slave = os.openpty()
        for fd in (self._host_slave, self._dev_slave):
            tty.setraw(fd)  # no echo or line editing before anyone opens the slave
        self.host_path = os.ttyname(self._host_slave)
        self.device_path = os.ttyname(self._dev_slave)
        self.recorded: bytearray | None = bytearray() if record else None
        self._to_device = threading.Lock()  # one writer at a time: bytes of two peers never interleave
        self._intruder: tuple[int, int] | None = None
        self.intruder_path: str | None = None
        self._threads = [
            threading.Thread(target=self._pump, args=(self._host_master, self._dev_master,
                                                      self.stats.to_device, True), daemon=True),
            threading.Thread(target=self._pump, args=(self._dev_master, self._host_master,
                                                      self.stats.to_host, fault_to_host), daemon=True),
        ]
        if intruder:
            master, slave = os.openpty()
            tty.setraw(slave)
            os.set_blocking(master, False)  # the copy of the device's bytes is dropped when unread
            self._intruder = (master, slave)
            self.intruder_path = os.ttyname(slave)
            self._threads.append(threading.Thread(target=self._pump, args=(master, self._dev_master,
                                                                           DirectionStats(), False),
                                                  daemon=True))

    def start(self) -> PtyRelay:
        for t in self._threads:
            t.start()
        return self

    def inject(self, data: bytes) -> None:
        """Put bytes on the line to the device (between whole writes of the other peers)."""
        with self._to_device:
            view = memoryview(data)
            while view:
                view = view[os.write(self._dev_master, view):]

    def blackout(self, seconds: float) -> None:
        """Drop everything in both directions for a while (a pulled cable)."""
        self._blackout_until = time.monotonic() + seconds

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=2.0)
        for fd in (self._host_master, self._host_slave, self._dev_master, self._dev_slave,
                   *(self._intruder or ())):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> PtyRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pump(self, src: int, dst: int, st: DirectionStats, faulty: bool) -> None:
        # 10 ms of line time per read when paced, so the writer feels the line's speed
        step = max(64, int(self.rate / 100)) if self.rate else 1 << 16
        next_t = time.monotonic()
        while not self._stop.is_set():
            ready, _, _ = select.select([src], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(src, step)
            except BlockingIOError:
                continue
            except OSError:  # EIO: nobody holds the slave open any more
                return
            st.bytes_in += len(data)
            if self.recorded is not None and src == self._host_master:
                self.recorded += data
            if time.monotonic() < self._blackout_until:
                st.affected += len(data)
                continue
            if faulty and (self.faults.corrupt or self.faults.drop):
                data = self._damage(data, st)
            if self.rate:
                now = time.monotonic()
                # a sleep overshoots; up to 10 ms of lost time is made up, like a UART's FIFO
                next_t = max(next_t, now - 0.01) + len(data) / self.rate
                if next_t > now:
                    time.sleep(next_t - now)
            if dst == self._dev_master:
                with self._to_device:
                    if not self._write(dst, data, st):
                        return
            elif not self._write(dst, data, st):
                return
            if self._intruder and src == self._dev_master:
                try:  # the intruder hears the device too; what it does not read is lost
                    os.write(self._intruder[0], data)
                except OSError:
                    pass

    def _write(self, dst: int, data: bytes, st: DirectionStats) -> bool:
        view = memoryview(data)
        while view and not self._stop.is_set():
            try:
                n = os.write(dst, view)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            except OSError:
                return False
            view = view[n:]
            st.bytes_out += n
        return True

    def _damage(self, data: bytes, st: DirectionStats) -> bytes:
        f, rng = self.faults, self._rng
        p = f.corrupt + f.drop
        out = bytearray(data)
        if st.gap < 0:
            st.gap = rng.expovariate(p)
        i = int(st.gap)
        while i < len(out):
            n = min(rng.randint(1, max(1, f.burst)), len(out) - i)
            st.affected += n
            if rng.random() < f.corrupt / p:
                for j in range(i, i + n):
                    out[j] ^= rng.randint(1, 255)
                i += n
            else:
                del out[i:i + n]
            i += 1 + int(rng.expovariate(p))
        st.gap = i - len(out)  # the next event falls that far into the next read
        return bytes(out)
