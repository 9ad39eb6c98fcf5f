"""Serial deploys need the daemon's token: the handshake and sealed frames of
device/serve/serial_link.py, against the real deploy handler.

Each test runs a store daemon in a thread (serve_store: the deploy service the daemon runs, with
the smoke test skipped: these tests are about who may talk to it) listening on a Unix socket
(for installing bundles quickly and reading its store) and on the device end of a pty relay.
Attackers write raw frames on the host end, or on the relay's intruder pty (a second cable on
the same line); old-protocol frames are built here by hand, so that an unauthenticated link
fails these tests for what it lets through rather than for a missing name.
"""

from __future__ import annotations

import logging
import os
import secrets
import select
import shutil
import struct
import tempfile
import threading
import time
import tty
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemon_fixtures import serve_store_in_thread

import device.serve.serial_link as sl
from bundle.errors import ToolkitError
from device.serve.deploy import DeployService, pack, serve_store, unpack
from device.serve.serial_link import DATA, FLAG_END, SYNC, Frame, cobs_decode, cobs_encode, open_port
from device.store.store import SmokeResult
from host import deploy as dp
from host.pty_relay import PtyRelay
from host.transfer import HttpDeployClient

SECRET = "3f7d1c9a0b8e4d2f6a5c7e9b1d3f5a7c"  # what a daemon's --token-file holds
WRONG = "0000000000000000000000000000000"


def write_token(path: Path, token: str) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def make_bundle(root: Path, name: str, size: int) -> Path:
    """A valid encoder bundle of random bytes (the smoke test is skipped: it never runs)."""
    from bundle.contract import ENCODER_CONTRACT
    from bundle.manifest import Contract, Manifest, Source, hash_tree
    from targets import load_target

    root.mkdir(parents=True)
    (root / "model.onnx.data").write_bytes(os.urandom(size))
    (root / "model.onnx").write_bytes(os.urandom(1024))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    m = Manifest(kind="encoder", source=Source("test", name, str(root)),
                 contract=Contract(ENCODER_CONTRACT, 17), precision="fp32",
                 target=load_target("cpu").record(), max_seq=0, batch=1)
    m.files = hash_tree(root)
    (root / "manifest.json").write_text(m.to_json())
    return root


# --- old-protocol frames (link version 1: no handshake, no mac), built by hand ---------------------

V1 = struct.Struct("<2sBBIIIH")  # magic, type, flags, session, seq, aux, len; then crc32
V2_HEADER = 19  # magic, version 2, type, flags, session, ctr, seq, len


def v1_frame(ftype: int, session: int, seq: int = 0, flags: int = 0, payload: bytes = b"") -> bytes:
    body = V1.pack(b"TK", ftype, flags, session, seq, 0, len(payload)) + payload
    return b"\x00" + cobs_encode(body + struct.pack("<I", zlib.crc32(body))) + b"\x00"


def v1_request(session: int, op: str) -> bytes:
    """What a host without authentication sends: SYNC, then the request in one DATA frame."""
    return (v1_frame(SYNC, session) +
            v1_frame(DATA, session, 0, FLAG_END, pack({"op": op, "rid": 1})))


def frame_types(wire: bytes) -> list[tuple[int, int, int]]:
    """(link version, type, session) of each intact frame on a captured line."""
    out = []
    for enc in wire.split(b"\x00"):
        if not enc:
            continue
        try:
            raw = cobs_decode(enc)
        except ValueError:
            continue
        crc_ok = len(raw) > 4 and zlib.crc32(raw[:-4]) == struct.unpack("<I", raw[-4:])[0]
        if len(raw) >= V2_HEADER and raw[:3] == b"TK\x02":  # version 2: sealed (mac 16) or open (crc32)
            n = struct.unpack_from("<H", raw, V2_HEADER - 2)[0]
            if len(raw) == V2_HEADER + n + 16 or (len(raw) == V2_HEADER + n + 4 and crc_ok):
                out.append((2, raw[3], struct.unpack_from("<I", raw, 5)[0]))
                continue
        if len(raw) >= V1.size + 4 and raw[:2] == b"TK" and crc_ok:
            _, ftype, _, session, _, _, n = V1.unpack_from(raw)
            if len(raw) == V1.size + n + 4:
                out.append((1, ftype, session))
    return out


class Peer:
    """Raw bytes on one end of a line, and what comes back."""

    def __init__(self, path: str) -> None:
        self.port = open_port(path)
        self.heard = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.heard += self.port.read(4096)
            except (OSError, TypeError, ValueError):
                return

    def send(self, data: bytes) -> None:
        self.port.write(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.port.close()


# --- the board -----------------------------------------------------------------------------------

@dataclass
class Board:
    store: Path
    sock: Path
    token: Path
    stop: threading.Event
    thread: threading.Thread

    def status(self) -> dict[str, Any]:
        """The store's state, without the last install's record (its clock keeps running)."""
        status = HttpDeployClient(f"unix://{self.sock}").status()
        status.pop("install", None)
        return status


@pytest.fixture
def handled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ops the device's serial handler was given, in order."""
    seen: list[str] = []
    real = DeployService.handle_message

    def spy(self: DeployService, message: bytes) -> bytes:
        try:
            seen.append(str(unpack(message)[0].get("op")))
        except ValueError:
            seen.append("?")
        return real(self, message)

    monkeypatch.setattr(DeployService, "handle_message", spy)
    return seen


def verbs(handled: list[str]) -> list[str]:
    """The ops other than status (the host polls status while an accepted install runs)."""
    return [op for op in handled if op != "status"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serial-auth-bundles")
    return {"a": make_bundle(root / "a", "auth-a", 20 << 10),
            "b": make_bundle(root / "b", "auth-b", 20 << 10),
            "big": make_bundle(root / "big", "auth-big", 768 << 10)}


@pytest.fixture
def board(tmp_path: Path, config: Path, handled: list[str]) -> Iterator[Callable[..., Board]]:
    """board(relay, *bundles) -> a daemon on the relay's device end holding SECRET, with those
    bundles installed over its Unix socket (the last one active); `handled` starts empty."""
    boards: list[Board] = []

    def start(relay: PtyRelay, *install: Path) -> Board:
        sock_dir = Path(tempfile.mkdtemp(prefix="tkser-", dir="/tmp"))  # AF_UNIX paths are short
        sock, store = sock_dir / "d.sock", tmp_path / f"store{len(boards)}"
        token = write_token(tmp_path / "board.token", SECRET)
        stop, thread = serve_store_in_thread(store, socket_path=sock, serial=relay.device_path,
                                             token_file=token,
                                             activate=lambda p: SmokeResult(True, "skipped (test)"))
        b = Board(store, sock, token, stop, thread)
        boards.append(b)
        dp.add_device("local", f"unix://{sock}", replace=True)
        for bundle in install:
            assert dp.deploy(bundle, "local").install.ok
        handled.clear()
        return b

    yield start
    for b in boards:
        b.stop.set()
        b.thread.join(10)
        shutil.rmtree(b.sock.parent, ignore_errors=True)


def add_serial(name: str, relay_path: str, token: Path | None) -> None:
    query = f"&token-file={token}" if token else ""
    dp.add_device(name, f"serial://{relay_path}?baud=921600{query}", replace=True)


def settle(seconds: float = 1.0) -> None:
    """Give the device time to act on frames that it must ignore (no event marks 'nothing')."""
    time.sleep(seconds)


# --- the tests -----------------------------------------------------------------------------------

def test_a_serial_listener_needs_the_token_file(tmp_path: Path) -> None:
    from device.serve.config import ServeConfig

    with pytest.raises(ToolkitError, match="--serial needs --token-file"):
        serve_store(tmp_path / "store", serial=str(tmp_path / "no-such-tty"))
    with pytest.raises(ToolkitError, match="--serial needs --token-file"):
        ServeConfig(bundle=None, store=tmp_path / "store", serial="/dev/ttyGS0")
    with pytest.raises(ToolkitError, match="needs a shared secret"):
        sl.serve(None, lambda m: m, threading.Event(), [])


def test_without_the_secret_no_verb_reaches_the_handler(bundles: dict[str, Path], board: Any,
                                                        handled: list[str],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Old-protocol requests (what any program could send before), a handshake with a made-up
    proof, and sealed frames under a made-up key: the device answers none of them and its
    handler sees nothing; the store is as it was."""
    with PtyRelay() as relay:
        b = board(relay, bundles["a"], bundles["b"])
        before = b.status()
        peer = Peer(relay.host_path)
        try:
            for op in ("hello", "status", "rollback", "begin"):
                peer.send(v1_request(secrets.randbits(31) + 1, op))
            settle()
            assert handled == []
            assert all(t[0] == 2 for t in frame_types(bytes(peer.heard)))  # not a v1 word back
            assert any("serial link version 1" in r.getMessage() for r in caplog.records)  # but logged

            session, nonce = secrets.randbits(31) + 1, os.urandom(16)
            peer.send(b"\x00" + sl.encode_frame(Frame(SYNC, session, payload=nonce)))
            deadline = time.monotonic() + 5
            while (sl.CHALLENGE not in [t[1] for t in frame_types(bytes(peer.heard))]
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            challenge = [f for f in sl.FrameReader().feed(bytes(peer.heard)) if f.type == sl.CHALLENGE][-1]
            peer.send(sl.encode_frame(Frame(sl.AUTH, session, payload=challenge.payload + os.urandom(32))))
            key = os.urandom(32)  # a guess at the session key
            for ctr, op in enumerate(("hello", "rollback", "status"), start=1):
                request = pack({"op": op, "rid": ctr})
                peer.send(sl.encode_frame(Frame(DATA, session, ctr - 1, FLAG_END, request, ctr=ctr), key))
            settle()
            heard = frame_types(bytes(peer.heard))
            assert (2, sl.REFUSED, session) in heard
            assert {t for _, t, _ in heard} <= {sl.CHALLENGE, sl.REFUSED, sl.RESET}  # no data, no AUTH_OK
            assert handled == []
            assert b.status() == before
        finally:
            peer.close()


def test_a_wrong_secret_is_refused_with_one_clear_line(bundles: dict[str, Path], board: Any,
                                                       handled: list[str], tmp_path: Path) -> None:
    with PtyRelay() as relay:
        b = board(relay, bundles["a"], bundles["b"])
        before = b.status()
        add_serial("board", relay.host_path, write_token(tmp_path / "wrong.token", WRONG))
        for verb in (lambda: dp.ping("board"), lambda: dp.rollback("board"),
                     lambda: dp.deploy(bundles["a"], "board")):
            with pytest.raises(ToolkitError) as e:
                verb()
            assert "refused the serial secret; check the token file" in e.value.message
            assert "\n" not in e.value.message
        add_serial("bare", relay.host_path, None)  # no token anywhere: the host says so itself
        with pytest.raises(ToolkitError, match="no token for its serial link"):
            dp.ping("bare")
        assert handled == []
        assert b.status() == before
        add_serial("good", relay.host_path, b.token)  # the right one still gets in (after the backoff)
        assert dp.ping("good").hello.active["name"].startswith("auth-b")  # type: ignore[index]
        assert handled == ["hello", "hello"]


def test_a_peer_without_the_secret_cannot_take_over_a_session(bundles: dict[str, Path], board: Any,
                                                              handled: list[str], tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Host A deploys; once its upload runs, peer B on the same line sends SYNCs (old and new
    protocol), junk, old-protocol rollbacks, frames claiming A's session under a made-up key,
    and tries a handshake with a wrong secret. A's session survives (one attempt, nothing
    resent from scratch), its bundle installs intact, and nothing of B's reaches the handler."""
    caplog.set_level(logging.INFO, logger="toolkit.serial")
    with PtyRelay(rate=400_000, intruder=True) as relay:  # paced: A's upload takes ~2 s
        b = board(relay)
        assert relay.intruder_path
        add_serial("board", relay.host_path, b.token)
        started, finished = threading.Event(), threading.Event()
        attacks: list[str] = []
        errors: list[BaseException] = []

        def raw_rounds(enough: Callable[[], bool]) -> None:
            peer = Peer(relay.intruder_path)  # type: ignore[arg-type]
            try:
                while not finished.is_set() and not enough():
                    own = secrets.randbits(31) + 1
                    peer.send(v1_request(own, "rollback"))
                    peer.send(b"\x00" + sl.encode_frame(Frame(SYNC, own, payload=os.urandom(16))))
                    peer.send(os.urandom(200) + b"\x00")
                    sessions = {s for v, t, s in frame_types(bytes(peer.heard)) if v == 2 and t == sl.ACK}
                    for s in sessions:  # A's session, seen on the line: forge frames into it
                        forged = Frame(DATA, s, 0, FLAG_END, pack({"op": "rollback", "rid": 1}), ctr=1 << 30)
                        peer.send(sl.encode_frame(forged, os.urandom(32)))
                    attacks.append("round" if sessions else "blind round")
                    time.sleep(0.05)
            finally:
                peer.close()

        def wrong_secret() -> None:
            port = open_port(relay.intruder_path)  # type: ignore[arg-type]
            try:
                link = sl.Link(port, "host", tokens=[WRONG.encode()])
                try:
                    link.connect(timeout=10)
                    errors.append(AssertionError("a wrong secret got a session"))
                except ToolkitError as e:
                    attacks.append("refused" if type(e).__name__ == "AuthRefused" else str(e))
                finally:
                    link.close()
            finally:
                port.close()

        def attacker() -> None:  # the raw attacks first: an unauthenticated link falls to them
            started.wait(30)
            try:
                raw_rounds(lambda: attacks.count("round") >= 3)
                wrong_secret()
                raw_rounds(lambda: False)
            except BaseException as e:  # reported by the test
                errors.append(e)

        threads = [threading.Thread(target=attacker, daemon=True)]
        for t in threads:
            t.start()

        def progress(done: int, total: int) -> None:
            if done > 64 << 10:
                started.set()

        try:
            result = dp.deploy(bundles["big"], "board", progress=progress, retries=0)
        finally:
            started.set()
            finished.set()
            for t in threads:
                t.join(30)
        assert result.install.ok and result.attempts == 1 and result.held_per_attempt == (0,)
        assert set(verbs(handled)) == {"hello", "begin", "chunk", "commit"}  # A's, and only A's
        assert not errors, errors
        assert "refused" in attacks and attacks.count("round") >= 3
        assert b.status()["active"]["name"].startswith("auth-big")
        logged = [r.getMessage() for r in caplog.records]
        assert any("authentication failed" in m for m in logged)
        assert not any("replaces" in m for m in logged)  # the device never switched sessions


def test_replayed_frames_are_refused(bundles: dict[str, Path], board: Any, handled: list[str]) -> None:
    """A rollback recorded off the line and played back into the same session, and into the
    device after a new session began: neither is carried out again."""
    with PtyRelay(record=True) as relay:
        b = board(relay, bundles["a"], bundles["b"])
        add_serial("board", relay.host_path, b.token)
        first = dp.open_client(dp.get_device("board"))
        try:
            first.rollback()  # b -> a
            after = b.status()
            # the host follows an accepted rollback through status polls
            assert after["active"]["name"].startswith("auth-a") and verbs(handled) == ["rollback"]
            assert relay.recorded
            recording = bytes(relay.recorded)
            relay.inject(b"\x00" + recording)  # the same session, still open
            settle()
            polls = len(handled)
            assert verbs(handled) == ["rollback"] and b.status() == after
            first.status()  # the session itself is untouched
            assert len(handled) == polls + 1 and handled[-1] == "status"
        finally:
            first.close()

        second = dp.open_client(dp.get_device("board"))
        try:
            second.hello()
            relay.inject(b"\x00" + recording)  # a new session runs: replay the old one whole
            settle()
            assert verbs(handled) == ["rollback", "hello"] and handled[-1] == "hello"
            assert b.status() == after
            second.status()
            assert handled[-1] == "status"
        finally:
            second.close()
        seen = list(handled)
        relay.inject(b"\x00" + recording)  # and with nobody connected
        settle()
        assert handled == seen and b.status() == after


def test_a_host_names_an_old_board_instead_of_timing_out() -> None:
    """A version-1 device ignores the v2 handshake but answers the host's v1 probe (a PING of
    an unknown session) with a v1 RESET: the host says what it found."""
    dev_fd, tty_fd = os.openpty()  # the old device plays the master; the host opens the tty
    tty.setraw(tty_fd)
    stop = threading.Event()

    def old_device() -> None:
        buf = b""
        while not stop.is_set():
            try:
                buf += os.read(dev_fd, 4096)
            except OSError:
                return
            *frames, buf = buf.split(b"\x00")
            for (version, ftype, session) in frame_types(b"\x00".join(frames) + b"\x00"):
                if version == 1 and ftype == 5:  # PING of a session it does not know
                    os.write(dev_fd, v1_frame(6, session))  # RESET

    threading.Thread(target=old_device, daemon=True).start()
    port = open_port(os.ttyname(tty_fd))
    link = sl.Link(port, "host", tokens=[SECRET.encode()])
    try:
        with pytest.raises(ToolkitError, match="speaks serial link version 1") as e:
            link.connect(timeout=5)
        assert not isinstance(e.value, sl.LinkDown)
    finally:
        stop.set()
        link.close()
        port.close()
        os.close(dev_fd)
        os.close(tty_fd)


def test_failed_proofs_make_the_device_wait_before_checking_another() -> None:
    """After a wrong proof the device checks no proof, not even a right one, until its backoff
    has passed (it says how long), and the backoff doubles with each failure in a row."""
    master, tty_fd = os.openpty()
    tty.setraw(tty_fd)
    port = open_port(os.ttyname(tty_fd))
    device = sl.Link(port, "device", tokens=[SECRET.encode()])
    reader = sl.FrameReader()
    heard: list[Frame] = []

    def exchange(frame: Frame, want: int) -> Frame:
        os.write(master, b"\x00" + sl.encode_frame(frame))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                heard.extend(reader.feed(os.read(master, 4096)))
            for i, f in enumerate(heard):
                if f.type == want and f.session == frame.session:
                    return heard.pop(i)
        raise AssertionError(f"no frame of type {want} for session {frame.session:08x}")

    def attempt(session: int, secret: str) -> tuple[int, float]:
        """A handshake -> (reason it was refused, retry after in s), or (0, 0) when accepted."""
        nonce = os.urandom(16)
        challenge = exchange(Frame(SYNC, session, payload=nonce), sl.CHALLENGE).payload
        proof = sl.session_keys(secret.encode(), session, nonce, challenge).proof
        os.write(master, b"\x00" + sl.encode_frame(Frame(sl.AUTH, session, payload=challenge + proof)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                heard.extend(reader.feed(os.read(master, 4096)))
            for f in heard:
                if f.session == session and f.type == sl.REFUSED:
                    reason, retry_ms = struct.unpack("<BI", f.payload)
                    return reason, retry_ms / 1000
                if f.session == session and f.type == sl.AUTH_OK:
                    return 0, 0.0
        raise AssertionError("the device did not answer the proof")

    try:
        assert attempt(1, WRONG) == (sl.WRONG_SECRET, 0.0)
        reason, wait = attempt(2, SECRET)  # right, but too soon: not checked
        assert reason == sl.BACKING_OFF and 0 < wait <= 0.25
        time.sleep(wait)
        assert attempt(3, WRONG)[0] == sl.WRONG_SECRET  # the second failure in a row
        reason, wait = attempt(4, SECRET)
        assert reason == sl.BACKING_OFF and 0.25 < wait <= 0.5  # doubled
        time.sleep(wait)
        assert attempt(5, SECRET) == (0, 0.0)
        assert device.session == 5 and device.stats.auth_failures == 2
    finally:
        device.close()
        port.close()
        os.close(master)
        os.close(tty_fd)
