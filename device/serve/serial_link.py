"""A reliable, message-oriented link over a serial line (pyserial), for deploys without a network.

    link = Link(serial.serial_for_url("/dev/ttyUSB0", baudrate=921600, timeout=0.05), "host")
    link.connect()                              # SYNC handshake: a fresh session
    reply = link.request(message, timeout=60)   # one message out, one back (bytes of any length)

The device side runs `serve(port, handle)`: it answers each message with handle(message).

Framing (protocols.md §3.2). Each frame is COBS-encoded and ends with 0x00, so a receiver finds
the next frame after any garbage (COBS costs 1 byte per 254, unlike SLIP's worst case of 2x).
Before encoding, little-endian:

    magic "TK" (2) | type (1) | flags (1) | session (4) | seq (4) | aux (4) | len (2) | payload | crc32 (4)

crc32 (zlib) covers everything before it; a frame whose CRC, COBS, magic or length is wrong is
dropped silently, like a lost one (a `len` over 4096 is refused before anything is buffered).
Types:
    DATA      seq = frame number; aux = transmission number of this copy; payload = a fragment
              of a message; flags END on its last fragment
    ACK       seq = cumulative (every frame below it arrived); aux = highest transmission number
              received; payload = 64-bit bitmap of frames seq+1 .. seq+64 held
    SYNC      host -> device: start session `session` (both sides reset their numbering)
    SYNC_ACK  device -> host: session accepted
    PING      host -> device while it waits: the device answers with an ACK (liveness)
    RESET     device -> host: "I do not know your session" (the device restarted): give up now

Reliability: selective repeat, chosen over go-back-N because on a 92 KB/s line go-back-N resends
the whole window (up to 48 KiB, half a second) for every damaged frame. The sender keeps at most
64 frames / 48 KiB in flight, all within 64 sequence numbers of the oldest unacknowledged one,
so the receiver's buffer and the ACK bitmap always cover them; the receiver acknowledges after
every burst it reads. Every copy of a frame carries its own transmission number, and the
receiver echoes the highest it has seen: a serial line never reorders, so any unacknowledged
copy sent before that one was lost and is resent at once, with no timer wait. Otherwise a frame
is resent when its retransmission timer (Jacobson/Karn RTT estimate, 0.1 .. 4 s) runs out; the
timer doubles only while the peer is silent. A frame that needed more than two tries goes
twice. Duplicates (copies of frames that did arrive) are recognised by sequence number and only
re-acknowledged. Sequence and transmission numbers are 32-bit per session and do not wrap in
practice (4 G frames).

Frame size adapts to the line: it starts at 1 KiB (esptool's FLASH_DATA block; 22 header bytes
+ COBS = 2.7 % overhead), doubles up to 2 KiB while frames need < 1.02 sends each, halves down
to 64 bytes while they need > 1.3. A frame's bytes are fixed once numbered, so when nothing at
all gets through for 2 s (at a 1 % byte error rate a 1 KiB frame almost never arrives intact, a
64-byte one does 40 % of the time) the host ends the session and the next one starts with
frames a quarter the size; the deploy resumes from the device's offsets.

Liveness: while the host waits for frames or a reply it pings after 0.5 s of silence; no valid
frame from the device for `dead_after` seconds (15), no progress for `stall_after` (30), or a
RESET raises LinkDown: the caller reconnects (new session) and resumes. Messages over
`max_message` bytes (16 MiB) are refused.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from bundle.errors import ToolkitError
from device.store.checksum import crc32

log = logging.getLogger("toolkit.serial")

MAGIC = b"TK"
DATA, ACK, SYNC, SYNC_ACK, PING, RESET = 1, 2, 3, 4, 5, 6
FLAG_END = 0x01
HEADER = struct.Struct("<2sBBIIIH")  # magic, type, flags, session, seq, aux, len: 18 bytes
CRC = struct.Struct("<I")
MAX_PAYLOAD = 4096  # the most a frame may carry; longer `len` fields are refused before reading
MAX_ENCODED = (HEADER.size + MAX_PAYLOAD + CRC.size) * 255 // 254 + 2
SACK_BITS = 64
SACK = struct.Struct("<Q")  # ACK payload: bitmap of seq+1 .. seq+64 held


class LinkDown(ToolkitError):
    """The link broke (no answer, device restarted, port error); reconnect and resume."""


class Port(Protocol):
    """What the link needs of a port: pyserial's Serial (timeout set) fits."""

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes) -> int | None: ...

    @property
    def in_waiting(self) -> int: ...


# --- COBS ------------------------------------------------------------------------------------

def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: no 0x00 in the output, +1 byte per 254."""
    out = bytearray()
    for block in data.split(b"\x00"):  # every block but the last was followed by a zero
        while len(block) >= 254:
            out.append(0xFF)  # 254 data bytes, no implied zero
            out += block[:254]
            block = block[254:]
        out.append(len(block) + 1)  # len data bytes, then an implied zero (the last one is dropped)
        out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Inverse of cobs_encode; ValueError on a malformed (truncated or zero-bearing) input."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        end = i + code
        if code == 0 or end > n:
            raise ValueError("malformed COBS block")
        out += data[i + 1:end]
        i = end
        if code != 0xFF and i < n:
            out.append(0)
    return bytes(out)


# --- frames ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    type: int
    session: int
    seq: int = 0
    aux: int = 0
    flags: int = 0
    payload: bytes = b""


def encode_frame(f: Frame) -> bytes:
    body = HEADER.pack(MAGIC, f.type, f.flags, f.session, f.seq, f.aux, len(f.payload)) + f.payload
    return cobs_encode(body + CRC.pack(crc32(body))) + b"\x00"


def decode_frame(encoded: bytes) -> Frame | None:
    """One COBS frame (without its 0x00) -> Frame, or None when it is damaged in any way."""
    try:
        raw = cobs_decode(encoded)
    except ValueError:
        return None
    if len(raw) < HEADER.size + CRC.size:
        return None
    magic, ftype, flags, session, seq, aux, length = HEADER.unpack_from(raw)
    if magic != MAGIC or length > MAX_PAYLOAD or len(raw) != HEADER.size + length + CRC.size:
        return None
    if crc32(memoryview(raw)[:-CRC.size]) != CRC.unpack_from(raw, len(raw) - CRC.size)[0]:
        return None
    return Frame(ftype, session, seq, aux, flags, raw[HEADER.size:HEADER.size + length])


class FrameReader:
    """Bytes in, frames out: splits on 0x00, drops damaged frames and runaway garbage."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.damaged = 0

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer += data
        if b"\x00" not in data:
            if len(self.buffer) > MAX_ENCODED:  # no delimiter for too long: garbage, skip it
                self.buffer.clear()
                self.damaged += 1
            return []
        *complete, rest = bytes(self.buffer).split(b"\x00")
        self.buffer = bytearray(rest)
        frames = []
        for enc in complete:
            if not enc:
                continue  # an empty frame: the resync delimiter a writer sends first
            frame = decode_frame(enc) if len(enc) <= MAX_ENCODED else None
            if frame is None:
                self.damaged += 1
            else:
                frames.append(frame)
        return frames


# --- the link ----------------------------------------------------------------------------------

@dataclass
class LinkConfig:
    window: int = 64  # frames in flight (and buffered out of order by the receiver); <= SACK_BITS
    window_bytes: int = 48 << 10  # and at most this much payload in flight
    frame_payload: int = 1024  # initial payload per DATA frame
    min_payload: int = 64
    max_payload: int = 2048
    rto_initial: float = 0.3  # s, before any RTT sample
    rto_min: float = 0.1
    rto_max: float = 4.0
    keepalive: float = 0.5  # s of silence before the host pings
    dead_after: float = 15.0  # s without a valid frame while waiting: LinkDown
    stall_after: float = 30.0  # s without any frame acknowledged while some are in flight: LinkDown
    stuck_after: float = 2.0  # s without progress while frames are larger than min_payload
    max_message: int = 16 << 20
    write_batch: int = 8192  # bytes of frames handed to one port.write


@dataclass
class LinkStats:
    frames_sent: int = 0
    retransmits: int = 0
    frames_received: int = 0
    duplicates: int = 0
    damaged: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


@dataclass
class _Inflight:
    payload: bytes  # the message fragment (fixed once the frame is numbered)
    flags: int
    last_tx: int  # transmission number of its latest copy (a FIFO line delivers in this order)
    sent_at: float
    count: int = 1


@dataclass(frozen=True)
class Incoming:
    session: int
    data: bytes


class Link:
    """One end of the link. role "host" starts sessions (connect), "device" accepts them."""

    def __init__(self, port: Any, role: str, config: LinkConfig | None = None) -> None:
        if role not in ("host", "device"):
            raise ValueError(role)
        self.port, self.role = port, role
        self.cfg = config or LinkConfig()
        self.stats = LinkStats()
        self._cond = threading.Condition()
        self._stop = False
        self._failed: str | None = None
        self.session = 0  # 0: none yet
        self.connected = False
        self._control: deque[Frame] = deque()  # ACK/SYNC/... to send next
        self._next_payload = self.cfg.frame_payload  # DATA payload a new session starts with
        self._last_reset = 0.0
        self._waiting = 0  # callers blocked in recv (the host pings while > 0)
        self._reset_state()
        self._reader = threading.Thread(target=self._read_loop, name=f"serial-rx-{role}", daemon=True)
        self._pump = threading.Thread(target=self._pump_loop, name=f"serial-tx-{role}", daemon=True)
        self._reader.start()
        self._pump.start()

    def _reset_state(self) -> None:
        """Fresh numbering for a new session (called with the lock held, or before threads run)."""
        self._tx_seq = 0
        self._tx_order = 0
        self._inflight: OrderedDict[int, _Inflight] = OrderedDict()
        self._resend: set[int] = set()
        self._outbox: deque[tuple[memoryview, int]] = deque()  # (message bytes, offset sent)
        self._payload = getattr(self, "_next_payload", self.cfg.frame_payload)
        self._adapt_frames = self._adapt_sends = 0
        self._rto = self.cfg.rto_initial
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rx_expected = 0
        self._rx_held: dict[int, Frame] = {}
        self._rx_partial = bytearray()
        self._rx_last_tx = 0  # highest transmission number received (echoed in ACKs)
        self._inbox: deque[Incoming] = deque()
        self._ack_due = False
        now = time.monotonic()
        self._last_rx = self._last_ping = self._last_progress = now
        self._last_timeout = 0.0

    # -- public API --

    def connect(self, timeout: float = 5.0) -> None:
        """Host: start a new session; LinkDown when the device does not answer in time."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self.session = random.randrange(1, 1 << 32)
            self.connected = False
            self._reset_state()
            self._failed = None
            while not self.connected:
                self._control.append(Frame(SYNC, self.session))
                self._cond.notify_all()
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    raise LinkDown(f"no device answered on {_port_name(self.port)} within {timeout:.0f} s",
                                   hint="is the daemon running with --serial on that port, at the "
                                        "same baud rate?")
                self._cond.wait(min(0.25, left))

    def send(self, data: bytes, session: int | None = None) -> None:
        """Queue a message. With `session` (a reply), it is dropped if that session has ended."""
        if len(data) > self.cfg.max_message:
            raise ToolkitError(f"message of {len(data)} bytes exceeds the link's "
                               f"{self.cfg.max_message}-byte limit")
        with self._cond:
            self._check()
            if session is not None and session != self.session:
                return
            self._outbox.append((memoryview(data), 0))
            self._cond.notify_all()

    def recv(self, timeout: float | None = None) -> Incoming | None:
        """The next whole message (None on timeout); LinkDown when the link is broken."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while not self._inbox:
                    self._check()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._cond.wait(0.2 if left is None else min(0.2, left))
                return self._inbox.popleft()
            finally:
                self._waiting -= 1

    def request(self, data: bytes, timeout: float) -> bytes:
        """Host: send a message and wait for the reply. `timeout` bounds the device's answer
        once every frame of the message is acknowledged; sending takes as long as the line
        needs (a stalled line raises LinkDown after stall_after)."""
        session = self.session
        self.send(data)
        with self._cond:
            self._waiting += 1  # keep pinging while we wait
            try:
                while self._outbox or self._inflight:
                    self._check()
                    self._cond.wait(0.2)
            finally:
                self._waiting -= 1
        msg = self.recv(timeout)
        if msg is None:
            raise LinkDown(f"the device did not answer within {timeout:.0f} s")
        if msg.session != session:
            raise LinkDown("the session changed while waiting for a reply")
        return msg.data

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in (self._pump, self._reader):
            if t is not threading.current_thread():
                t.join(timeout=3.0)

    @property
    def alive(self) -> bool:
        return self._reader.is_alive() and self._pump.is_alive()

    def forget_session(self) -> None:
        """Device: drop a broken session; the host's next SYNC starts a new one."""
        with self._cond:
            self.session = 0
            self._failed = None
            self._reset_state()

    def _check(self) -> None:
        if self._failed:
            raise LinkDown(self._failed, hint="the deploy reconnects and resumes by itself; "
                                              "re-run it if it gave up")
        if self._stop:
            raise LinkDown("the link is closed")

    def _fail(self, why: str) -> None:
        if not self._failed:
            log.info("serial link (%s) down: %s", self.role, why)
            self._failed = why
        self._cond.notify_all()

    # -- receiving (reader thread) --

    def _read_loop(self) -> None:
        reader = FrameReader()
        while not self._stop:
            try:
                data = self.port.read(1)
                if data:
                    more = self.port.in_waiting
                    if more:
                        data += self.port.read(min(more, 1 << 16))
            except (OSError, ValueError, TypeError) as e:  # pyserial's SerialException is an OSError
                with self._cond:
                    self._fail(f"reading {_port_name(self.port)} failed: {e}")
                return
            if not data:
                continue
            frames = reader.feed(data)
            with self._cond:
                self.stats.bytes_in += len(data)
                self.stats.damaged = reader.damaged
                for frame in frames:
                    self._on_frame(frame)
                if frames:
                    self._cond.notify_all()

    def _on_frame(self, f: Frame) -> None:
        self.stats.frames_received += 1
        if f.type == SYNC and self.role == "device":
            if f.session != self.session:
                log.info("serial session %08x started", f.session)
                self.session = f.session
                self._reset_state()
                self._failed = None
            self._control.append(Frame(SYNC_ACK, f.session))
            return
        if f.session != self.session or self.session == 0:
            if self.role == "device" and f.type in (DATA, PING):
                now = time.monotonic()
                if now - self._last_reset > 0.2:  # tell the host once in a while, not per frame
                    self._last_reset = now
                    self._control.append(Frame(RESET, f.session))
            return  # a frame of an old session
        self._last_rx = time.monotonic()
        if f.type == SYNC_ACK and self.role == "host":
            self.connected = True
        elif f.type == RESET and self.role == "host":
            self._fail("the device does not know this session (it restarted)")
        elif f.type == PING:
            self._ack_due = True
        elif f.type == ACK:
            bitmap = SACK.unpack(f.payload)[0] if len(f.payload) == SACK.size else 0
            self._on_ack(f.seq, bitmap, f.aux)
        elif f.type == DATA:
            self._on_data(f)

    def _on_data(self, f: Frame) -> None:
        self._ack_due = True
        self._rx_last_tx = max(self._rx_last_tx, f.aux)
        if f.seq < self._rx_expected or f.seq in self._rx_held:
            self.stats.duplicates += 1
            return
        if f.seq >= self._rx_expected + self.cfg.window:
            return  # beyond the sender's window: not ours to buffer
        self._rx_held[f.seq] = f
        while (g := self._rx_held.pop(self._rx_expected, None)) is not None:
            self._rx_expected += 1
            self._rx_partial += g.payload
            if len(self._rx_partial) > self.cfg.max_message:
                self._rx_partial = bytearray()
                self._fail(f"the peer sent a message over {self.cfg.max_message} bytes")
                return
            if g.flags & FLAG_END:
                self._inbox.append(Incoming(self.session, bytes(self._rx_partial)))
                self._rx_partial = bytearray()

    def _on_ack(self, cum: int, bitmap: int, delivered: int) -> None:
        now = time.monotonic()
        acked = [s for s in self._inflight if s < cum]
        acked += [cum + 1 + i for i in range(SACK_BITS) if bitmap >> i & 1 and cum + 1 + i in self._inflight]
        for s in acked:
            rec = self._inflight.pop(s)
            self._resend.discard(s)
            if rec.count == 1:  # Karn: only unambiguous samples
                self._rtt_sample(now - rec.sent_at)
            self._adapt_frames += 1
            self._adapt_sends += rec.count
        self._adapt()
        if acked:
            self._rto = self._rto_estimate()
            self._last_progress = now
        # the line is FIFO: a copy transmitted before the latest transmission that arrived, and
        # not acknowledged, was lost; resend it now rather than at its timer
        for s, rec in self._inflight.items():
            if rec.last_tx < delivered:
                self._resend.add(s)

    def _rtt_sample(self, rtt: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = rtt, rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            self._srtt = 0.875 * self._srtt + 0.125 * rtt

    def _rto_estimate(self) -> float:
        if self._srtt is None:
            return self.cfg.rto_initial
        return min(self.cfg.rto_max, max(self.cfg.rto_min, self._srtt + 4 * self._rttvar))

    # -- sending (pump thread: the only writer) --

    def _pump_loop(self) -> None:
        while True:
            with self._cond:
                batch = self._collect()
                while not batch and not self._stop:
                    self._cond.wait(self._next_timer())
                    batch = self._collect()
                if self._stop:
                    return
            try:
                self.port.write(b"\x00" + b"".join(batch))  # leading 0x00: resync after a torn write
            except (OSError, ValueError, TypeError) as e:  # SerialTimeoutException is an OSError too
                with self._cond:
                    self._fail(f"writing {_port_name(self.port)} failed: {e}")
                    if self._stop:
                        return
                time.sleep(0.05)
                continue
            with self._cond:
                self.stats.bytes_out += sum(len(b) for b in batch) + 1

    def _next_timer(self) -> float:
        """How long the pump may sleep: until the oldest frame's retransmission timer or the
        next keepalive/dead check."""
        wait = 0.25
        if self._inflight:
            oldest = next(iter(self._inflight.values()))
            wait = min(wait, max(0.001, oldest.sent_at + self._rto - time.monotonic()))
        return wait

    def _collect(self) -> list[bytes]:
        """Frames to write now (lock held): control first, then losses, timeouts, new data."""
        now = time.monotonic()
        out: list[bytes] = []
        size = 0
        while self._control:
            out.append(encode_frame(self._control.popleft()))
        if self._ack_due and self.session:
            out.append(encode_frame(Frame(ACK, self.session, self._rx_expected, self._rx_last_tx,
                                          payload=SACK.pack(self._sack_bitmap()))))
            self._ack_due = False
        if not self.session or self._failed:
            return out
        if self.role == "host" and (self._inflight or self._waiting):
            silent = now - self._last_rx
            if silent > self.cfg.dead_after:
                self._fail(f"no answer from the device for {silent:.0f} s")
                return out
            if silent > self.cfg.keepalive and now - self._last_ping > self.cfg.keepalive:
                out.append(encode_frame(Frame(PING, self.session)))
                self._last_ping = now
        if self.role == "host" and self._inflight and self._stuck(now):
            return out
        timed_out = [s for s, r in self._inflight.items() if now - r.sent_at > self._rto]
        if timed_out:
            # back off only while the peer is silent: a serial line has no other traffic to
            # make room for, so a peer that answers (acks, pings) gets the normal timer
            if self._last_rx < self._last_timeout:
                self._rto = min(self.cfg.rto_max, self._rto * 2)
            self._last_timeout = now
        for s in sorted(self._resend.union(timed_out)):
            rec = self._inflight.get(s)
            if rec is None:
                continue
            # every due retransmission goes now (at most a window's worth); a frame lost twice
            # goes twice, so a noisy line does not stall the window on its oldest frame
            for _ in range(2 if rec.count > 2 else 1):
                out.append(self._encode_data(s, rec, now))
                size += len(out[-1])
            rec.count += 1
            self.stats.retransmits += 1
        self._resend.clear()
        # selective repeat: new frames stay within `window` of the oldest unacknowledged one, so
        # the receiver's buffer and the ACK bitmap always cover every frame in flight
        base = next(iter(self._inflight)) if self._inflight else self._tx_seq
        in_flight = sum(len(r.payload) for r in self._inflight.values())
        while (self._outbox and self._tx_seq < base + self.cfg.window and size < self.cfg.write_batch
               and in_flight < self.cfg.window_bytes):
            enc = self._next_data_frame(now)
            out.append(enc)
            size += len(enc)
            in_flight += len(self._inflight[self._tx_seq - 1].payload)
        return out

    def _stuck(self, now: float) -> bool:
        """A frame's bytes are fixed once numbered, so on a line that damages nearly every frame
        of that size nothing is acknowledged and _adapt never runs: end the session and start
        the next one (the caller reconnects and resumes) with frames a quarter the size.
        Also: no progress at all for stall_after."""
        oldest = next(iter(self._inflight.values()))
        size = len(oldest.payload)
        silent = now - self._last_progress
        if silent > max(self.cfg.stuck_after, 4 * self._rto_estimate()) and size > self.cfg.min_payload:
            self._next_payload = max(self.cfg.min_payload, size // 4)
            self._fail(f"nothing got through in {silent:.1f} s with {size}-byte frames; "
                       f"reconnecting with {self._next_payload}-byte frames")
            return True
        if now - self._last_progress > self.cfg.stall_after:
            self._fail(f"no frame got through for {now - self._last_progress:.0f} s")
            return True
        return False

    def _next_data_frame(self, now: float) -> bytes:
        view, offset = self._outbox[0]
        piece = view[offset:offset + self._payload]
        offset += len(piece)
        end = offset >= len(view)
        if end:
            self._outbox.popleft()
        else:
            self._outbox[0] = (view, offset)
        seq = self._tx_seq
        self._tx_seq += 1
        rec = _Inflight(bytes(piece), FLAG_END if end else 0, 0, now)
        self._inflight[seq] = rec
        self.stats.frames_sent += 1
        return self._encode_data(seq, rec, now)

    def _encode_data(self, seq: int, rec: _Inflight, now: float) -> bytes:
        """Each copy carries its own transmission number in aux (the receiver echoes the highest
        it has seen, which tells the sender exactly which earlier copies were lost)."""
        self._tx_order += 1
        rec.last_tx, rec.sent_at = self._tx_order, now
        return encode_frame(Frame(DATA, self.session, seq, self._tx_order & 0xFFFFFFFF, rec.flags,
                                  rec.payload))

    def _adapt(self) -> None:
        """Every 32 acknowledged frames: halve the frame size for new frames when they needed
        more than 1.3 sends each on average, double it when fewer than 1.02."""
        if self._adapt_frames < 32:
            return
        sends = self._adapt_sends / self._adapt_frames
        if sends > 1.3:
            self._payload = max(self.cfg.min_payload, self._payload // 2)
        elif sends < 1.02:
            self._payload = min(self.cfg.max_payload, self._payload * 2)
        self._next_payload = self._payload  # the next session starts where this one got to
        self._adapt_frames = self._adapt_sends = 0

    def _sack_bitmap(self) -> int:
        base = self._rx_expected + 1
        bits = 0
        for s in self._rx_held:
            if base <= s < base + SACK_BITS:
                bits |= 1 << (s - base)
        return bits


def _port_name(port: Any) -> str:
    return str(getattr(port, "port", None) or getattr(port, "name", None) or "the serial port")


# --- ports -------------------------------------------------------------------------------------

DEFAULT_BAUD = 921600


def open_port(path: str, baud: int = DEFAULT_BAUD) -> Any:
    """A pyserial port in raw 8N1 with no flow control; `path` may be a pyserial URL
    (socket://, loop://, rfc2217://) as well as a device path."""
    import serial

    try:
        return serial.serial_for_url(path, baudrate=baud, timeout=0.05, write_timeout=2.0,
                                     bytesize=8, parity="N", stopbits=1, xonxoff=False,
                                     rtscts=False, dsrdtr=False)
    except (serial.SerialException, ValueError) as e:
        raise ToolkitError(f"cannot open the serial port {path}: {e}",
                           hint="check the device path and that no other program holds it "
                                "(and that you are in the dialout group)") from e


def serve(port: Any, handle: Callable[[bytes], bytes], stop: threading.Event,
          config: LinkConfig | None = None) -> None:
    """Device: answer each message with handle(message) until `stop` is set. A broken session
    is forgotten; the host's next SYNC starts a new one."""
    link = Link(port, "device", config)
    try:
        while not stop.is_set():
            try:
                msg = link.recv(timeout=0.5)
            except LinkDown:
                if not link.alive:
                    raise  # the port itself failed: let the daemon report it
                link.forget_session()
                continue
            if msg is not None:
                link.send(handle(msg.data), session=msg.session)
    finally:
        link.close()

