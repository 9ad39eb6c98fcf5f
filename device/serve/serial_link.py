"""A reliable, authenticated, message-oriented link over a serial line (pyserial), for deploys
without a network.

    link = Link(serial.serial_for_url("/dev/ttyUSB0", baudrate=921600, timeout=0.05), "host",
                tokens=[b"the board's token"])
    link.connect()                              # handshake: a fresh, authenticated session
    reply = link.request(message, timeout=60)   # one message out, one back (bytes of any length)

The device side runs `serve(port, handle, stop, tokens)`: it answers each message of an
authenticated session with handle(message). `tokens` are the lines of the daemon's --token-file
(the same file that guards TCP; several allow rotation); the host uses the one its devices
registry entry names.

Framing (protocols.md §3.2). Each frame is COBS-encoded and ends with 0x00, so a receiver finds
the next frame after any garbage (COBS costs 1 byte per 254, unlike SLIP's worst case of 2x).
Before encoding, little-endian (link version 2; version 1 had no version byte, ctr or mac):

    magic "TK" (2) | version 2 (1) | type (1) | flags (1) | session (4) | ctr (4) | seq (4) | len (2)
    | payload (len) | sealed frames: mac (16) / open frames: crc32 (4)

A sealed frame ends in `mac`, the first 16 bytes of HMAC-SHA256(direction key, header | payload):
the header includes the session, the frame counter `ctr` and `seq`. The mac also does the CRC's
job (line noise fails it like a forgery), so a sealed frame carries no CRC: on a noisy line
frames shrink to 64 bytes, where every header byte costs throughput. An open (handshake) frame
has no key to seal with: it ends in crc32 (zlib) of everything before it, and its payload
carries the proof. A frame whose COBS, magic, version, length, CRC or mac is wrong is dropped
silently, like a lost one (a `len` over 4096 is refused before anything is buffered). Types:

    open frames (the handshake; anyone can send them, none of them reaches the handler)
    SYNC       host -> device: start session `session`; payload = host nonce Nh (16)
    CHALLENGE  device -> host: payload = device nonce Nd (16)
    AUTH       host -> device: payload = Nd (16) | HMAC-SHA256(secret, "host proof" | T) (32)
    REFUSED    device -> host: payload = reason (1) | retry after, ms (4); reasons: 1 the proof
               is wrong (wrong secret), 2 no such handshake (start again), 3 backing off
    RESET      device -> host: "I do not know your session" (the device restarted): give up now
    sealed frames (only within an authenticated session; ctr = 1, 2, 3 ... per direction)
    AUTH_OK    device -> host: the session is established (its mac proves the device's key)
    DATA       seq = frame number; payload = a fragment of a message; flags END on its last
               fragment; its ctr doubles as the transmission number of this copy
    ACK        seq = cumulative (every frame below it arrived); payload = 64-bit bitmap of frames
               seq+1 .. seq+64 held | highest DATA ctr received (4)
    PING       host -> device while it waits: the device answers with an ACK (liveness)

Authentication. T = "toolkit-serial/2" | session (4) | Nh | Nd, with both nonces fresh from
`secrets` for every session. The host proves it knows the secret first, and the device says
nothing derived from the secret until it has checked that proof: a peer without the secret gets
only nonces and REFUSED, nothing to guess the token against offline. Both sides then derive
the session's keys, one per direction (a frame cannot be reflected back to its sender):

    K(host->device) = HMAC-SHA256(secret, "key host->device" | T)
    K(device->host) = HMAC-SHA256(secret, "key device->host" | T)

and the device answers AUTH_OK sealed with its key, which proves to the host that the device
holds the secret too. A sealed frame is accepted only with a valid mac under the current
session's key and a `ctr` above the last accepted one (a serial line never reorders), so a frame
replayed from this session (old ctr) or an earlier one (other nonces, other keys) is refused,
and the handler never sees a message that did not come from a holder of the secret.

The device keeps its current session while handshakes run beside it (up to 4, by session): a
SYNC, a CHALLENGE or a failed AUTH changes nothing of the session in progress; only an AUTH with
a valid proof replaces it (a host reconnecting after a drop). Failed proofs are rate-limited: after
n failures in a row the device checks no proof for min(4, 0.25 * 2^(n-1)) s and answers REFUSED
"backing off" meanwhile, so guessing a token over the cable takes seconds per try (use a random
token: `secrets.token_hex(32)`; a token that can be guessed offline from a captured AUTH is the
one risk a rate limit cannot cover). A host whose proof is refused raises AuthRefused at once.

Old peers. A version-1 frame (no version byte) is recognised by its own CRC: the device logs that
an old host tried and answers nothing (an old host only sees its own timeout); a host whose SYNC
goes unanswered for a second also sends a version-1 PING, which an old device answers with a
version-1 RESET, and then raises "the board speaks link version 1" instead of timing out.

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
re-acknowledged. Sequence, transmission and frame counter numbers are 32-bit per session and do
not wrap in practice (4 G frames).

Frame size adapts to the line: it starts at 1 KiB (esptool's FLASH_DATA block; 35 header and mac
bytes + COBS = 3.8 % overhead), doubles up to 2 KiB while frames need < 1.02 sends each,
halves down to 64 bytes while they need > 1.3. A frame's bytes are fixed once numbered, so when
nothing at all gets through for 2 s (at a 1 % byte error rate a 1 KiB frame almost never arrives
intact, a 64-byte one does 40 % of the time) the host ends the session and the next one starts
with frames a quarter the size; the deploy resumes from the device's offsets.

Liveness: while the host waits for frames or a reply it pings after 0.5 s of silence; no valid
frame from the device for `dead_after` seconds (15), no progress for `stall_after` (30), or a
RESET raises LinkDown: the caller reconnects (new session, new handshake) and resumes. RESET is
an open frame (the device cannot seal for a session it does not know), so a forged one can only
make the host authenticate again. Messages over `max_message` bytes (16 MiB) are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bundle.errors import ToolkitError
from device.store.checksum import crc32

log = logging.getLogger("toolkit.serial")

MAGIC = b"TK"
VERSION = 2
DATA, ACK, SYNC, CHALLENGE, PING, RESET, AUTH, AUTH_OK, REFUSED = 1, 2, 3, 4, 5, 6, 7, 8, 9
OPEN_TYPES = frozenset({SYNC, CHALLENGE, AUTH, REFUSED, RESET})  # carry no mac
FLAG_END = 0x01
HEADER = struct.Struct("<2sBBBIIIH")  # magic, version, type, flags, session, ctr, seq, len: 19 bytes
MAC_BYTES = 16
NO_MAC = bytes(MAC_BYTES)
CRC = struct.Struct("<I")
MAX_PAYLOAD = 4096  # the most a frame may carry; longer `len` fields are refused before reading
MAX_ENCODED = (HEADER.size + MAX_PAYLOAD + MAC_BYTES) * 255 // 254 + 2
SACK_BITS = 64
SACK = struct.Struct("<QI")  # ACK payload: bitmap of seq+1 .. seq+64 held, highest DATA ctr received
NONCE_BYTES = 16
PROOF_BYTES = 32
REFUSAL = struct.Struct("<BI")  # REFUSED payload: reason, retry after (ms)
WRONG_SECRET, NO_HANDSHAKE, BACKING_OFF = 1, 2, 3
PENDING_HANDSHAKES = 4  # handshakes the device holds beside its session
V1_HEADER = struct.Struct("<2sBBIIIH")  # link version 1: magic, type, flags, session, seq, aux, len


class LinkDown(ToolkitError):
    """The link broke (no answer, device restarted, port error); reconnect and resume."""


class AuthRefused(ToolkitError):
    """The device refused this host's proof: the secret is wrong. Retrying cannot help."""


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
    flags: int = 0
    payload: bytes = b""
    ctr: int = 0  # frame counter of a sealed frame (per session and direction, from 1)
    mac: bytes = field(default=NO_MAC, compare=False)  # as received (encode_frame computes it)
    signed: bytes | memoryview = field(default=b"", compare=False, repr=False)  # received header | payload
    version: int = VERSION  # 1: an old peer's frame (decoded only so that it can be named)


def frame_mac(key: bytes, body: bytes | memoryview) -> bytes:
    return hmac.new(key, body, hashlib.sha256).digest()[:MAC_BYTES]  # ~3.6 us for a 1 KiB frame


def encode_frame(f: Frame, key: bytes | None = None) -> bytes:
    """Header | payload | mac (sealed) or crc32 (open), COBS-encoded, ending in 0x00. A sealed
    frame (any type outside OPEN_TYPES) needs the sender's direction key."""
    body = HEADER.pack(MAGIC, VERSION, f.type, f.flags, f.session, f.ctr, f.seq, len(f.payload)) + f.payload
    if f.type in OPEN_TYPES:
        return cobs_encode(body + CRC.pack(crc32(body))) + b"\x00"
    if key is None:
        raise ValueError(f"frame type {f.type} is sealed: it needs a key")
    return cobs_encode(body + frame_mac(key, body)) + b"\x00"


def verify_frame(f: Frame, key: bytes) -> bool:
    """Whether a sealed frame's mac is right under `key` (constant-time comparison)."""
    body = f.signed or HEADER.pack(MAGIC, VERSION, f.type, f.flags, f.session, f.ctr, f.seq,
                                   len(f.payload)) + f.payload
    return hmac.compare_digest(frame_mac(key, body), f.mac)


def decode_frame(encoded: bytes) -> Frame | None:
    """One COBS frame (without its 0x00) -> Frame, or None when its COBS, magic, version, length
    or (open frame) CRC is wrong. A sealed frame's mac is only carried: checking it needs the
    session's key (Link does; damage to a sealed frame shows there). A link-version-1 frame
    comes back with version=1."""
    try:
        raw = cobs_decode(encoded)
    except ValueError:
        return None
    if len(raw) >= HEADER.size + CRC.size:
        magic, version, ftype, flags, session, ctr, seq, length = HEADER.unpack_from(raw)
        end = HEADER.size + length
        if magic == MAGIC and version == VERSION and length <= MAX_PAYLOAD:
            if ftype not in OPEN_TYPES:
                if len(raw) == end + MAC_BYTES:
                    return Frame(ftype, session, seq, flags, raw[HEADER.size:end], ctr, raw[end:],
                                 signed=memoryview(raw)[:end])
            elif (len(raw) == end + CRC.size
                  and crc32(memoryview(raw)[:end]) == CRC.unpack_from(raw, end)[0]):
                return Frame(ftype, session, seq, flags, raw[HEADER.size:end], ctr)
    return _decode_v1(raw)


def _decode_v1(raw: bytes) -> Frame | None:
    """A link-version-1 frame (an old toolkit's), recognised by its own CRC, else None."""
    if len(raw) < V1_HEADER.size + CRC.size:
        return None
    magic, ftype, flags, session, seq, _aux, length = V1_HEADER.unpack_from(raw)
    if magic != MAGIC or len(raw) != V1_HEADER.size + length + CRC.size:
        return None
    if crc32(memoryview(raw)[:-CRC.size]) != CRC.unpack_from(raw, len(raw) - CRC.size)[0]:
        return None
    return Frame(ftype, session, seq, flags, raw[V1_HEADER.size:-CRC.size], version=1)


def encode_v1_frame(ftype: int, session: int) -> bytes:
    """An empty version-1 frame: the host's probe for an old device (see the module notes)."""
    body = V1_HEADER.pack(MAGIC, ftype, 0, session, 0, 0, 0)
    return cobs_encode(body + CRC.pack(crc32(body))) + b"\x00"


class FrameReader:
    """Bytes in, frames out: splits on 0x00, drops what decode_frame refuses and runaway garbage."""

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


# --- the handshake ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionKeys:
    proof: bytes  # the host's proof of the secret for this handshake
    host_to_device: bytes
    device_to_host: bytes


def session_keys(secret: bytes, session: int, host_nonce: bytes, device_nonce: bytes) -> SessionKeys:
    transcript = b"toolkit-serial/2" + struct.pack("<I", session) + host_nonce + device_nonce

    def derive(label: bytes) -> bytes:
        return hmac.new(secret, label + transcript, hashlib.sha256).digest()

    return SessionKeys(derive(b"host proof"), derive(b"key host->device"), derive(b"key device->host"))


@dataclass
class _HostHandshake:
    """The host's side of a handshake in progress."""

    session: int
    host_nonce: bytes
    device_nonce: bytes | None = None
    keys: SessionKeys | None = None
    sent_at: float = 0.0  # of the latest SYNC or AUTH (resent every 0.25 s)
    wait_until: float = 0.0  # the device backs off: no AUTH before this
    refused: bool = False
    old_peer: bool = False  # a version-1 device answered the probe


@dataclass
class _Pending:
    """A handshake the device answered with a CHALLENGE and has not seen proven yet."""

    host_nonce: bytes
    device_nonce: bytes


@dataclass(frozen=True)
class _Established:
    """What the device keeps of the handshake behind its current session: a repeated AUTH (the
    host did not hear AUTH_OK) is answered again rather than refused."""

    device_nonce: bytes
    proof: bytes


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
    handshake_resend: float = 0.25  # s between copies of an unanswered SYNC or AUTH
    auth_backoff: float = 0.25  # s the device checks no proof after a failed one; doubles per failure
    auth_backoff_max: float = 4.0


@dataclass
class LinkStats:
    frames_sent: int = 0
    retransmits: int = 0
    frames_received: int = 0
    duplicates: int = 0
    damaged: int = 0  # frames the line damaged (COBS, length, CRC of an open frame)
    rejected: int = 0  # sealed frames with a wrong mac (line damage or forgery) or of no session
    replayed: int = 0  # sealed frames with a valid mac and a frame counter already seen
    auth_failures: int = 0  # device: AUTHs with a wrong proof
    old_peers: int = 0  # version-1 frames seen
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
    """One end of the link. role "host" starts sessions (connect), "device" accepts them.
    `tokens`: the shared secret(s); the host proves the one it is given, the device accepts a
    proof of any of its tokens (rotation)."""

    def __init__(self, port: Any, role: str, config: LinkConfig | None = None, *,
                 tokens: Sequence[bytes]) -> None:
        if role not in ("host", "device"):
            raise ValueError(role)
        tokens = [bytes(t) for t in tokens if t]
        if not tokens or (role == "host" and len(tokens) != 1):
            raise ToolkitError("the serial link needs a shared secret (the device's token)",
                               hint="the daemon reads it from --token-file; the host from the device's "
                                    "?token-file= (toolkit devices add) or $TOOLKIT_TOKEN")
        self.port, self.role = port, role
        self._tokens = tokens
        self.cfg = config or LinkConfig()
        self.stats = LinkStats()
        self._cond = threading.Condition()
        self._stop = False
        self._failed: str | None = None
        self.session = 0  # the authenticated session; 0: none
        self.connected = False
        self._tx_key: bytes | None = None  # this side's direction key for `session`
        self._rx_key: bytes | None = None
        self._control: deque[Frame] = deque()  # ACK/SYNC/... to send next
        self._raw_control: deque[bytes] = deque()  # encoded frames to send as they are (v1 probe)
        self._next_payload = self.cfg.frame_payload  # DATA payload a new session starts with
        self._last_reset = 0.0
        self._waiting = 0  # callers blocked in recv (the host pings while > 0)
        self._handshake: _HostHandshake | None = None  # host: the one in progress
        self._pending: OrderedDict[int, _Pending] = OrderedDict()  # device: handshakes by session
        self._established: _Established | None = None  # device: the current session's handshake
        self._auth_failures = 0  # device: failed proofs in a row
        self._auth_blocked_until = 0.0
        self._last_old_peer_log = -1e9
        self._reset_state()
        self._reader = threading.Thread(target=self._read_loop, name=f"serial-rx-{role}", daemon=True)
        self._pump = threading.Thread(target=self._pump_loop, name=f"serial-tx-{role}", daemon=True)
        self._reader.start()
        self._pump.start()

    def _reset_state(self) -> None:
        """Fresh numbering for a new session (called with the lock held, or before threads run)."""
        self._tx_seq = 0
        self._tx_ctr = 0  # frame counter of the latest sealed frame sent
        self._rx_ctr = 0  # highest frame counter accepted from the peer
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
        self._rx_last_tx = 0  # highest DATA ctr received (echoed in ACKs)
        self._inbox: deque[Incoming] = deque()
        self._ack_due = False
        now = time.monotonic()
        self._last_rx = self._last_ping = self._last_progress = now
        self._last_timeout = 0.0

    # -- public API --

    def connect(self, timeout: float = 5.0) -> None:
        """Host: authenticate a new session. AuthRefused when the device refuses the secret,
        ToolkitError when it speaks link version 1, LinkDown when it does not answer in time."""
        cfg = self.cfg
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            hs = _HostHandshake(secrets.randbits(32) or 1, secrets.token_bytes(NONCE_BYTES))
            self._handshake = hs
            self.session, self.connected = 0, False
            self._tx_key = self._rx_key = None
            self._reset_state()
            self._failed = None
            try:
                while not self.connected:
                    if self._stop:
                        raise LinkDown("the link is closed")
                    if hs.refused:
                        raise AuthRefused(
                            f"the board on {_port_name(self.port)} refused the serial secret; check "
                            "the token file",
                            hint="the host uses the device's ?token-file= (toolkit devices add NAME "
                                 "serial://PORT?token-file=F) or $TOOLKIT_TOKEN; it must hold a line of "
                                 "the daemon's --token-file")
                    if hs.old_peer:
                        raise ToolkitError(
                            f"the board on {_port_name(self.port)} speaks serial link version 1 (an "
                            "older toolkit, without authentication); this host speaks version 2",
                            hint="upgrade the toolkit on the board and start its daemon with --token-file")
                    now = time.monotonic()
                    if now - hs.sent_at >= cfg.handshake_resend and now >= hs.wait_until:
                        self._send_handshake(hs, now)
                        if hs.device_nonce is None and now - start >= 1.0:
                            # an old device answers a version-1 PING of an unknown session
                            self._raw_control.append(encode_v1_frame(PING, hs.session))
                    if hs.wait_until > now:  # the device backs off; wait, within a bound
                        deadline = max(deadline, min(hs.wait_until + 1.0,
                                                     start + timeout + 2 * cfg.auth_backoff_max))
                    left = deadline - now
                    if left <= 0 and hs.device_nonce is not None:
                        raise LinkDown(f"the board on {_port_name(self.port)} challenged this host but "
                                       f"did not confirm its proof within {now - start:.0f} s (a line "
                                       "too noisy for the handshake?)")
                    if left <= 0:
                        raise LinkDown(f"no device answered on {_port_name(self.port)} within "
                                       f"{now - start:.0f} s",
                                       hint="is the daemon running with --serial on that port, at the "
                                            "same baud rate?")
                    wake = hs.wait_until - now if hs.wait_until > now else cfg.handshake_resend
                    self._cond.wait(max(0.001, min(wake, left)))
            finally:
                self._handshake = None

    def _send_handshake(self, hs: _HostHandshake, now: float) -> None:
        """SYNC until the device challenges, then AUTH until it confirms (lock held)."""
        if hs.device_nonce is None or hs.keys is None:
            frame = Frame(SYNC, hs.session, payload=hs.host_nonce)
        else:
            frame = Frame(AUTH, hs.session, payload=hs.device_nonce + hs.keys.proof)
        # twice: on a line that damages 1 % of bytes a handshake frame arrives ~60 % of the time,
        # and the device answers a repeated SYNC or AUTH exactly as the first
        self._control += (frame, frame)
        hs.sent_at = now
        self._cond.notify_all()

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
        """Device: drop a broken session; the host's next handshake starts a new one."""
        with self._cond:
            self.session = 0
            self._tx_key = self._rx_key = None
            self._established = None
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
        if f.version != VERSION:
            self._on_old_peer(f)
        elif f.type in OPEN_TYPES:
            self._on_open_frame(f)
        elif self.session and f.session == self.session and self._rx_key is not None:
            if not verify_frame(f, self._rx_key):
                self.stats.rejected += 1  # forged, or sealed under another key
            elif f.ctr <= self._rx_ctr:
                self.stats.replayed += 1  # a serial line never reorders: this frame came before
            else:
                self._rx_ctr = f.ctr
                self._on_session_frame(f)
        elif self.role == "host" and f.type == AUTH_OK:
            self._on_auth_ok(f)
        else:
            self.stats.rejected += 1  # a sealed frame of no session this side holds
            if self.role == "device" and f.type in (DATA, PING):
                now = time.monotonic()
                if now - self._last_reset > 0.2:  # tell the host once in a while, not per frame
                    self._last_reset = now
                    self._control.append(Frame(RESET, f.session))

    def _on_session_frame(self, f: Frame) -> None:
        """A sealed frame of the current session, its mac and counter checked."""
        self._last_rx = time.monotonic()
        if f.type == PING:
            self._ack_due = True
        elif f.type == ACK:
            bitmap, delivered = SACK.unpack(f.payload) if len(f.payload) == SACK.size else (0, 0)
            self._on_ack(f.seq, bitmap, delivered)
        elif f.type == DATA:
            self._on_data(f)

    def _on_open_frame(self, f: Frame) -> None:
        if self.role == "device":
            if f.type == SYNC:
                self._on_sync(f)
            elif f.type == AUTH:
                self._on_auth(f)
            return
        hs = self._handshake
        if f.type == RESET:
            if self.session and f.session == self.session:
                self._fail("the device does not know this session (it restarted)")
            return
        if hs is None or f.session != hs.session:
            return  # another host's handshake on the same line, or one that is over
        if f.type == CHALLENGE and len(f.payload) == NONCE_BYTES:
            if f.payload != hs.device_nonce:
                hs.device_nonce = f.payload
                hs.keys = session_keys(self._tokens[0], hs.session, hs.host_nonce, f.payload)
                self._send_handshake(hs, time.monotonic())
        elif f.type == REFUSED and len(f.payload) == REFUSAL.size:
            reason, retry_ms = REFUSAL.unpack(f.payload)
            if reason == WRONG_SECRET:
                hs.refused = True
            elif reason == NO_HANDSHAKE:  # the device lost it (restarted): challenge again
                hs.device_nonce, hs.keys, hs.sent_at = None, None, 0.0
            elif reason == BACKING_OFF:
                hs.wait_until = time.monotonic() + min(retry_ms / 1000, self.cfg.auth_backoff_max)
            self._cond.notify_all()

    def _on_auth_ok(self, f: Frame) -> None:
        """Host: the device confirms the handshake; its mac proves it derived the same key."""
        hs = self._handshake
        if hs is None or hs.keys is None or f.session != hs.session or f.ctr < 1:
            self.stats.rejected += 1
            return
        if not verify_frame(f, hs.keys.device_to_host):
            self.stats.rejected += 1
            return
        self.session = hs.session
        self._tx_key, self._rx_key = hs.keys.host_to_device, hs.keys.device_to_host
        self._reset_state()
        self._rx_ctr = f.ctr
        self.connected = True
        self._cond.notify_all()

    def _on_sync(self, f: Frame) -> None:
        """Device: answer a SYNC with a challenge, holding it beside the current session (which
        nothing here touches). A repeated SYNC gets the same challenge."""
        if len(f.payload) != NONCE_BYTES:
            self.stats.rejected += 1
            return
        pending = self._pending.get(f.session)
        if pending is None or pending.host_nonce != f.payload:
            pending = _Pending(f.payload, secrets.token_bytes(NONCE_BYTES))
            self._pending[f.session] = pending
            while len(self._pending) > PENDING_HANDSHAKES:
                self._pending.popitem(last=False)
        self._pending.move_to_end(f.session)
        self._control.append(Frame(CHALLENGE, f.session, payload=pending.device_nonce))

    def _on_auth(self, f: Frame) -> None:
        """Device: check a host's proof; a valid one replaces the current session."""
        if len(f.payload) != NONCE_BYTES + PROOF_BYTES:
            self.stats.rejected += 1
            return
        nonce, proof = f.payload[:NONCE_BYTES], f.payload[NONCE_BYTES:]
        now = time.monotonic()
        est = self._established
        repeat = f.session == self.session and est is not None and est.device_nonce == nonce
        pending = self._pending.get(f.session)
        if not repeat and (pending is None or pending.device_nonce != nonce):
            self._refuse(f.session, NO_HANDSHAKE)
            return
        if now < self._auth_blocked_until:  # no proof is checked while backing off
            self._refuse(f.session, BACKING_OFF, self._auth_blocked_until - now)
            return
        if repeat and est is not None:
            if hmac.compare_digest(proof, est.proof):
                self._control.append(Frame(AUTH_OK, f.session))  # it did not hear the first
            else:
                self._auth_failed(f.session, now)
            return
        assert pending is not None
        for token in self._tokens:
            keys = session_keys(token, f.session, pending.host_nonce, nonce)
            if hmac.compare_digest(proof, keys.proof):
                break
        else:
            del self._pending[f.session]  # a failed handshake is over
            self._auth_failed(f.session, now)
            return
        del self._pending[f.session]
        if self.session:
            log.info("serial session %08x replaces %08x", f.session, self.session)
        else:
            log.info("serial session %08x authenticated", f.session)
        self.session = f.session
        self._tx_key, self._rx_key = keys.device_to_host, keys.host_to_device
        self._established = _Established(nonce, keys.proof)
        self._auth_failures = 0
        self._reset_state()
        self._failed = None
        self._control.append(Frame(AUTH_OK, f.session))

    def _auth_failed(self, session: int, now: float) -> None:
        self._auth_failures += 1
        self.stats.auth_failures += 1
        backoff = min(self.cfg.auth_backoff_max, self.cfg.auth_backoff * 2 ** (self._auth_failures - 1))
        self._auth_blocked_until = now + backoff
        log.warning("serial authentication failed (wrong secret; %d in a row): no proof is checked "
                    "for %.2f s", self._auth_failures, backoff)
        self._refuse(session, WRONG_SECRET)

    def _refuse(self, session: int, reason: int, retry_after: float = 0.0) -> None:
        payload = REFUSAL.pack(reason, math.ceil(retry_after * 1000))
        self._control.append(Frame(REFUSED, session, payload=payload))

    def _on_old_peer(self, f: Frame) -> None:
        self.stats.old_peers += 1
        hs = self._handshake
        if self.role == "host" and hs is not None and f.session == hs.session:
            hs.old_peer = True  # the answer to this handshake's version-1 probe
            self._cond.notify_all()
        elif self.role == "device" and f.type == SYNC:
            now = time.monotonic()
            if now - self._last_old_peer_log > 30:
                self._last_old_peer_log = now
                log.warning("a host speaking serial link version 1 (a toolkit from before "
                            "authenticated serial deploys) tried to connect on %s; refused: upgrade "
                            "the toolkit on the host", _port_name(self.port))

    def _on_data(self, f: Frame) -> None:
        self._ack_due = True
        self._rx_last_tx = max(self._rx_last_tx, f.ctr)
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

    def _seal(self, f: Frame) -> bytes:
        """A sealed frame of the current session: the next frame counter, the mac (lock held;
        frames are written in the order they are sealed, so counters rise on the wire)."""
        assert self._tx_key is not None
        self._tx_ctr += 1
        return encode_frame(Frame(f.type, f.session, f.seq, f.flags, f.payload, self._tx_ctr), self._tx_key)

    def _collect(self) -> list[bytes]:
        """Frames to write now (lock held): control first, then losses, timeouts, new data."""
        now = time.monotonic()
        out: list[bytes] = []
        size = 0
        while self._raw_control:
            out.append(self._raw_control.popleft())
        while self._control:
            f = self._control.popleft()
            if f.type in OPEN_TYPES:
                out.append(encode_frame(f))
            elif self.session and f.session == self.session:  # else its session has ended
                out.append(self._seal(f))
        if self._ack_due and self.session:
            out.append(self._seal(Frame(ACK, self.session, self._rx_expected,
                                        payload=SACK.pack(self._sack_bitmap(), self._rx_last_tx))))
            self._ack_due = False
        if not self.session or self._failed:
            return out
        if self.role == "host" and (self._inflight or self._waiting):
            silent = now - self._last_rx
            if silent > self.cfg.dead_after:
                self._fail(f"no answer from the device for {silent:.0f} s")
                return out
            if silent > self.cfg.keepalive and now - self._last_ping > self.cfg.keepalive:
                out.append(self._seal(Frame(PING, self.session)))
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
        """Each copy carries its own frame counter (the receiver echoes the highest it has seen,
        which tells the sender exactly which earlier copies were lost)."""
        enc = self._seal(Frame(DATA, self.session, seq, rec.flags, rec.payload))
        rec.last_tx, rec.sent_at = self._tx_ctr, now
        return enc

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
          tokens: Sequence[bytes], config: LinkConfig | None = None) -> None:
    """Device: answer each message of an authenticated session with handle(message) until
    `stop` is set. `tokens`: the daemon's --token-file lines (a ToolkitError without any). A
    broken session is forgotten; the host's next handshake starts a new one."""
    link = Link(port, "device", config, tokens=tokens)
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
