"""The store never gets stuck and loses nothing on disk (issue #16, item 7).

One test per hole: a bundle ONNX Runtime cannot load, swapped in or active at start-up; a full
disk (ENOSPC injected in the write path, free space faked for the check); the space check's
other uploads and engine estimate; listing and removing abandoned uploads; status and chunks
answered while a slow install runs; and a seeded SIGKILL loop over deploy + commit against the
real daemon (`python -m toolkit serve --store`).

Fixtures (bundles, daemons) are the deploy tests' (tests/support/deploy_fixtures.py).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import threading
import time
import zlib
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from deploy_fixtures import variant

from bundle.contract import RAGGED_MODEL_FILE
from bundle.errors import ToolkitError
from bundle.manifest import MANIFEST, EngineRecord, hash_tree, read_manifest, verify_files
from device.store.store import SmokeResult, Store
from host import deploy as dp
from host.transfer import HttpDeployClient, RemoteError

MARGIN = 64 << 20  # device/store/space.py DISK_MARGIN


# --- bundles ONNX Runtime cannot load ------------------------------------------------------------

def broken_op_bundle(src: Path, dst: Path, name: str, op: str) -> Path:
    """A copy of src whose graph (model.onnx and its ragged twin, convert/ragged.py, which a
    daemon with several slots loads instead) also holds a node ONNX Runtime cannot run, manifest
    re-hashed (every hash valid: only the runtime refuses it).

    op "nope": domain com.example, op Nope (ORT raises Fail: "not a registered function/op").
    op "neg-bf16": a standard Neg on bfloat16, which ORT's CPU provider has no kernel for (ORT
    raises NotImplemented, which is not one of the errors the ORT backend turns into a
    ToolkitError: the hole this tests)."""
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(src, dst)
    for graph in (dst / "model.onnx", dst / RAGGED_MODEL_FILE):  # both forms of the graph
        if not graph.exists():
            continue
        model = onnx.load(str(graph))
        if op == "nope":
            model.opset_import.append(helper.make_opsetid("com.example", 1))
            model.graph.initializer.append(helper.make_tensor("nope_in", TensorProto.FLOAT, [1], [0.0]))
            model.graph.node.append(helper.make_node("Nope", ["nope_in"], ["nope_out"], name="nope",
                                                     domain="com.example"))
        else:
            model.graph.initializer.append(helper.make_tensor("nope_in", TensorProto.BFLOAT16, [1], [0]))
            model.graph.node.append(helper.make_node("Neg", ["nope_in"], ["nope_out"], name="nope"))
        onnx.save(model, str(graph))
    manifest = read_manifest(dst)
    manifest.source = dataclasses.replace(manifest.source, name=name)
    manifest.files = hash_tree(dst)
    (dst / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    assert verify_files(dst, read_manifest(dst)) == []
    return dst


def stage(store: Store, bundle: Path) -> str:
    """Upload every file of a bundle into the store (in-process); returns the upload id."""
    state = store.begin((bundle / MANIFEST).read_bytes())
    step = store.limits.max_chunk_bytes
    for rel in state.files:
        data = (bundle / rel).read_bytes()
        for at in range(0, len(data), step):
            piece = data[at:at + step]
            store.write_chunk(state.upload_id, rel, at, piece, zlib.crc32(piece))
    return state.upload_id


def install_unchecked(store_root: Path, bundle: Path) -> str:
    """Put a bundle into a store as its active one without loading it (a fake smoke test that
    passes), as if it had been deployed by a daemon whose runtime could load it."""
    store = Store.open(store_root)
    try:
        result = store.commit(stage(store, bundle), lambda p: SmokeResult(True, "not loaded"))
        assert result.ok
        return result.bundle.dir
    finally:
        store.close()


@pytest.mark.parametrize("swap", ["cold", "auto"])
@pytest.mark.parametrize("op", ["neg-bf16", "nope"])
def test_a_bundle_the_runtime_cannot_load_puts_the_previous_back(
        bundles: dict[str, Path], config: Path, serve: Any,  # noqa: F811
        tmp_path: Path, op: str, swap: str) -> None:
    broken = broken_op_bundle(bundles["a"], tmp_path / "broken", "tiny-unloadable", op)
    daemon = serve(tmp_path / "store", "--swap", swap)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    result = dp.deploy(broken, "local").install
    assert not result.ok and result.rolled_back
    assert result.active and result.active.name == "tiny-a"
    assert result.smoke and "nope" in result.smoke.detail.lower() and "\n" not in result.smoke.detail
    status = daemon.api().get("/v1/status")
    assert status["state"] == "ready"  # not stuck in "switching"
    assert status["failure"]["bundle"] == result.bundle.dir and status["failure"]["serving"]
    assert "nope" in status["failure"]["reason"].lower()
    assert json.loads((daemon.store / "active").read_text())["name"] == "tiny-a"
    assert not (daemon.store / "switch.json").exists()
    assert daemon.serving() == "tiny-a"
    from toolkit.cli import main

    r = CliRunner().invoke(main, ["status", "--socket", str(daemon.socket)])
    assert r.exit_code == 0 and f"failed bundle  {result.bundle.dir}" in r.output, r.output


def test_a_broken_active_bundle_at_start_falls_back_and_is_not_retried(bundles: dict[str, Path],  # noqa: F811
                                                                       config: Path, serve: Any,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    store = tmp_path / "store"
    daemon = serve(store)
    dp.add_device("local", f"unix://{daemon.socket}")
    good = dp.deploy(bundles["a"], "local").install.bundle.dir
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    broken = broken_op_bundle(bundles["a"], tmp_path / "broken", "tiny-bad", "neg-bf16")
    bad = install_unchecked(store, broken)
    restarted = serve(store)  # no crash: the previous bundle serves
    assert restarted.serving() == "tiny-a"
    status = restarted.api().get("/v1/status")
    assert status["failure"] == {"bundle": bad, "reason": status["failure"]["reason"], "serving": good}
    assert "Neg" in status["failure"]["reason"]
    assert json.loads((store / "active").read_text())["dir"] == good  # recorded in the store
    restarted.proc.send_signal(signal.SIGTERM)
    assert restarted.proc.wait(30) == 0
    again = serve(store)  # the broken bundle is not tried again
    assert again.serving() == "tiny-a" and "failure" not in again.api().get("/v1/status")
    assert "failed to load" not in again.text()


def test_when_nothing_loads_the_daemon_stays_up_not_ready(bundles: dict[str, Path], config: Path,  # noqa: F811
                                                         serve: Any, tmp_path: Path) -> None:  # noqa: F811
    store = tmp_path / "store"
    broken = broken_op_bundle(bundles["a"], tmp_path / "broken", "tiny-bad", "neg-bf16")
    bad = install_unchecked(store, broken)
    daemon = serve(store)
    api = daemon.api()
    status = api.get("/v1/status")
    assert status["state"] == "failed" and status["failure"]["bundle"] == bad
    assert status["failure"]["serving"] is None and "Neg" in status["failure"]["reason"]
    assert api.request("GET", "/health").status == 503
    assert daemon.proc.poll() is None  # up, not a crash loop
    assert "holds no bundle yet" not in daemon.text()  # it holds one; it did not load
    dp.add_device("local", f"unix://{daemon.socket}")  # and a deploy still fixes it
    assert dp.deploy(bundles["a"], "local").install.ok
    assert daemon.serving() == "tiny-a" and "failure" not in api.get("/v1/status")


def test_a_kv_cache_this_machine_cannot_hold_stops_the_daemon_and_keeps_the_store(
        bundles: dict[str, Path], config: Path, serve: Any, tmp_path: Path) -> None:  # noqa: F811
    """A KV cache the slots ask for and this machine's memory cannot hold is the settings' error,
    said before anything loads: the daemon exits with it and the store keeps its active bundle.
    It used to be found by the load and blamed on the bundle: a rollback put the previous,
    smaller bundle in its place, and the deployed one was left as `previous`."""
    store = tmp_path / "store"
    daemon = serve(store)
    dp.add_device("local", f"unix://{daemon.socket}")
    assert dp.deploy(bundles["a"], "local").install.ok
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    big = variant(bundles["a"], tmp_path / "big", "tiny-big")  # a cache of 10^8 positions a slot
    manifest = read_manifest(big)
    assert manifest.architecture is not None
    dims = dataclasses.replace(manifest.architecture.dims, max_positions=10**8)
    manifest.architecture = dataclasses.replace(manifest.architecture, dims=dims)
    manifest.max_seq = 10**8
    manifest.files = hash_tree(big)
    (big / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    active = install_unchecked(store, big)
    record = (store / "active").read_text()
    with pytest.raises(RuntimeError) as failed:
        serve(store, "--slots", "2")  # hundreds of GB: refused before any of it is allocated
    log = str(failed.value)
    assert "exited with 1" in log and "the KV cache of 2 slots of 100000000 tokens" in log
    assert "--slots" in log and "Traceback" not in log and "rolling back" not in log
    assert (store / "active").read_text() == record and json.loads(record)["dir"] == active


# --- a full disk -------------------------------------------------------------------------------------

def test_enospc_in_a_chunk_answers_507_with_figures_and_keeps_nothing(bundles: dict[str, Path],  # noqa: F811
                                                                     config: Path, start: Any,  # noqa: F811
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import device.store.store as store_mod

    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock)
    dp.add_device("local", f"unix://{sock}")
    real_write = store_mod.write_all

    def full(fd: int, data: Any, offset: int = 0) -> None:  # half the piece lands, then ENOSPC
        view = memoryview(data).cast("B")
        real_write(fd, view[:len(view) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_mod, "write_all", full)
    retried: list[str] = []
    with pytest.raises(ToolkitError) as e:
        dp.deploy(bundles["a"], "local", on_retry=retried.append)
    assert not retried  # a full disk is not a dropped connection
    message = str(e.value)
    assert "out of disk space" in message and "free" in message and "bytes" in message
    assert "toolkit devices uploads local" in message
    # the wire: 507 with both figures as fields
    client = HttpDeployClient(f"unix://{sock}")
    state = client.begin((bundles["a"] / MANIFEST).read_bytes())
    rel, fp = next(iter(state.files.items()))
    data = (bundles["a"] / rel).read_bytes()[:fp.size]
    with pytest.raises(RemoteError) as r:
        list(client.send_chunks(state.upload_id, [_chunk(bundles["a"], rel, data, zlib.crc32(data))]))
    assert r.value.status == 507 and r.value.code == "no_space"
    assert isinstance(r.value.extra["needed_bytes"], int) and isinstance(r.value.extra["free_bytes"], int)
    client.close()
    # nothing half-written: the file holds no byte of the chunk that did not fit; refs untouched
    staged = daemon.store / "staging" / state.upload_id
    assert not any(p.stat().st_size for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert not (daemon.store / "active").exists()
    assert not list((daemon.store / "staging").glob(".*"))
    monkeypatch.setattr(store_mod, "write_all", real_write)  # space again: the same deploy resumes
    assert dp.deploy(bundles["a"], "local").install.ok


def _chunk(bundle: Path, rel: str, data: bytes, crc: int) -> Any:
    from host.transfer import Chunk

    return Chunk(rel, 0, len(data), crc, bundle / rel)


Usage = namedtuple("Usage", "total used free")


def fake_free(monkeypatch: pytest.MonkeyPatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 40, (1 << 40) - free, free))


def test_a_begin_the_disk_cannot_hold_is_507_with_figures(bundles: dict[str, Path], config: Path,  # noqa: F811
                                                          start: Any, tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock)
    dp.add_device("local", f"unix://{sock}")
    fake_free(monkeypatch, 5 << 20)
    retried: list[str] = []
    with pytest.raises(ToolkitError) as e:
        dp.deploy(bundles["a"], "local", on_retry=retried.append)
    message = str(e.value)
    assert not retried and "out of disk space" in message and f"({5 << 20} bytes) free" in message
    assert "--remove" in message
    assert not any((daemon.store / "staging").iterdir())  # refused before anything was written


def test_a_full_disk_while_restoring_the_records_is_507_and_settled_next_time(
        bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The new bundle failed its smoke test and the disk filled before `active` could name the
    old one again: 507 (not a bare OSError), and the next install starts from what really
    serves (the journal is settled first) rather than journaling the failed bundle as 'old'."""
    import device.store.store as store_mod
    from device.store.errors import StoreError

    root = tmp_path / "store"
    install_unchecked(root, bundles["a"])
    store = Store.open(root)
    try:
        b = stage(store, bundles["b"])
        real = store_mod.write_atomic

        def full_when_restoring(path: Path, data: Any, mode: int = 0o644) -> int:
            if Path(path).name == "active" and b"tiny-a" in bytes(data):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, data, mode)

        with monkeypatch.context() as m:
            m.setattr(store_mod, "write_atomic", full_when_restoring)
            with pytest.raises(StoreError) as e:
                store.commit(b, lambda p: SmokeResult(False, "does not load"))
        assert e.value.status == 507 and e.value.code == "no_space"
        assert store.install is not None and store.install.state == "failed"
        c = stage(store, variant(bundles["a"], tmp_path / "c", "tiny-c"))
        result = store.commit(c, lambda p: SmokeResult(True, "ok"))
        assert result.ok and result.previous is not None and result.previous.name == "tiny-a"
        assert not (root / "switch.json").exists()
    finally:
        store.close()


def upload_bytes(bundle: Path) -> int:
    return sum(e.bytes for e in read_manifest(bundle).files.values())


def test_the_space_check_counts_other_uploads_and_the_engine(bundles: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from device.store.errors import StoreError

    store = Store.open(tmp_path / "store")
    a, b = bundles["a"], bundles["b"]
    size_a, size_b = upload_bytes(a), upload_bytes(b)
    fake_free(monkeypatch, size_b + MARGIN + size_a // 2)  # room for b, not for a and b
    store.begin((a / MANIFEST).read_bytes())  # a begun (owes size_a), nothing sent yet
    with pytest.raises(StoreError) as e:
        store.begin((b / MANIFEST).read_bytes())
    assert e.value.status == 507 and "owed to 1 other upload" in e.value.message
    assert e.value.extra["needed_bytes"] == size_a + size_b + MARGIN
    assert not (store.staging / hashlib.sha256((b / MANIFEST).read_bytes()).hexdigest()).exists()
    assert [u.name for u in store.remove_uploads(every=True)] == ["tiny-a"]
    store.begin((b / MANIFEST).read_bytes())  # alone it fits
    store.remove_uploads(every=True)
    # a TensorRT bundle: the engine the board builds counts as the model file(s) it is built from
    trt = tmp_path / "trt"
    shutil.copytree(a, trt)
    manifest = read_manifest(trt)
    manifest.target = dataclasses.replace(manifest.target, runtime="tensorrt", name="jetson-orin-nano-8gb",
                                          family="jetson",
                                          engine=EngineRecord("build-on-device", "test", 1 << 30))
    (trt / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")
    model = manifest.files[manifest.model_file].bytes
    fake_free(monkeypatch, size_a + MARGIN + model // 2)
    with pytest.raises(StoreError) as e:
        store.begin((trt / MANIFEST).read_bytes())
    assert "TensorRT engine estimated at" in e.value.message
    assert e.value.extra["needed_bytes"] == size_a + model + MARGIN
    store.close()


# --- uploads in progress --------------------------------------------------------------------------

def test_uploads_are_listed_and_removed(bundles: dict[str, Path], config: Path, start: Any,  # noqa: F811
                                        tmp_path: Path) -> None:
    from toolkit.cli import main

    sock = tmp_path / "d.sock"
    daemon = start(socket_path=sock)
    dp.add_device("local", f"unix://{sock}")
    client = HttpDeployClient(f"unix://{sock}")
    a = client.begin((bundles["a"] / MANIFEST).read_bytes())
    b = client.begin((bundles["b"] / MANIFEST).read_bytes())
    rel = "model.onnx"
    data = (bundles["b"] / rel).read_bytes()
    client.chunk(b.upload_id, rel, 0, zlib.crc32(data), data)
    client.close()
    found, removed = dp.uploads("local")
    assert not removed and {u.upload_id for u in found} == {a.upload_id, b.upload_id}
    held = {u.upload_id: (u.held_bytes, u.total_bytes, u.name) for u in found}
    assert held[b.upload_id] == (len(data), b.total_bytes, "tiny-b")
    assert held[a.upload_id] == (0, a.total_bytes, "tiny-a")
    r = CliRunner().invoke(main, ["devices", "uploads", "local"])
    assert r.exit_code == 0 and b.upload_id[:12] in r.output and "tiny-b" in r.output, r.output
    r = CliRunner().invoke(main, ["devices", "uploads", "local", "--remove", b.upload_id[:12]])
    assert r.exit_code == 0 and f"removed {b.upload_id[:12]}" in r.output, r.output
    assert not (daemon.store / "staging" / b.upload_id).exists()
    assert (daemon.store / "staging" / a.upload_id).exists()
    r = CliRunner().invoke(main, ["devices", "uploads", "local", "--remove", "ffff"])
    assert r.exit_code == 1 and "no upload" in r.output
    r = CliRunner().invoke(main, ["devices", "uploads", "local", "--older-than", "1d"])
    assert r.exit_code == 0 and (daemon.store / "staging" / a.upload_id).exists()  # not idle that long
    r = CliRunner().invoke(main, ["devices", "uploads", "local", "--remove-all"])
    assert r.exit_code == 0 and "no uploads in progress" in r.output
    assert not any((daemon.store / "staging").iterdir())


def test_the_serial_messages_carry_uploads_commit_and_507_figures(bundles: dict[str, Path],  # noqa: F811
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The serial link carries the same messages (DeployService.handle_message): uploads,
    remove_uploads, an accepted commit followed through status, and a 507's byte counts."""
    from device.serve.deploy import DeployService, pack, unpack

    service = DeployService(Store.open(tmp_path / "store"), lambda p: SmokeResult(True, "ok"))

    def call(header: dict[str, Any], payload: bytes = b"") -> dict[str, Any]:
        reply, _ = unpack(service.handle_message(pack({**header, "rid": 1}, payload)))
        return reply

    upload = stage(service.store, bundles["a"])
    listed = call({"op": "uploads"})["result"]
    assert [(u["upload_id"], u["held_bytes"]) for u in listed] == [(upload, upload_bytes(bundles["a"]))]
    accepted = call({"op": "commit", "id": upload})["result"]
    assert accepted["accepted"] and accepted["state"] in ("running", "done")
    for _ in range(400):  # bounded: the fake activation returns at once
        install = call({"op": "status"})["result"]["install"]
        if install["state"] != "running":
            break
        time.sleep(0.05)
    assert install["job"] == accepted["job"] and install["state"] == "done" and install["result"]["ok"]
    other = service.store.begin((bundles["b"] / MANIFEST).read_bytes()).upload_id
    removed = call({"op": "remove_uploads", "ids": [other]})["result"]
    assert [u["upload_id"] for u in removed] == [other] and call({"op": "uploads"})["result"] == []
    fake_free(monkeypatch, 1 << 20)
    refused = call({"op": "begin"}, (bundles["b"] / MANIFEST).read_bytes())
    assert refused["ok"] is False and refused["status"] == 507
    assert refused["error"]["code"] == "no_space" and refused["error"]["free_bytes"] == 1 << 20
    assert refused["error"]["needed_bytes"] == upload_bytes(bundles["b"]) + MARGIN
    service.store.close()


def test_a_serial_message_missing_a_field_is_a_400_that_names_it(tmp_path: Path) -> None:
    from device.serve.deploy import DeployService, pack, unpack

    service = DeployService(Store.open(tmp_path / "store"), lambda p: SmokeResult(True, "ok"))
    for header in ({"op": "commit"}, {"op": "chunk", "id": "0" * 64, "path": "f", "crc32": 0},
                   {"op": "chunk", "id": "0" * 64, "path": "f", "offset": "x", "crc32": 0},
                   {"op": "commit", "id": None}):
        reply, _ = unpack(service.handle_message(pack({**header, "rid": 1})))
        assert reply["ok"] is False and reply["status"] == 400, reply  # was 500 internal_error
        assert reply["error"]["code"] == "invalid_request"
    assert service.store.install is None  # nothing was claimed
    service.store.close()


# --- the install runs outside the store lock -------------------------------------------------------

def test_status_and_chunks_answer_while_a_slow_install_runs(bundles: dict[str, Path], config: Path,  # noqa: F811
                                                            start: Any, tmp_path: Path) -> None:  # noqa: F811
    entered, release = threading.Event(), threading.Event()

    def slow_activate(path: Path) -> SmokeResult:  # an engine build that takes as long as the test wants
        entered.set()
        assert release.wait(60)
        return SmokeResult(True, "built and smoke-tested")

    sock = tmp_path / "d.sock"
    start(socket_path=sock, activate=slow_activate)
    dp.add_device("local", f"unix://{sock}")
    phases: list[Any] = []
    done: list[Any] = []
    host_saw_build = threading.Event()

    def on_phase(p: Any) -> None:
        phases.append(p)
        if p.phase == "build" and p.state == "running":
            host_saw_build.set()

    t = threading.Thread(target=lambda: done.append(dp.deploy(bundles["a"], "local", on_phase=on_phase)))
    t.start()
    try:
        assert entered.wait(30)
        client = HttpDeployClient(f"unix://{sock}")
        status = client._call("status", {}, timeout=10)  # main held the store lock here: no answer
        assert status["install"]["state"] == "running" and status["install"]["phase"] == "build"
        assert [p["phase"] for p in status["install"]["phases"]] == ["verify"]
        other = client.begin((bundles["b"] / MANIFEST).read_bytes())  # begin and chunks answer too
        data = (bundles["b"] / "model.onnx").read_bytes()
        assert client.chunk(other.upload_id, "model.onnx", 0, zlib.crc32(data), data) == len(data)
        with pytest.raises(RemoteError) as e:  # one install at a time
            client._call("rollback", {}, timeout=10)
        assert e.value.status == 409 and e.value.code == "busy"
        client.close()
        assert host_saw_build.wait(30)  # the host's own polls report the phase as it runs
    finally:
        release.set()
        t.join(30)
    assert done and done[0].install.ok
    assert phases[-1].state == "done"
    assert [name for name, _ in phases[-1].phases] == ["verify", "build", "switch"]


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_delete_cut_short_never_leaves_a_bundle_that_looks_installed(
        bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The SIGKILL loop found it on main: a kill inside the rmtree of an unreferenced bundle left
    bundles/<dir> without its manifest but with other files, which recovery kept and `begin`
    took for an installed bundle (nothing sent, the switch then fails)."""
    root = tmp_path / "store"
    a_dir = install_unchecked(root, bundles["a"])
    install_unchecked(root, bundles["b"])  # a is previous now; the next install deletes it
    c = variant(bundles["a"], tmp_path / "c", "tiny-c")

    def cut_short(path: Any, *args: Any, **kwargs: Any) -> None:  # the manifest goes first, then the kill
        (Path(path) / MANIFEST).unlink()
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", cut_short)
        with pytest.raises(Killed):
            install_unchecked(root, c)
    store = Store.open(root)  # the restart: recovery
    try:
        for folder in (root / "bundles").iterdir():
            assert (folder / MANIFEST).is_file(), f"half-deleted {folder.name} left in bundles/"
        assert not (root / "bundles" / a_dir).exists()
        again = store.begin((bundles["a"] / MANIFEST).read_bytes())
        assert not again.installed and again.held_bytes == 0  # sent again in full
    finally:
        store.close()


# --- SIGKILL anywhere in deploy + commit -------------------------------------------------------------

SEED = int(os.environ.get("TOOLKIT_SIGKILL_SEED", "20260"))  # another seed explores other kill points
ROUNDS = 20


def check_store(root: Path) -> None:
    """What a restarted daemon's store must be: recovery finished (no journal, no in-flight
    markers, no temp files), refs naming complete bundles whose every file matches its SHA-256,
    and staging holding only resumable uploads (a manifest named by its hash, files no longer
    than declared)."""
    assert not (root / "switch.json").exists()
    assert not list(root.glob(".*.tmp-*"))
    assert not list((root / "staging").glob(".*")), list((root / "staging").iterdir())
    for name in ("active", "previous"):
        if (root / name).exists():
            ref = json.loads((root / name).read_text())
            folder = root / "bundles" / ref["dir"]
            assert folder.is_dir(), f"{name} names the missing {ref['dir']}"
            assert hashlib.sha256((folder / MANIFEST).read_bytes()).hexdigest() == ref["manifest_sha256"]
    for folder in (root / "bundles").iterdir():  # installed bundles appear only complete
        assert verify_files(folder, read_manifest(folder)) == [], folder.name
    for entry in (root / "staging").iterdir():
        manifest_bytes = (entry / MANIFEST).read_bytes()
        assert hashlib.sha256(manifest_bytes).hexdigest() == entry.name
        manifest = read_manifest(entry)
        for rel, e in manifest.files.items():
            path = entry / rel
            assert not path.exists() or path.stat().st_size <= e.bytes


def test_sigkill_anywhere_in_deploy_and_commit_leaves_a_bundle_serving(base_bundle: Path,  # noqa: F811
                                                                       config: Path, serve: Any,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    rng = random.Random(SEED)
    store = tmp_path / "store"
    daemon = serve(store)
    dp.add_device("local", f"unix://{daemon.socket}")
    first = variant(base_bundle, tmp_path / "v0", "tiny-v0", extra_bytes=3 << 20)
    t0 = time.monotonic()
    assert dp.deploy(first, "local").install.ok
    window = (time.monotonic() - t0) * 1.2  # kills spread over the whole deploy + commit, and just after
    serving = "tiny-v0"
    outcomes = {"old": 0, "new": 0, "done": 0}  # interrupted: old or new serves; done: ended first
    for i in range(1, ROUNDS + 1):
        bundle = variant(base_bundle, tmp_path / f"v{i}", f"tiny-v{i}", extra_bytes=rng.choice([0, 3 << 20]))
        errors: list[BaseException] = []
        results: list[Any] = []

        def run(b: Path = bundle, errs: list[BaseException] = errors, res: list[Any] = results) -> None:
            try:
                res.append(dp.deploy(b, "local", retries=0))
            except (ToolkitError, OSError) as e:  # the daemon died under it
                errs.append(e)

        t = threading.Thread(target=run)
        delay = rng.uniform(0.0, window)
        t.start()
        time.sleep(delay)
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait(10)
        t.join(60)
        assert not t.is_alive(), f"round {i} (seed {SEED}): the host hung after the kill"
        daemon = serve(store)
        dp.add_device("local", f"unix://{daemon.socket}", replace=True)
        status = daemon.api().get("/v1/status")
        assert status["state"] == "ready", f"round {i} (seed {SEED}, kill at {delay:.3f} s): {status}"
        now = daemon.serving()  # a real request answered
        assert now in (serving, f"tiny-v{i}"), f"round {i}: serving {now}"
        assert json.loads((store / "active").read_text())["name"] == now
        check_store(store)
        if results:  # the deploy ended before the kill: its bundle must be the one serving
            assert results[0].install.ok and now == f"tiny-v{i}"
        outcomes["done" if results else ("new" if now != serving else "old")] += 1
        serving = now
    # kills land over the whole window: some interrupt the deploy (P(none) ~ 0.5^20)
    assert outcomes["old"] + outcomes["new"] > 0, outcomes


@pytest.mark.parametrize("value", ["no", 0, 1, "false", [], {}])
def test_remove_uploads_all_takes_only_true_or_false(bundles: dict[str, Path], tmp_path: Path,  # noqa: F811
                                                     value: Any) -> None:
    """`"all": "no"` read as bool("no"), True: every upload in progress was removed."""
    from device.serve.deploy import DeployService, pack, unpack

    service = DeployService(Store.open(tmp_path / "store"), lambda p: SmokeResult(True, "ok"))
    upload = stage(service.store, bundles["a"])
    reply, _ = unpack(service.handle_message(pack({"op": "remove_uploads", "all": value, "rid": 1})))
    assert reply["ok"] is False and reply["status"] == 400 and "'all'" in reply["error"]["message"]
    assert [u.upload_id for u in service.store.list_uploads()] == [upload]
    service.store.close()


@pytest.mark.parametrize("header", [
    b"[" * 5000 + b"]" * 5000,  # was a RecursionError: 500
    b'{"op": "remove_uploads", "older_than_s": NaN}',
    b'{"op": "remove_uploads", "older_than_s": ' + b"9" * 5000 + b"}",  # past Python's int digits
    b"not json",
    b'["op", "hello"]',
])
def test_a_serial_message_that_is_not_one_is_a_400(tmp_path: Path, header: bytes) -> None:
    """Bad bytes from the sender are the sender's 400, parsed as boundedly as an HTTP body."""
    from device.serve.deploy import ENVELOPE, DeployService, unpack

    service = DeployService(Store.open(tmp_path / "store"), lambda p: SmokeResult(True, "ok"))
    reply, _ = unpack(service.handle_message(ENVELOPE.pack(len(header)) + header))
    assert reply["ok"] is False and reply["status"] == 400, reply
    service.store.close()


def test_remove_uploads_refuses_ages_that_are_no_number_of_seconds(tmp_path: Path) -> None:
    from device.serve.deploy import DeployService
    from device.store.errors import StoreError

    service = DeployService(Store.open(tmp_path / "store"), lambda p: SmokeResult(True, "ok"))
    for older in (-1, float("inf"), float("nan"), True, "5"):
        with pytest.raises(StoreError, match="older_than_s"):
            service.remove_uploads({"older_than_s": older})
    assert service.remove_uploads({"older_than_s": 10**400}) == []  # was OverflowError: a 500
    service.store.close()
