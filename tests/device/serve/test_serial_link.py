"""The serial link (device/serve/serial_link.py): COBS framing, damaged frames dropped, exact
messages over a line that flips and loses bytes (a pty pair through host/pty_relay.py)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device.serve.serial_link import (
    DATA,
    SYNC,
    FrameReader,
    Link,
    LinkDown,
    cobs_decode,
    cobs_encode,
    encode_frame,
    open_port,
    verify_frame,
)
from device.serve.serial_link import Frame as LinkFrame
from host.pty_relay import Faults, PtyRelay

LINK_KEY = b"k" * 32  # a session key for frame-level tests


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_cobs_round_trip_never_emits_zero(data: bytes) -> None:
    enc = cobs_encode(data)
    assert b"\x00" not in enc
    assert cobs_decode(enc) == data
    assert len(enc) <= len(data) + 1 + len(data) // 254


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=5), st.binary(max_size=50))
def test_frame_reader_recovers_after_garbage(payloads: list[bytes], garbage: bytes) -> None:
    frames = [LinkFrame(1, 7, i, 0, p, ctr=i + 1) for i, p in enumerate(payloads)]
    wire = garbage + b"\x00" + b"".join(encode_frame(f, LINK_KEY) for f in frames)
    reader = FrameReader()
    got = []
    for i in range(0, len(wire), 7):  # arbitrary read boundaries
        got += reader.feed(wire[i:i + 7])
    assert got == frames
    assert all(verify_frame(f, LINK_KEY) for f in got)


def test_damaged_frames_are_dropped() -> None:
    """An open (handshake) frame carries a CRC32, which the reader checks; a sealed one carries
    its mac instead, which fails under line damage as under forgery."""
    enc = bytearray(encode_frame(LinkFrame(SYNC, 7, 3, 1, b"payload")))
    enc[5] ^= 0x40
    reader = FrameReader()
    assert reader.feed(bytes(enc)) == [] and reader.damaged == 1
    enc = bytearray(encode_frame(LinkFrame(DATA, 7, 3, 1, b"payload", ctr=1), LINK_KEY))
    enc[len(enc) // 2] ^= 0x40
    got = FrameReader().feed(bytes(enc))
    assert got == [] or not verify_frame(got[0], LINK_KEY)


def test_link_delivers_exact_messages_over_a_noisy_line() -> None:
    """1 % of bytes flipped or lost one by one (the hardest pattern for a framed link)."""
    with PtyRelay(faults=Faults(corrupt=0.005, drop=0.005), seed=7) as relay:
        host_port, dev_port = open_port(relay.host_path), open_port(relay.device_path)
        device = Link(dev_port, "device", tokens=[b"line-secret"])
        host = Link(host_port, "host", tokens=[b"line-secret"])
        done = threading.Event()
        try:
            def echo() -> None:  # until the test ends: a reconnect may take a few seconds
                while not done.is_set():
                    if (msg := device.recv(0.5)) is not None:
                        device.send(hashlib.sha256(msg.data).digest(), session=msg.session)

            threading.Thread(target=echo, daemon=True).start()
            messages = [os.urandom(n) for n in (1, 300, 20000)]
            for msg in messages:
                for _ in range(5):  # a session the line made unusable is replaced, as deploy does
                    try:
                        if not host.connected or host._failed:
                            host.connect()
                        assert host.request(msg, 30) == hashlib.sha256(msg).digest()
                        break
                    except LinkDown:
                        continue
                else:
                    pytest.fail("the link never delivered")
            assert relay.stats.to_device.affected_ratio >= 0.008
            assert host.stats.retransmits > 0
        finally:
            done.set()
            host.close()
            device.close()
            host_port.close()
            dev_port.close()
