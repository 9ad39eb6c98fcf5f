"""Deploy: the device store, the serial link, the wire protocol and `toolkit deploy`, end to end.

Bundles are the real tiny Llama of conftest.py (converted once per session); variants are copies
with a changed manifest (a new bundle identity), a damaged model (fails its smoke test) or an
extra random file (several chunks, so resume is visible). Devices are store daemons on temporary
Unix sockets, loopback TCP (through a proxy that cuts the connection) and pty pairs (through a
relay that damages bytes); the crash test SIGKILLs a daemon process in the middle of an install.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from deploy_fixtures import same_files, variant
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import REPO

from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, read_manifest
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
from device.store.store import (
    SmokeResult,
    Store,
    StoreError,
    StoreLimits,
    check_relpath,
    smoke_test,
)
from host import deploy as dp
from host.pty_relay import Faults, PtyRelay

LINK_KEY = b"k" * 32  # a session key for frame-level tests


# --- bundles ---------------------------------------------------------------------------------------

# --- daemons -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret-token-for-tests-0123456789\n")
    path.chmod(0o600)
    return path


class CuttingProxy:
    """TCP proxy that closes the connection it carries once `cut_after` client bytes have passed
    (once), like a cable pulled mid-upload; later connections pass untouched."""

    def __init__(self, upstream: int, cut_after: int) -> None:
        self.upstream, self.cut_after = upstream, cut_after
        self.sent = 0
        self.cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(65536):
                if upstream and not self.cuts and self.sent + len(data) > self.cut_after:
                    self.cuts += 1
                    dst.sendall(data[:self.cut_after - self.sent])
                    raise OSError("cut")
                if upstream:
                    self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()


# --- framing and names -------------------------------------------------------------------------

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


@pytest.mark.parametrize("name", ["../etc/passwd", "a/../b", "../../etc/passwd", "model/..", "..", ".",
                                  "/etc/passwd", " ..", ".. ", "", "   ", "a//b", "a/./b", "a\\b",
                                  "tok\x00en", "caf\u00e9.json", "manifest.json", "engines/x.plan",
                                  "a/" * 9 + "b"])
def test_traversal_and_odd_names_are_refused(name: str) -> None:
    with pytest.raises(StoreError) as e:
        check_relpath(name)
    assert e.value.code == "bad_name"


def test_bundle_names_are_accepted() -> None:
    for name in ("model.onnx", "model.onnx.data", "tokenizer/tokenizer.json", "report.md", "a-b_c.1"):
        assert check_relpath(name) == name.split("/")


# --- the store -----------------------------------------------------------------------------------

def manifest_bytes(files: dict[str, tuple[int, str]], base: Path) -> bytes:
    data = json.loads((base / MANIFEST).read_text())
    data["files"] = {k: {"sha256": sha, "bytes": n} for k, (n, sha) in files.items()}
    data["model_file"], data["tokenizer"] = next(iter(files)), None  # every named file is hashed
    return json.dumps(data).encode()


def test_store_refuses_bad_uploads_before_any_byte(base_bundle: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s", StoreLimits(max_file_bytes=1000, max_bundle_bytes=1500, max_files=3))
    sha = "0" * 64
    cases = {
        "bad_manifest": {"../evil": (10, sha)},  # the manifest codec refuses a path out of the bundle
        "bad_name": {"a": (10, sha), "b/c\x7f": (10, sha)},
        "too_large": {"a": (1001, sha)},
        "too_large ": {"a": (800, sha), "b": (800, sha)},  # together over the bundle limit
        "bad_manifest ": {"a": (10, "not-a-hash")},
    }
    for code, files in cases.items():
        with pytest.raises(StoreError) as e:
            store.begin(manifest_bytes(files, base_bundle))
        assert e.value.code == code.strip()
    with pytest.raises(StoreError) as e:
        store.begin(b"{not json")
    assert e.value.code == "bad_manifest"
    assert list((tmp_path / "s" / "staging").iterdir()) == []  # nothing was accepted
    store.close()


def test_store_limits_come_from_limits_json(base_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "s"
    root.mkdir()
    (root / "limits.json").write_text(json.dumps({"max_file_bytes": 1000}))
    store = Store.open(root)
    with pytest.raises(StoreError, match="limits.json"):
        store.begin((base_bundle / MANIFEST).read_bytes())  # model.onnx is bigger than 1000 bytes
    store.close()
    (root / "limits.json").write_text(json.dumps({"max_file_byte": 1000}))
    with pytest.raises(ToolkitError, match="cannot use the store limits"):
        Store.open(root)


def test_store_chunk_checks(base_bundle: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    data = b"x" * 100
    up = store.begin(manifest_bytes({"a/f.bin": (100, hashlib.sha256(data).hexdigest())}, base_bundle))
    uid = up.upload_id
    with pytest.raises(StoreError) as e:
        store.write_chunk(uid, "a/f.bin", 0, data[:50], zlib.crc32(data[:50]) ^ 1)
    assert e.value.code == "bad_crc"
    staged = tmp_path / "s" / "staging" / uid / "a" / "f.bin"
    assert not staged.exists()  # a bad chunk writes nothing
    with pytest.raises(StoreError) as e:
        store.write_chunk(uid, "a/f.bin", 10, data[:10], zlib.crc32(data[:10]))
    assert e.value.code == "gap"
    with pytest.raises(StoreError) as e:
        store.write_chunk(uid, "a/f.bin", 60, data[:50], zlib.crc32(data[:50]))  # past declared size
    assert e.value.code in ("too_large", "gap")
    with pytest.raises(StoreError) as e:
        store.write_chunk(uid, "other", 0, b"y", zlib.crc32(b"y"))
    assert e.value.code == "unknown_file"
    ack = store.write_chunk(uid, "a/f.bin", 0, data[:60], zlib.crc32(data[:60]))
    assert ack.held == 60 and not ack.complete
    assert store.begin(manifest_bytes({"a/f.bin": (100, hashlib.sha256(data).hexdigest())},
                                      base_bundle)).files["a/f.bin"].held == 60  # resume point
    assert store.write_chunk(uid, "a/f.bin", 50, data[50:], zlib.crc32(data[50:])).complete  # overlap ok
    store.close()


def test_store_receive_chunk_writes_as_it_arrives_and_keeps_nothing_bad(base_bundle: Path,
                                                                        tmp_path: Path) -> None:
    """receive_chunk (the HTTP path: bytes go into the file as they arrive) keeps a chunk only
    when its CRC32 matches; a bad or short chunk is cut off again, held stays where it was; a
    chunk that is not the next one is left to write_chunk (None, nothing read)."""
    store = Store.open(tmp_path / "s")
    data = os.urandom(300_000)
    up = store.begin(manifest_bytes({"f.bin": (len(data), hashlib.sha256(data).hexdigest())}, base_bundle))
    uid = up.upload_id
    staged = tmp_path / "s" / "staging" / uid / "f.bin"

    def feeder(payload: bytes, step: int = 70_000) -> Any:
        """A body that arrives in pieces of at most `step` bytes (as a socket may deliver)."""
        sent = [0]

        def read_into(view: memoryview) -> int:
            piece = payload[sent[0]:sent[0] + min(len(view), step)]
            sent[0] += len(piece)
            view[:len(piece)] = piece
            return len(piece)
        return read_into

    ack = store.receive_chunk(uid, "f.bin", 0, 200_000, zlib.crc32(data[:200_000]), feeder(data[:200_000]))
    assert ack is not None and ack.held == 200_000 and staged.stat().st_size == 200_000
    rest, crc = data[200_000:], zlib.crc32(data[200_000:])
    bad = bytearray(rest)
    bad[5] ^= 1
    with pytest.raises(StoreError) as e:
        store.receive_chunk(uid, "f.bin", 200_000, 100_000, crc, feeder(bytes(bad)))
    assert e.value.code == "bad_crc" and staged.stat().st_size == 200_000
    with pytest.raises(StoreError) as e:  # the body ends early (the client went away)
        store.receive_chunk(uid, "f.bin", 200_000, 100_000, crc, feeder(rest[:50_000]))
    assert e.value.code == "short_body" and staged.stat().st_size == 200_000
    never = feeder(b"")
    assert store.receive_chunk(uid, "f.bin", 100_000, 100_000, 0, never) is None  # below held
    ack = store.receive_chunk(uid, "f.bin", 200_000, 100_000, crc, feeder(rest))
    assert ack is not None and ack.complete and staged.read_bytes() == data
    assert not list((tmp_path / "s" / "staging").glob(".*.inflight"))  # markers last one chunk
    store.close()


KILLED_MID_CHUNK = """
import os, signal, sys, zlib
from pathlib import Path
from device.store.store import Store
root, manifest, data = Path(sys.argv[1]), Path(sys.argv[2]).read_bytes(), Path(sys.argv[3]).read_bytes()
store = Store.open(root)
uid = store.begin(manifest).upload_id
def body(payload, step):
    sent = [0]
    def read_into(view):
        if sent[0] >= step and sent[0] < len(payload):  # a piece of the chunk is in the file,
            os.kill(os.getpid(), signal.SIGKILL)          # not yet checked: the daemon dies
        piece = payload[sent[0]:sent[0] + min(len(view), step)]
        view[:len(piece)] = piece
        sent[0] += len(piece)
        return len(piece)
    return read_into
store.receive_chunk(uid, "f.bin", 0, 200_000, zlib.crc32(data[:200_000]), body(data[:200_000], 1 << 30))
store.receive_chunk(uid, "f.bin", 200_000, 100_000, zlib.crc32(data[200_000:]), body(data[200_000:], 50_000))
"""


def test_store_killed_mid_chunk_resumes_where_the_chunk_began(base_bundle: Path, tmp_path: Path) -> None:
    """A daemon SIGKILLed while a chunk is being written leaves bytes nobody checked; on the
    next start the store cuts the file back to where that chunk began, so the resumed upload
    sends it again (rather than resuming after unchecked bytes and failing at commit)."""
    data = os.urandom(300_000)
    mb = manifest_bytes({"f.bin": (len(data), hashlib.sha256(data).hexdigest())}, base_bundle)
    (tmp_path / "manifest").write_bytes(mb)
    (tmp_path / "data").write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", KILLED_MID_CHUNK, str(tmp_path / "s"),
                           str(tmp_path / "manifest"), str(tmp_path / "data")], cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    up_id = hashlib.sha256(mb).hexdigest()
    assert (tmp_path / "s" / "staging" / up_id / "f.bin").stat().st_size == 250_000  # unchecked tail
    store = Store.open(tmp_path / "s")
    state = store.begin(mb)
    assert state.files["f.bin"].held == 200_000
    assert not list((tmp_path / "s" / "staging").glob(".*.inflight"))
    rest = memoryview(data[200_000:])

    def read_into(view: memoryview) -> int:
        view[:len(rest)] = rest
        return len(rest)
    ack = store.receive_chunk(up_id, "f.bin", 200_000, 100_000, zlib.crc32(rest), read_into)
    assert ack is not None and ack.complete
    assert store.commit(up_id, lambda p: SmokeResult(True, "ok")).ok
    store.close()


def test_store_never_writes_through_symlinks_or_special_files(base_bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Store.open(tmp_path / "s")
    data = b"payload"
    files = {"tokenizer/t.json": (len(data), hashlib.sha256(data).hexdigest()),
             "model.onnx": (len(data), hashlib.sha256(data).hexdigest()),
             "fifo": (len(data), hashlib.sha256(data).hexdigest())}
    uid = store.begin(manifest_bytes(files, base_bundle)).upload_id
    staging = tmp_path / "s" / "staging" / uid
    (staging / "tokenizer").symlink_to(outside)  # a planted folder link
    (staging / "model.onnx").symlink_to(outside / "model.onnx")  # a planted file link
    os.mkfifo(staging / "fifo")
    for rel in files:
        with pytest.raises(StoreError) as e:
            store.write_chunk(uid, rel, 0, data, zlib.crc32(data))
        assert e.value.code == "unsafe_path", rel
    assert list(outside.iterdir()) == []
    store.close()


def test_verification_failure_truncates_the_bad_file(base_bundle: Path, tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    good, bad = b"a" * 64, b"b" * 64
    uid = store.begin(manifest_bytes({"f": (64, hashlib.sha256(good).hexdigest())}, base_bundle)).upload_id
    store.write_chunk(uid, "f", 0, bad, zlib.crc32(bad))  # right CRC, wrong content
    with pytest.raises(StoreError) as e:
        store.commit(uid, lambda p: SmokeResult(True, "unused"))
    assert e.value.code == "verify_failed" and "was modified" in str(e.value)
    assert store.status().uploads[0].files["f"].held == 0  # the next deploy resends it
    assert store.active is None
    store.close()


def test_store_install_smoke_failure_rollback_and_recovery(bundles: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "s"
    store = Store.open(root)

    def upload(bundle: Path) -> str:
        uid = store.begin((bundle / MANIFEST).read_bytes()).upload_id
        for rel in read_manifest(bundle).files:
            data = (bundle / rel).read_bytes()
            for off in range(0, len(data), 4 << 20):
                piece = data[off:off + (4 << 20)]
                store.write_chunk(uid, rel, off, piece, zlib.crc32(piece))
        return uid

    a = store.commit(upload(bundles["a"]), smoke_test)
    assert a.ok and a.smoke and a.smoke.ok and store.active == a.bundle
    b = store.commit(upload(bundles["b"]), smoke_test)
    assert b.ok and store.active == b.bundle and store.previous == a.bundle
    broken = store.commit(upload(bundles["broken"]), smoke_test)
    assert not broken.ok and broken.rolled_back and broken.smoke and not broken.smoke.ok
    assert store.active == b.bundle and store.previous == a.bundle  # as before
    assert not (root / "bundles" / broken.bundle.dir).exists()
    back = store.rollback(smoke_test)
    assert back.ok and store.active == a.bundle and store.previous == b.bundle
    store.close()

    # a crash after the switch, before the smoke test passed: the journal says "switching"
    journal = {"phase": "switching", "new": json.loads((root / "previous").read_text()),
               "old_active": json.loads((root / "active").read_text()),
               "old_previous": json.loads((root / "previous").read_text())}
    (root / "switch.json").write_text(json.dumps(journal))
    (root / "active").write_text(json.dumps(journal["new"]))  # the switch had happened
    (root / ".active.tmp-123").write_text("half")
    (root / "staging" / "not-an-upload").mkdir()
    (root / "staging" / ("e" * 64)).mkdir()  # an upload whose manifest never landed
    store = Store.open(root)
    assert store.active == a.bundle and store.previous == b.bundle  # undone: the old bundle serves
    assert not (root / "switch.json").exists() and not (root / ".active.tmp-123").exists()
    assert sorted(p.name for p in (root / "staging").iterdir()) == []
    store.close()

    # ... and a crash after it passed ("committed"): the switch is completed
    journal = {"phase": "committed", "new": json.loads((root / "previous").read_text()),
               "old_active": json.loads((root / "active").read_text()), "old_previous": None}
    (root / "switch.json").write_text(json.dumps(journal))
    store = Store.open(root)
    assert store.active == b.bundle and store.previous == a.bundle
    with pytest.raises(ToolkitError, match="in use"):
        Store.open(root)  # one process per store
    store.close()


# --- the serial link --------------------------------------------------------------------------------

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


# --- deploy end to end, to real daemons (`toolkit serve --store`) ----------------------------------

@pytest.mark.parametrize("swap", ["auto", "cold"])
def test_deploy_to_the_daemon_switches_what_it_serves(bundles: dict[str, Path], config: Path, serve: Any,
                                                      tmp_path: Path, swap: str) -> None:
    """auto swaps hot here (the tiny bundles fit beside each other); cold unloads the served
    bundle first and, when the new one fails, loads the old one again."""
    daemon = serve(tmp_path / "store", "--swap", swap)
    assert daemon.api().request("GET", "/health").status == 503  # an empty store serves nothing
    dp.add_device("local", f"unix://{daemon.socket}")
    first = dp.deploy(bundles["a"], "local")
    assert first.install.ok and first.held_at_start == 0 and first.sent_bytes == first.total_bytes
    same_files(bundles["a"], daemon.store / "bundles" / first.install.bundle.dir)
    assert daemon.serving() == "tiny-a"
    long = {"prompt": "hello world " * 20, "max_tokens": 3, "temperature": 0}
    answers = [daemon.api().post("/v1/completions", long)["choices"][0]["text"] for _ in range(2)]
    cache = daemon.api().get("/v1/status")["prefix_cache"]
    assert answers[0] == answers[1] and cache["hits"] == 1 and cache["entries"] > 0
    again = dp.deploy(bundles["a"], "local")  # the device has it: nothing is sent
    assert again.sent_bytes == 0 and again.install.ok
    second = dp.deploy(bundles["b"], "local")
    assert second.install.ok and second.install.previous and second.install.previous.name == "tiny-a"
    assert daemon.serving() == "tiny-b"
    cache = daemon.api().get("/v1/status")["prefix_cache"]  # the new bundle's: empty
    assert cache["hits"] == 0 and cache["entries"] == 0 and cache["bytes"] == 0
    broken = dp.deploy(bundles["broken"], "local")  # loads, fails its smoke test: rolled back
    assert not broken.install.ok and broken.install.rolled_back
    assert broken.install.active and broken.install.active.name == "tiny-b"
    assert daemon.serving() == "tiny-b"
    ping = dp.ping("local")
    assert ping.hello.active and ping.hello.active["name"] == "tiny-b" and ping.hello.backend == "onnxruntime"
    assert ping.hello.facts.memory_total > 0 and ping.hello.rtt_s < 1
    back = dp.rollback("local")
    assert back.ok and back.active and back.active.name == "tiny-a"
    assert daemon.serving() == "tiny-a"
    assert daemon.api().get("/v1/status")["store"]["previous"] == second.install.bundle.dir
    assert ("cold swap" in daemon.text()) == (swap == "cold")
    if swap == "cold":
        assert "--swap cold" in second.install.smoke.detail
        assert "previous bundle is loaded again" in broken.install.smoke.detail


def test_tcp_cut_mid_upload_resumes_by_itself_and_on_rerun(bundles: dict[str, Path], config: Path, serve: Any,
                                                           tmp_path: Path) -> None:
    port = free_port()
    token = token_file(tmp_path)
    daemon = serve(tmp_path / "store", "--tcp", f"127.0.0.1:{port}", "--token-file", str(token))
    total = sum(e.bytes for e in read_manifest(bundles["b"]).files.values())

    proxy = CuttingProxy(port, cut_after=12 << 20)  # in the second 8 MiB chunk of extra.bin
    dp.add_device("net", f"tcp://127.0.0.1:{proxy.port}?token-file={token}")
    retried: list[str] = []
    result = dp.deploy(bundles["b"], "net", on_retry=retried.append)
    # one retry for the cut; any more only while the device still held the dropped connection's
    # file open ("busy": its handler had not read the EOF yet, under load)
    assert proxy.cuts == 1 and len(retried) == result.attempts - 1 >= 1
    assert all("another connection" in r for r in retried[1:]), retried
    assert result.install.ok
    # the second connection resumed from what the device held (at least the first chunk) and
    # nothing acknowledged was sent twice
    assert result.held_per_attempt[0] == 0 and result.held_per_attempt[1] >= 8 << 20
    assert result.sent_bytes <= total
    same_files(bundles["b"], daemon.store / "bundles" / result.install.bundle.dir)
    assert daemon.serving() == "tiny-b"
    proxy.close()

    # no retries: the command fails and says to re-run; the re-run sends only the rest
    proxy = CuttingProxy(port, cut_after=12 << 20)
    dp.add_device("net", f"tcp://127.0.0.1:{proxy.port}?token-file={token}", replace=True)
    c = variant(bundles["b"], tmp_path / "c", "tiny-c")
    with pytest.raises(ToolkitError) as e:
        dp.deploy(c, "net", retries=0)
    assert "re-run" in str(e.value)
    retried.clear()
    rerun = dp.deploy(c, "net", on_retry=retried.append)
    # as above, a retry only while the device still held the cut connection's file open (under
    # load): its handler then drops the cut chunk's unverified tail, and the retry resumes from
    # the chunk's start; otherwise one attempt sends exactly what the device lacked
    assert all("another connection" in r for r in retried), retried
    assert rerun.held_at_start >= 8 << 20 and min(rerun.held_per_attempt) >= 8 << 20
    if retried:
        assert rerun.sent_bytes <= rerun.total_bytes
    else:
        assert rerun.sent_bytes == rerun.total_bytes - rerun.held_at_start
    assert rerun.install.ok
    same_files(c, daemon.store / "bundles" / rerun.install.bundle.dir)
    assert daemon.serving() == "tiny-c"
    proxy.close()


def test_a_busy_chunk_is_retried_and_a_busy_commit_is_not(bundles: dict[str, Path], config: Path,
                                                          serve: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk answered "busy" (the device still holds the file for a connection that just
    dropped) is sent again after a pause; a commit answered "busy" (another install is running)
    fails the deploy at once with the device's words."""
    from host.transfer import HttpDeployClient, RemoteError

    daemon = serve(tmp_path / "store")
    dp.add_device("local", f"unix://{daemon.socket}")
    real_send, real_commit = HttpDeployClient.send_chunks, HttpDeployClient.commit
    busy = ["chunk"]

    def send_chunks(self: Any, upload_id: str, chunks: Any) -> Any:
        if busy and busy[0] == "chunk":
            busy.pop()
            raise RemoteError("model.onnx is being written by another connection", 409, "busy")
        return real_send(self, upload_id, chunks)

    def commit(self: Any, upload_id: str, *rest: Any, **kw: Any) -> Any:
        if busy and busy[0] == "commit":
            raise RemoteError("another install is running", 409, "busy")
        return real_commit(self, upload_id, *rest, **kw)

    monkeypatch.setattr(HttpDeployClient, "send_chunks", send_chunks)
    monkeypatch.setattr(HttpDeployClient, "commit", commit)
    retried: list[str] = []
    result = dp.deploy(bundles["a"], "local", on_retry=retried.append)
    assert result.install.ok and result.attempts == 2 and "another connection" in retried[0]
    busy.append("commit")
    with pytest.raises(ToolkitError, match="refused the bundle: another install is running"):
        dp.deploy(bundles["b"], "local", on_retry=retried.append)
    assert len(retried) == 1


def test_deploy_over_a_lossy_serial_line(bundles: dict[str, Path], config: Path, serve: Any,
                                         tmp_path: Path) -> None:
    """A pty pair through a relay that damages >= 1 % of the bytes (bursts of flips and
    losses, both directions): the install completes with exactly the sent bytes."""
    faults = Faults(corrupt=0.0008, drop=0.0008, burst=16)
    token = token_file(tmp_path)
    with PtyRelay(faults=faults, seed=11) as relay:
        daemon = serve(tmp_path / "store", "--serial", relay.device_path, "--token-file", str(token))
        dp.add_device("board", f"serial://{relay.host_path}?baud=921600&token-file={token}")
        result = dp.deploy(bundles["a"], "board", retries=6)
        assert result.install.ok
        same_files(bundles["a"], daemon.store / "bundles" / result.install.bundle.dir)
        assert relay.stats.to_device.affected_ratio >= 0.01
        assert dp.ping("board").hello.active["name"] == "tiny-a"  # type: ignore[index]
        assert daemon.serving() == "tiny-a"


def test_sigkill_mid_install_leaves_the_previous_bundle_serving(bundles: dict[str, Path], config: Path,
                                                                serve: Any, tmp_path: Path) -> None:
    store, hold = tmp_path / "store", tmp_path / "hold"
    hold.mkdir()
    daemon = serve(store, hold=hold)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    (hold / "hold").write_text("")
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, dp.deploy, bundles["b"], "local", retries=0))
    t.start()
    deadline = time.monotonic() + 30
    while not (hold / "smoke-started").exists():
        assert time.monotonic() < deadline, "the install never reached its smoke test"
        time.sleep(0.02)
    assert json.loads((store / "active").read_text())["name"] == "tiny-b"  # switched, not yet smoked
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    t.join(30)
    assert errors  # the host saw the connection die
    (hold / "hold").unlink()
    restarted = serve(store)  # recovery runs before anything is loaded
    assert restarted.serving() == "tiny-a"
    dp.add_device("local", f"unix://{restarted.socket}", replace=True)
    assert dp.ping("local").hello.active["name"] == "tiny-a"  # type: ignore[index]
    again = dp.deploy(bundles["b"], "local")  # the verified bundle was kept: nothing is resent
    assert again.install.ok and again.sent_bytes == 0
    assert restarted.serving() == "tiny-b"


@pytest.mark.parametrize("swap", ["hot", "cold"])
def test_what_clients_see_while_a_new_bundle_is_smoke_tested(bundles: dict[str, Path], config: Path,
                                                             serve: Any, tmp_path: Path, swap: str) -> None:
    """Hot: the old bundle keeps answering while the new one is tested beside it. Cold: it has
    been unloaded, so readiness and requests answer 503 "switching" until the new one is up."""
    hold = tmp_path / "hold"
    hold.mkdir()
    daemon = serve(tmp_path / "store", "--swap", swap, hold=hold)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    (hold / "hold").write_text("")
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _catch(errors, dp.deploy, bundles["b"], "local"))
    t.start()
    deadline = time.monotonic() + 30
    while not (hold / "smoke-started").exists():
        assert time.monotonic() < deadline, "the install never reached its smoke test"
        time.sleep(0.02)
    api = daemon.api()
    if swap == "hot":
        assert api.request("GET", "/health").status == 200 and daemon.serving() == "tiny-a"
    else:
        assert api.request("GET", "/health").status == 503
        assert api.get("/v1/status")["state"] == "switching"
        reply = api.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert reply.status == 503 and reply.headers.get("Retry-After")
    (hold / "hold").unlink()
    t.join(60)
    assert not errors and daemon.serving() == "tiny-b"


def test_an_active_bundle_damaged_on_disk_falls_back_to_the_previous(bundles: dict[str, Path], config: Path,
                                                                     serve: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"
    daemon = serve(store)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    b = dp.deploy(bundles["b"], "local").install
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    with open(store / "bundles" / b.bundle.dir / "model.onnx", "r+b") as f:  # a flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    restarted = serve(store)  # every hash is checked again at start: b is refused, a serves
    assert restarted.serving() == "tiny-a"
    assert "failed to load" in restarted.text()


def _catch(errors: list[BaseException], fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # the test inspects it
        errors.append(e)


# --- deploy edge cases, against the store-only daemon (its memory and limits can be faked) -------

def test_tcp_needs_the_token(bundles: dict[str, Path], config: Path, start: Any, tmp_path: Path) -> None:
    port = free_port()
    start(tcp=f"127.0.0.1:{port}", token_file=token_file(tmp_path))
    dp.add_device("net", f"tcp://127.0.0.1:{port}")
    with pytest.raises(ToolkitError, match="401.*token|token"):
        dp.deploy(bundles["a"], "net")


def test_incompatible_bundles_are_refused_before_any_byte(bundles: dict[str, Path], config: Path,
                                                          start: Any, tmp_path: Path) -> None:
    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock, memory_total=256 << 20)  # a 256 MiB board
    dp.add_device("small", f"unix://{sock}")
    with pytest.raises(ToolkitError, match="TensorRT") as e:
        dp.deploy(bundles["trt"], "small")
    assert "nothing was sent" in str(e.value)
    with pytest.raises(ToolkitError, match="does not fit"):
        dp.deploy(bundles["a"], "small")
    assert list((daemon.store / "staging").iterdir()) == []
    # the device checks too, whatever the host says
    from host.transfer import HttpDeployClient, RemoteError

    with pytest.raises(RemoteError) as r:
        HttpDeployClient(f"unix://{sock}").begin((bundles["trt"] / MANIFEST).read_bytes())
    assert r.value.code == "incompatible"


def test_hostile_manifests_and_oversized_uploads_are_refused(bundles: dict[str, Path], config: Path,
                                                             start: Any, tmp_path: Path) -> None:
    from host.transfer import HttpDeployClient, RemoteError

    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock, limits=StoreLimits(max_bundle_bytes=1 << 20))
    client = HttpDeployClient(f"unix://{sock}")
    data = json.loads((bundles["a"] / MANIFEST).read_text())
    for evil in ("../../etc/cron.d/x", "/etc/passwd", "tokenizer/../../x"):
        hostile = {**data, "files": {evil: {"sha256": "0" * 64, "bytes": 1}}}
        with pytest.raises(RemoteError) as e:
            client.begin(json.dumps(hostile).encode())
        # the manifest codec refuses it before the store's own name check (bad_name) would
        assert e.value.status == 400 and e.value.code == "bad_manifest"
        assert "only name files inside" in str(e.value)
    dp.add_device("local", f"unix://{sock}")
    with pytest.raises(ToolkitError, match="accepts bundles up to"):
        dp.deploy(bundles["b"], "local")  # 12 MiB declared, 1 MiB allowed: refused at begin
    assert list((daemon.store / "staging").iterdir()) == []


# --- the CLI ----------------------------------------------------------------------------------------

def test_cli_devices_deploy_rollback(bundles: dict[str, Path], config: Path, start: Any,
                                     tmp_path: Path) -> None:
    from toolkit.cli import main

    sock = tmp_path / "d.sock"
    start(socket_path=sock)
    runner = CliRunner()
    r = runner.invoke(main, ["devices", "add", "local", f"unix://{sock}"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["devices", "add", "local", "unix:///elsewhere.sock"])
    assert r.exit_code == 1 and "already exists" in r.output
    r = runner.invoke(main, ["devices", "add", "x", "ftp://host"])
    assert r.exit_code == 1 and "tcp://HOST:PORT" in r.output
    r = runner.invoke(main, ["devices", "list"])
    assert "local" in r.output and "unix" in r.output
    assert json.loads((config / "devices.json").read_text()) == {"local": {"uri": f"unix://{sock}"}}
    assert (config / "devices.json").stat().st_mode & 0o077 == 0
    r = runner.invoke(main, ["devices", "ping", "local"])
    assert r.exit_code == 0 and "active   none" in r.output and "rtt" in r.output
    r = runner.invoke(main, ["deploy", str(bundles["a"]), "--device", "local"])
    assert r.exit_code == 0, r.output
    assert "smoke test passed" in r.output and "MB/s" in r.output
    r = runner.invoke(main, ["deploy", str(bundles["broken"]), "--device", "local"])
    assert r.exit_code == 1 and "rolled back" in r.output
    r = runner.invoke(main, ["rollback", "--device", "local"])
    assert r.exit_code == 1 and "no previous bundle" in r.output
    r = runner.invoke(main, ["deploy", str(bundles["b"]), "--device", "local"])
    r = runner.invoke(main, ["rollback", "--device", "local"])
    assert r.exit_code == 0 and "active tiny-a-" in r.output
    r = runner.invoke(main, ["devices", "remove", "local"])
    assert r.exit_code == 0
    r = runner.invoke(main, ["deploy", str(bundles["a"]), "--device", "local"])
    assert r.exit_code == 1 and "unknown" in r.output


def test_chunks_follow_the_grid_from_an_off_grid_resume_point(tmp_path):
    """A resume point off the chunk grid (the device held bytes sent in other-sized chunks)
    first sends the piece up to the next grid line; every CRC32, taken from the verification
    pass or computed for that piece, is the CRC of exactly the bytes the chunk names."""
    from device.store.checksum import crc32
    from device.store.store import FileProgress, UploadState
    from host.deploy import _send_missing, _Sent
    from host.transfer import DeployClient

    data = os.urandom(10_000)
    (tmp_path / "w.bin").write_bytes(data)
    chunk = 4096
    grid = {"w.bin": [crc32(data[i:i + chunk]) for i in range(0, len(data), chunk)]}

    class Recorder(DeployClient):
        sent: list[tuple[int, int, int]] = []

        def chunk(self, upload_id, path, offset, crc, payload):  # type: ignore[override]
            assert crc == zlib.crc32(payload) and payload == data[offset:offset + len(payload)]
            self.sent.append((offset, len(payload), crc))
            return offset + len(payload)

    state = UploadState("u", "n", {"w.bin": FileProgress(len(data), 1000)})
    _send_missing(Recorder(), tmp_path, state, chunk, grid, _Sent(), None)
    assert [(o, n) for o, n, _ in Recorder.sent] == [(1000, 3096), (4096, 4096), (8192, 1808)]
    assert [c for o, _, c in Recorder.sent if o % chunk == 0] == grid["w.bin"][1:]


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_http_chunks_written_as_they_arrive_keep_only_good_bytes(bundles: dict[str, Path], start: Any,
                                                                  tmp_path: Path, transport: str) -> None:
    """Over HTTP the next chunk goes into the staged file as it arrives: a chunk with
    a wrong CRC32 is refused and cut off again, the connection stays usable, and the bytes of a
    good chunk and of the pipelined ones after it arrive exactly."""
    from host.transfer import Chunk, HttpDeployClient, RemoteError

    if transport == "unix":
        start(socket_path=tmp_path / "d.sock")
        client = HttpDeployClient(f"unix://{tmp_path / 'd.sock'}")
    else:
        port, token = free_port(), token_file(tmp_path)
        start(tcp=f"127.0.0.1:{port}", token_file=token)
        client = HttpDeployClient(f"tcp://127.0.0.1:{port}", token="s3cret-token-for-tests-0123456789")
    bundle = bundles["a"]
    state = client.begin((bundle / MANIFEST).read_bytes())
    rel = max(state.files, key=lambda r: state.files[r].size)
    data = (bundle / rel).read_bytes()
    with pytest.raises(RemoteError) as e:
        client.chunk(state.upload_id, rel, 0, zlib.crc32(data[:5000]) ^ 1, data[:5000])
    assert e.value.code == "bad_crc"
    assert client.begin((bundle / MANIFEST).read_bytes()).files[rel].held == 0
    assert client.chunk(state.upload_id, rel, 0, zlib.crc32(data[:5000]), data[:5000]) == 5000
    chunks = [Chunk(rel, o, min(7000, len(data) - o), zlib.crc32(data[o:o + 7000]), bundle / rel)
              for o in range(5000, len(data), 7000)]
    held = [h for _, h in client.send_chunks(state.upload_id, chunks)]
    assert held[-1] == len(data)
    client.close()


def test_tcp_replies_do_not_wait_for_delayed_acks(start: Any, tmp_path: Path) -> None:
    """Each reply leaves in one send with TCP_NODELAY: with Nagle on, the body of every small
    reply waited ~40 ms for the client's delayed ACK. Compared with the same calls over the Unix
    socket (a ratio, not a time: the bug made it ~50x)."""
    from host.transfer import HttpDeployClient

    port, token = free_port(), token_file(tmp_path)
    start(socket_path=tmp_path / "d.sock", tcp=f"127.0.0.1:{port}", token_file=token)
    clients = {"unix": HttpDeployClient(f"unix://{tmp_path / 'd.sock'}"),
               "tcp": HttpDeployClient(f"tcp://127.0.0.1:{port}", token="s3cret-token-for-tests-0123456789")}
    took = {}
    for name, client in clients.items():
        client.status()  # connect
        t0 = time.perf_counter()
        for _ in range(10):
            client.status()
        took[name] = time.perf_counter() - t0
        client.close()
    assert took["tcp"] < 8 * took["unix"] + 0.05, took
