"""The device's bundle store (device/store/store.py) on its own: names, limits and manifests
refused before any byte, chunk checks, chunks written as they arrive, a daemon killed mid-chunk,
no writes through links, a file that fails verification, install with smoke test and rollback.
The same store behind real daemons and `toolkit deploy`: tests/host/test_deploy.py."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from paths import REPO

from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, read_manifest
from device.store.store import (
    SmokeResult,
    Store,
    StoreError,
    StoreLimits,
    check_relpath,
    read_limits,
    smoke_test,
)


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


def test_begin_reports_only_what_an_arriving_chunk_cannot_take_back(base_bundle: Path,
                                                                    tmp_path: Path) -> None:
    """While a chunk is still arriving on a connection the host gave up on (its handler has not
    seen the EOF yet), begin reports where that chunk began, not its bytes already in the file:
    if the body ends short they are cut off, and a resume from past them would meet a gap."""
    store = Store.open(tmp_path / "s")
    data = os.urandom(300_000)
    mb = manifest_bytes({"f.bin": (len(data), hashlib.sha256(data).hexdigest())}, base_bundle)
    uid = store.begin(mb).upload_id
    staged = tmp_path / "s" / "staging" / uid / "f.bin"
    first = memoryview(data[:100_000])

    def whole(view: memoryview) -> int:
        view[:len(first)] = first
        return len(first)
    assert store.receive_chunk(uid, "f.bin", 0, 100_000, zlib.crc32(first), whole) is not None
    arrived, cut = threading.Event(), threading.Event()

    def stalls(view: memoryview) -> int:  # 50 kB of the next chunk, then the line goes dead
        if not arrived.is_set():
            view[:50_000] = data[100_000:150_000]
            arrived.set()
            return 50_000
        cut.wait(30)
        return 0
    errors: list[StoreError] = []

    def receive() -> None:
        try:
            store.receive_chunk(uid, "f.bin", 100_000, 100_000, zlib.crc32(data[100_000:200_000]), stalls)
        except StoreError as e:
            errors.append(e)
    thread = threading.Thread(target=receive)
    thread.start()
    try:
        assert arrived.wait(30)
        deadline = time.monotonic() + 30  # the piece is written after read_into returns it
        while staged.stat().st_size < 150_000 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert staged.stat().st_size == 150_000  # its bytes are in the file, unchecked
        assert store.begin(mb).files["f.bin"].held == 100_000
    finally:
        cut.set()
        thread.join(30)
    assert [e.code for e in errors] == ["short_body"] and staged.stat().st_size == 100_000
    assert store.begin(mb).files["f.bin"].held == 100_000
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


def test_an_unreadable_active_record_falls_back_to_the_previous_bundle(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Store.open(root).close()
    prev = {"dir": "old-000000000000", "name": "old", "manifest_sha256": "0" * 64}
    (root / "bundles" / prev["dir"]).mkdir()
    (root / "previous").write_text(json.dumps(prev))
    (root / "active").write_text("garbage{")  # a disk fault, or a hand edit
    store = Store.open(root)
    # as for a record naming a missing folder: the previous bundle serves, not "no bundle yet"
    assert store.active is not None and store.active.dir == prev["dir"]
    assert store.previous is None
    assert json.loads((root / "active").read_text())["dir"] == prev["dir"]  # the garbage is gone
    store.close()


def test_an_unreadable_previous_record_is_removed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Store.open(root).close()
    (root / "previous").write_text("garbage{")  # read as absent, but logged on every read
    store = Store.open(root)
    assert store.previous is None and not (root / "previous").exists()
    store.close()


@pytest.mark.parametrize("folder", ["/etc", "../elsewhere", "a/b", ".."])
def test_a_record_naming_a_folder_outside_bundles_is_unreadable(tmp_path: Path, folder: str) -> None:
    """path_of joins the record's dir under bundles/: an absolute or climbing one would point
    the daemon outside its store; it reads as a broken record and the store falls back."""
    root = tmp_path / "s"
    Store.open(root).close()
    prev = {"dir": "old-000000000000", "name": "old", "manifest_sha256": "0" * 64}
    (root / "bundles" / prev["dir"]).mkdir()
    (root / "previous").write_text(json.dumps(prev))
    (root / "active").write_text(json.dumps({**prev, "dir": folder}))
    store = Store.open(root)
    assert store.active is not None and store.active.dir == prev["dir"]
    store.close()


def test_store_refuses_a_bundle_folder_and_writes_nothing(base_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / MANIFEST).write_bytes((base_bundle / MANIFEST).read_bytes())
    with pytest.raises(ToolkitError, match="is a bundle") as e:
        Store.open(root)
    assert e.value.hint and f"toolkit serve {root}" in e.value.hint
    assert sorted(p.name for p in root.iterdir()) == [MANIFEST]  # no bundles/, staging/ or lock
    (root / "bundles").mkdir()  # a store (its bundles/ folder) that happens to hold a manifest.json
    Store.open(root).close()


@pytest.mark.parametrize("text", ['{"max_bundle_bytes": "x"}', '{"max_files": 0}', '{"nope": 1}', "[1"])
def test_store_limits_that_cannot_be_used_say_how_to_fix_them(tmp_path: Path, text: str) -> None:
    path = tmp_path / "limits.json"
    path.write_text(text)
    with pytest.raises(ToolkitError) as e:
        read_limits(path)
    assert str(path) in e.value.message and e.value.hint and "remove" in e.value.hint
