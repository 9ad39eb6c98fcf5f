"""TensorRT build, engine identity, gate and backend arithmetic: everything that needs no GPU.

The GPU half (a real engine against ONNX Runtime) is tests/device/runtime/test_trt_gpu.py.
"""

from __future__ import annotations

import ast
import dataclasses
import gc
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import fake_pycuda
import numpy as np
import pytest
from click.testing import CliRunner
from paths import REPO, TOOLS

import targets
from bundle.contract import DECODER_CONTRACT, ENCODER_CONTRACT, KVCacheLayout
from bundle.errors import ToolkitError
from bundle.manifest import Architecture, Contract, Manifest, ModelDims, Source, read_manifest
from bundle.staging import finalize, staged_bundle
from device.runtime import engine_gate, trt_backend
from device.runtime.engine_gate import can_build_here, ensure_engine, prepare_engine
from device.runtime.engine_identity import (
    DeviceIdentity,
    EngineIdentity,
    compare,
    detect_device,
    engine_key,
    l4t_to_jetpack,
    parse_nv_tegra_release,
    timing_cache_key,
)
from device.runtime.kvcache import StaticKVCache
from device.runtime.trt_backend import (
    BufferPlan,
    bind_in_place,
    check_step,
    select_profile,
    slice_copies,
    sort_order,
)
from device.runtime.trt_build import (
    DECODE,
    PREFILL,
    LogSink,
    ProfileShapes,
    format_parser_error,
    input_shape_range,
    precision_plan,
    profile_shapes,
)
from targets import load_target

ROOT = REPO
ORIN = "jetson-orin-nano-8gb"

# Real /etc/nv_tegra_release contents (first line as L4T writes it; R36+ adds KERNEL_VARIANT).
NV_TEGRA = {
    "35.4.1": ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
               "DATE: Tue Aug  1 19:57:35 UTC 2023\n"
               "TARGET_USERSPACE_LIB_DIR=nvidia\n"
               "TARGET_USERSPACE_LIB_DIR_PATH=usr/lib/aarch64-linux-gnu/nvidia\n"),
    "36.4.3": ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, "
               "DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n"
               "TARGET_USERSPACE_LIB_DIR=nvidia\n"),
    "38.2.0": ("# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, "
               "DATE: Fri Aug 22 00:55:42 UTC 2025\n# KERNEL_VARIANT: oot\n"),
    "39.2.0": ("# R39 (release), REVISION: 2.0, GCID: 43071295, BOARD: generic, EABI: aarch64, "
               "DATE: Thu Mar 12 10:21:04 UTC 2026\n# KERNEL_VARIANT: oot\n"),
}

ORIN_DEVICE = DeviceIdentity("10.3.0.30", "Orin", "8.7", "6.2", "36.4.3")


# --- fixtures ----------------------------------------------------------------------------------
def write_bundle(out: Path, target: str = ORIN, runtime: str = "tensorrt",
                 contract: str = DECODER_CONTRACT, kind: str = "decoder",
                 precision: str = "fp16", max_seq: int = 64, batch: int = 2) -> Path:
    """A bundle folder with a real manifest (hashes and all) around a placeholder graph."""
    dims = ModelDims("llama", num_layers=2, hidden=16, heads=2, kv_heads=2, head_dim=8,
                     intermediate=32, vocab_size=32, max_positions=max_seq, norm_eps=1e-5,
                     tie_embeddings=True)
    record = load_target(target).record()
    manifest = Manifest(kind=kind, source=Source("hf", "tiny", "tiny"),  # type: ignore[arg-type]
                        architecture=Architecture("llama", "llama", dims),
                        contract=Contract(contract, 17,  # type: ignore[arg-type]
                                          "host-writes-new" if kind == "decoder" else None,
                                          "float32" if kind == "decoder" else None),
                        precision=precision,
                        target=dataclasses.replace(record, runtime=runtime),  # type: ignore[arg-type]
                        max_seq=max_seq, batch=batch)
    with staged_bundle(out) as staging:
        (staging / "model.onnx").write_bytes(b"placeholder graph: only hashed in these tests")
        finalize(staging, manifest)
    return out


def identity_for(bundle: Path, device: DeviceIdentity = ORIN_DEVICE, **changes: object
                 ) -> EngineIdentity:
    m = read_manifest(bundle)
    ident = EngineIdentity(device.tensorrt_version or "", device.gpu_name or "",
                           device.compute_capability or "", device.jetpack, device.l4t,
                           m.precision, [p.to_json() for p in profile_shapes(m.max_seq, m.batch)],
                           m.files["model.onnx"].sha256)
    return dataclasses.replace(ident, **changes)


def plant_engine(bundle: Path, identity: EngineIdentity, device: DeviceIdentity = ORIN_DEVICE
                 ) -> Path:
    d = bundle / "engines" / engine_key(device.gpu_name or "", device.compute_capability or "")
    d.mkdir(parents=True)
    (d / "engine.plan").write_bytes(b"plan")
    identity.save(d)
    return d / "engine.plan"


# --- profiles, precision, workspace --------------------------------------------------------
def test_profile_shapes_from_bundle_and_target(tmp_path: Path) -> None:
    m = read_manifest(write_bundle(tmp_path / "b", max_seq=2048, batch=4))
    prefill, decode = profile_shapes(m.max_seq, m.batch)
    assert (PREFILL, DECODE) == (0, 1)
    assert prefill == ProfileShapes("prefill", (1, 1, 1), (1, 128, 2047), (1, 1, 2047))
    assert decode == ProfileShapes("decode", (1, 4, 4), (1, 1, 1), (1, 1, 1))
    assert profile_shapes(64, 1)[0].seq == (1, 63, 63)  # opt never exceeds max
    for bad in ((1, 1), (64, 0)):
        with pytest.raises(ToolkitError):
            profile_shapes(*bad)


def test_input_shape_ranges_keep_the_cache_static() -> None:
    prefill, decode = profile_shapes(64, 3)
    assert input_shape_range("input_ids", (-1, -1), prefill) == ((1, 1), (1, 63), (1, 63))
    assert input_shape_range("position_ids", (-1, -1), decode) == ((1, 1), (3, 1), (3, 1))
    assert input_shape_range("logits_index", (-1,), prefill) == ((1,), (1,), (63,))
    assert input_shape_range("logits_index", (-1,), decode) == ((1,), (1,), (1,))
    assert input_shape_range("past_key.0", (-1, 2, 64, 8), decode) == (
        (1, 2, 64, 8), (3, 2, 64, 8), (3, 2, 64, 8))
    with pytest.raises(ToolkitError, match="only batch dynamic"):
        input_shape_range("past_value.1", (-1, 2, -1, 8), prefill)
    with pytest.raises(ToolkitError, match="not part of the static-kv-v1"):
        input_shape_range("attention_mask", (-1, -1), prefill)


def test_precision_to_builder_flags() -> None:
    assert precision_plan("fp32").set_flags == ()
    assert precision_plan("fp32").clear_flags == ("TF32",)
    # quantize/ writes explicitly typed graphs (fp32 norm statistics inside fp16 ones), so every
    # reduced precision builds strongly typed and no precision flag may override the graph
    for p in ("fp16", "int8", "int4", "fp8"):
        plan = precision_plan(p)
        assert plan.strongly_typed and plan.set_flags == (), p
    assert not precision_plan("fp32").strongly_typed
    for p in ("fp32", "fp16", "int8", "int4"):
        after_11 = precision_plan(p, precision_flags=False)  # TensorRT 11: no precision flags
        assert after_11.strongly_typed and after_11.set_flags == ()
    with pytest.raises(ToolkitError, match="bf16"):
        precision_plan("bf16")


def test_fp8_needs_compute_capability_8_9() -> None:
    from device.runtime.trt_build import check_precision_hardware

    with pytest.raises(ToolkitError, match="8.9"):
        check_precision_hardware("fp8", "8.7")
    check_precision_hardware("fp8", "11.0")
    check_precision_hardware("fp16", "8.7")


def test_workspace_is_a_quarter_of_the_memory_left_after_the_os() -> None:
    orin = load_target(ORIN)
    usable = orin.memory_total_bytes() - orin.os_reserve_bytes()
    assert orin.workspace_bytes() == int(usable * 0.25)
    assert 1.5 * (1 << 30) < orin.workspace_bytes() < 1.7 * (1 << 30)  # (8 - 1.6) GiB / 4
    assert load_target("cpu").workspace_bytes() is None
    tight = dataclasses.replace(orin, memory_gb=1.0, os_reserve_gb=0.9)
    assert tight.workspace_bytes() == targets.MIN_WORKSPACE


def test_parser_errors_are_one_line_each() -> None:
    class Err:
        def __init__(self, node: int, full: bool) -> None:
            self._node = node
            if full:
                self.node_name = lambda: "/model/layers.0/attn/MatMul"
                self.node_operator = lambda: "MatMul"

        def node(self) -> int:
            return self._node

        def desc(self) -> str:
            return "unsupported data type"

        def code(self) -> str:
            return "ErrorCode.UNSUPPORTED_NODE"

    assert format_parser_error(Err(7, True)) == (
        "node 7 '/model/layers.0/attn/MatMul' (MatMul): unsupported data type "
        "[ErrorCode.UNSUPPORTED_NODE]")
    assert format_parser_error(Err(7, False)).startswith("node 7: unsupported")  # TRT < node_name
    assert format_parser_error(Err(-1, False)).startswith("model: ")


def test_build_log_sink(tmp_path: Path) -> None:
    sink = LogSink(tmp_path / "build.log")
    sink.write(4, "verbose detail")
    sink.write(3, "info line")
    sink.write(1, "out of memory")
    sink.close()
    text = (tmp_path / "build.log").read_text()
    assert "[I] info line" in text and "[E] out of memory" in text and "verbose" not in text
    assert sink.tail() == "out of memory"


# --- backend arithmetic --------------------------------------------------------------------
def apply_copies(copies: list, src: bytes, dst: bytearray) -> None:
    """What cuMemcpy2D does, on host bytes: `height` rows of `width` from src to dst."""
    for c in copies:
        for r in range(c.height):
            s = c.src_offset + r * c.src_pitch
            d = c.dst_offset + r * c.dst_pitch + c.dst_x_in_bytes
            dst[d:d + c.width_in_bytes] = src[s:s + c.width_in_bytes]


@pytest.mark.parametrize("slots_ids,starts,T", [
    ([2], [5], 1), ([0, 2, 3], [4, 9, 0], 1), ([1, 2], [7, 7], 1), ([3], [2], 6), ([0], [0], 16),
])
def test_memcpy2d_parameters_write_what_the_cpu_cache_writes(slots_ids: list[int],
                                                              starts: list[int], T: int) -> None:
    layout, n_slots = KVCacheLayout(1, 3, 16, 4, "float32"), 4
    rng = np.random.default_rng(0)
    reference = StaticKVCache(layout, n_slots)  # the ONNX Runtime backend's host cache
    reference.buffers[0][:] = rng.standard_normal(reference.buffers[0].shape)
    device = bytearray(reference.buffers[0].tobytes())
    new = rng.standard_normal((len(slots_ids), 3, T, 4)).astype(np.float32)
    copies = slice_copies(slots_ids, starts, T, 3, 16, 4, 4)
    apply_copies(copies, new.tobytes(), device)
    reference.write(slots_ids, starts, [new])
    got = np.frombuffer(bytes(device), np.float32).reshape(reference.buffers[0].shape)
    np.testing.assert_array_equal(got, reference.buffers[0])


def test_memcpy2d_parameters_by_value() -> None:
    # one row: height = Hkv, width = T*D*elt, dst pitch = S*D*elt, dst x = pos*D*elt
    (c,) = slice_copies([2], [5], 1, kv_heads=3, max_seq=16, head_dim=4, itemsize=2)
    assert (c.height, c.width_in_bytes, c.src_pitch, c.dst_pitch, c.dst_x_in_bytes) == (
        3, 8, 8, 128, 40)
    assert (c.src_offset, c.dst_offset) == (0, 2 * 3 * 128)
    merged = slice_copies([1, 2], [7, 7], 1, 3, 16, 4, 2)  # consecutive slots, same position
    assert len(merged) == 1 and merged[0].height == 6
    assert len(slice_copies([1, 2], [7, 8], 1, 3, 16, 4, 2)) == 2
    with pytest.raises(ToolkitError, match="do not fit"):
        slice_copies([0], [14], 3, 3, 16, 4, 2)


def test_profile_choice_binding_and_order() -> None:
    assert select_profile(1, 7) == PREFILL and select_profile(4, 1) == DECODE
    assert select_profile(1, 1) == DECODE
    assert bind_in_place([1, 2, 3], 1024) == 1
    assert bind_in_place([0, 2], 1024) is None  # gap: gathered into staging
    assert bind_in_place([1, 2], 100) is None and bind_in_place([0, 1], 100) == 0  # alignment
    assert sort_order([0, 1, 2]) is None
    assert sort_order([3, 0, 2]) == [1, 2, 0]


def test_buffer_sizes() -> None:
    layout = KVCacheLayout(30, 3, 2048, 64, "float16")
    plan = BufferPlan(30, 3, 2048, 64, slots=4, vocab=49152, max_tokens=256, kv_itemsize=2)
    assert plan.kv_cache_bytes == layout.bytes_for(4)  # the contract's own arithmetic
    assert plan.row_bytes == 3 * 2048 * 64 * 2
    assert plan.staging_bytes == 2 * 30 * 3 * plan.row_bytes  # slots - 1 rows
    assert plan.logits_bytes == 256 * 49152 * 4
    assert plan.new_kv_bytes == 256 * 3 * 64 * 2
    one = dataclasses.replace(plan, slots=1)
    assert one.staging_bytes == 0
    assert plan.device_bytes == (plan.kv_cache_bytes + plan.staging_bytes + 3 * 256 * 8
                                 + plan.logits_bytes + 60 * plan.new_kv_bytes)


def test_check_step_rejects_what_would_corrupt_the_cache() -> None:
    ids, pos, first = np.zeros((2, 1), np.int64), np.array([[3], [5]]), np.zeros(1, np.int64)
    check_step(ids, pos, [0, 1], first, slots=2, max_seq=8)
    for slots, p, n in (([0, 0], pos, 2), ([0, 2], pos, 2), ([0, 1], np.array([[3], [8]]), 2)):
        with pytest.raises(ToolkitError):
            check_step(ids, p, slots, first, slots=n, max_seq=8)
    with pytest.raises(ToolkitError, match="disagree"):
        check_step(ids, np.zeros((2, 2), np.int64), [0, 1], first, slots=2, max_seq=8)
    for bad in (np.array([1]), np.array([], np.int64), np.array([[0]])):
        with pytest.raises(ToolkitError, match="logits_index"):
            check_step(ids, pos, [0, 1], bad, slots=2, max_seq=8)


def test_mem_available(tmp_path: Path) -> None:
    from device.runtime.procmem import mem_available

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        7844000 kB\nMemFree:          512000 kB\n"
                       "MemAvailable:    4000000 kB\n")
    assert mem_available(meminfo) == 4_000_000 * 1024
    assert mem_available(tmp_path / "missing") is None


def test_peak_rss_of_this_and_another_process() -> None:
    """VmHWM of this process (what the benches' children report) and of a child by pid (the
    daemon rows); 0 for a pid that does not exist."""
    import os
    import subprocess
    import sys

    from device.runtime.procmem import peak_rss, process_rss

    rss, hwm = process_rss()
    assert 0 < rss <= hwm <= peak_rss() == peak_rss(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import sys; print(1, flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline()  # exec'd: its own memory map
        assert 0 < peak_rss(child.pid) < peak_rss()  # a bare interpreter, not this test run
    finally:
        child.communicate(b"")
    assert peak_rss(2**22 + 1) == 0  # above Linux's pid_max ceiling: no such process


def engineless_backend_class() -> type:
    """tools/gpu_check.py's EnginelessBackend: the backend's own buffer, context and teardown
    code with the TensorRT engine left out (runs on tests/support/fake_pycuda.py)."""
    spec = importlib.util.spec_from_file_location("gpu_check", TOOLS / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EnginelessBackend  # type: ignore[no-any-return]


def test_close_destroys_the_stream_and_events_before_detaching(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pycuda destroys a Stream/Event in its own context, and after Context.detach() it cannot
    activate that context any more: the cleanup is skipped silently (pycuda cuda.hpp, ~stream /
    ~event with CUDAPP_CATCH_CLEANUP_ON_DEAD_CONTEXT). close() must drop them before detach, or
    every backend closed (each model swap) leaks a CUDA stream and two events."""
    drv: types.ModuleType = fake_pycuda.install(monkeypatch)
    layout = KVCacheLayout(num_layers=2, kv_heads=2, max_seq=16, head_dim=4, dtype="float32")
    b = engineless_backend_class()(tmp_path / "none.plan", layout, 8, slots=2)
    assert sorted(drv.memory.live.values()) == ["event", "event", "stream"]
    b.close()
    del b
    gc.collect()
    assert drv.memory.live == {}
    assert drv.memory.blocks == {}


def test_a_refused_profile_switch_is_a_toolkit_error() -> None:
    """IExecutionContext.set_optimization_profile_async raises RuntimeError ("Error in set
    optimization profile async.") where the C++ call returns false - the Python binding never
    returns False (python/src/infer/pyCore.cpp, PY_ASSERT_RUNTIME_ERROR, v10.3.0 and v10.13.0).
    The backend reports it like its other TensorRT failures, and keeps the profile it had."""

    class Context:
        def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
            raise RuntimeError("Error in set optimization profile async.")

    b = object.__new__(trt_backend.TrtDecoderBackend)
    b._context = Context()  # type: ignore[assignment]
    b._stream = types.SimpleNamespace(handle=1)  # type: ignore[assignment]
    b._profile = PREFILL
    b._select_profile(PREFILL)  # no switch, no call
    with pytest.raises(ToolkitError, match="set_optimization_profile_async"):
        b._select_profile(DECODE)
    assert b._profile == PREFILL


class EngineIO:
    """The I/O half of a tensorrt.ICudaEngine as _check_engine reads it, for a static-kv-v1
    engine of `layout`: names, numpy dtypes (with trt_backend._np_dtype as the identity), shapes
    (-1 dynamic) and the two profiles; `dtypes` / `shapes` override single tensors."""

    def __init__(self, layout: KVCacheLayout, vocab: int, slots: int = 4,
                 dtypes: dict[str, str] | None = None,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        from bundle.contract import new_names, past_names

        L = layout
        self.dtypes = {n: "int64" for n in ("input_ids", "position_ids", "logits_index")}
        self.shapes: dict[str, tuple[int, ...]] = {n: (-1, -1) for n in ("input_ids", "position_ids")}
        self.shapes.update(logits_index=(-1,), logits=(-1, -1, vocab))
        self.dtypes["logits"] = "float32"
        for n in past_names(L.num_layers):
            self.dtypes[n], self.shapes[n] = L.dtype, (-1, L.kv_heads, L.max_seq, L.head_dim)
        for n in new_names(L.num_layers):
            self.dtypes[n], self.shapes[n] = L.dtype, (-1, L.kv_heads, -1, L.head_dim)
        self.dtypes.update(dtypes or {})
        self.shapes.update(shapes or {})
        self.names = list(self.dtypes)
        self.num_io_tensors, self.num_optimization_profiles, self.slots = len(self.names), 2, slots

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_dtype(self, name: str) -> str:
        return self.dtypes[name]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[tuple[int, int], ...]:
        return ((1, 1), (1, 1), (self.slots, 1)) if profile == DECODE else ((1, 1), (1, 64), (1, 64))


def checked(engine: EngineIO, layout: KVCacheLayout, vocab: int, monkeypatch: pytest.MonkeyPatch) -> object:
    monkeypatch.setattr(trt_backend, "_np_dtype", np.dtype)
    b = object.__new__(trt_backend.TrtDecoderBackend)
    b._engine, b.layout, b.vocab_size, b.slots = engine, layout, vocab, 2  # type: ignore[assignment]
    b.plan_path = Path("engine.plan")
    b.past, b.new = trt_backend.past_names(layout.num_layers), trt_backend.new_names(layout.num_layers)
    return b._check_engine(None)


@pytest.mark.parametrize("dtypes, shapes, said", [
    ({}, {}, None),
    ({"input_ids": "int32"}, {}, "input_ids is int32, not int64"),  # int64 narrowed by a builder
    ({"past_value.2": "float32"}, {}, "past_value.2 is float32, not float16"),
    ({"new_key.1": "float32"}, {}, "new_key.1 is float32"),
    ({}, {"new_value.0": (-1, 2, -1, 16)}, "new_value.0 is [-1, 2, -1, 16]"),
    ({}, {"past_key.1": (-1, 2, 32, 8)}, "past_key.1 is [-1, 2, 32, 8], not [., 2, 64, 8]"),
])
def test_every_engine_io_tensor_is_checked_against_what_the_backend_binds(
        dtypes: dict[str, str], shapes: dict[str, tuple[int, ...]], said: str | None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first cache tensor's type and shape were checked: an engine whose ids were int32,
    or whose other layers' K/V differ, ran on buffers of the wrong size (bytes misread, or
    copies past a tensor's end on the board)."""
    layout = KVCacheLayout(num_layers=3, kv_heads=2, max_seq=64, head_dim=8, dtype="float16")
    engine = EngineIO(layout, 50, dtypes=dtypes, shapes=shapes)
    if said is None:
        assert checked(engine, layout, 50, monkeypatch).kv_itemsize == 2  # type: ignore[attr-defined]
        return
    with pytest.raises(ToolkitError, match="I/O differs from what this backend binds") as e:
        checked(engine, layout, 50, monkeypatch)
    assert said in str(e.value) and "toolkit compile" in (e.value.hint or "")


# --- identity --------------------------------------------------------------------------------
@pytest.mark.parametrize("version", sorted(NV_TEGRA))
def test_parse_nv_tegra_release(version: str) -> None:
    rel = parse_nv_tegra_release(NV_TEGRA[version])
    assert rel.version == version
    assert rel.eabi == "aarch64" and rel.gcid and rel.gcid.isdigit()
    assert rel.board in ("t186ref", "generic")
    assert rel.date and rel.date.endswith(("2023", "2025", "2026"))


def test_parse_nv_tegra_release_rejects_other_text() -> None:
    for text in ("", "Ubuntu 22.04.4 LTS\n", "# R36 (release)\n"):
        with pytest.raises(ToolkitError, match="L4T release"):
            parse_nv_tegra_release(text)


def test_l4t_to_jetpack() -> None:
    table = {"35.4.1": "5.1.2", "35.5.0": "5.1", "36.3.0": "6.0", "36.4.0": "6.1",
             "36.4.3": "6.2", "36.4.4": "6.2.1", "38.2": "7.0", "38.2.1": "7.0", "38.4.0": "7.1",
             "39.0.0": "7.2", "39.2.0": "7.2", "32.7.4": None}
    assert {k: l4t_to_jetpack(k) for k in table} == table


def test_detect_device_reads_nv_tegra_release(tmp_path: Path) -> None:
    release = tmp_path / "nv_tegra_release"
    release.write_text(NV_TEGRA["36.4.3"])
    dev = detect_device(release)
    assert (dev.l4t, dev.jetpack) == ("36.4.3", "6.2")
    none = detect_device(tmp_path / "absent")
    assert (none.l4t, none.jetpack) == (None, None)


def test_engine_identity_json_round_trip(tmp_path: Path) -> None:
    ident = identity_for(write_bundle(tmp_path / "b"))
    assert EngineIdentity.from_json(ident.to_json()) == ident
    ident.save(tmp_path)
    assert EngineIdentity.load(tmp_path) == ident
    (tmp_path / "engine.json").write_text("{\"tensorrt_version\": \"10.3\"}")
    with pytest.raises(ToolkitError, match="unreadable or incomplete"):
        EngineIdentity.load(tmp_path)


def test_compare_reports_every_difference(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    m = read_manifest(bundle)
    sha = m.files["model.onnx"].sha256
    profiles = [p.to_json() for p in profile_shapes(m.max_seq, m.batch)]
    ident = identity_for(bundle, tensorrt_version="10.3.0")
    device = dataclasses.replace(ORIN_DEVICE, tensorrt_version="10.3.0")
    assert compare(ident, device, sha, precision="fp16", profiles=profiles) == []

    def one(field: str, device: DeviceIdentity = device, sha: str = sha,
            precision: str = "fp16", profiles: list = profiles, **changes: object) -> str:
        found = compare(dataclasses.replace(ident, **changes), device, sha, precision=precision,
                        profiles=profiles)
        assert [m.field for m in found] == [field]
        return found[0].message

    assert one("tensorrt_version", dataclasses.replace(device, tensorrt_version="10.13.3")) == (
        "engine built with TensorRT 10.3.0, this device has 10.13.3: rebuild with "
        "`toolkit compile BUNDLE` on this device, or start the daemon with --rebuild-on-mismatch")
    assert "this device has no TensorRT" in one(
        "tensorrt_version", dataclasses.replace(device, tensorrt_version=None))
    assert "GPU 'Thor'" in one("gpu_name", gpu_name="Thor")
    assert "compute capability 11.0, this GPU is 8.7" in one("compute_capability",
                                                            compute_capability="11.0")
    assert "converted again" in one("source_onnx_sha256", sha="0" * 64)
    assert "built for fp16, the bundle is int8" in one("precision", precision="int8")
    assert "batch [1, 4, 4]" in one("profiles", profiles=[p.to_json()
                                                           for p in profile_shapes(64, 4)])
    for field, label in (("jetpack", "JetPack"), ("l4t", "L4T")):
        (note,) = compare(dataclasses.replace(ident, **{field: "x"}), device, sha)
        assert not note.blocking and f"built on {label} x" in note.message
    assert all("--rebuild-on-mismatch" in m.message
               for m in compare(ident, DeviceIdentity(), "f" * 64))


def test_engine_and_timing_cache_keys() -> None:
    assert engine_key("Orin", "8.7") == "sm87-orin"
    assert engine_key("NVIDIA Thor", "11.0") == "sm110-nvidia-thor"
    assert timing_cache_key(ORIN, "10.3.0.30", "8.7") == "jetson-orin-nano-8gb_trt10.3.0.30_sm87"
    assert timing_cache_key("jetson-thor", "10.13.3.9", None).endswith("_smunknown")
    keys = {timing_cache_key(t, v, c) for t in (ORIN, "jetson-thor") for v in ("10.3", "10.13")
            for c in ("8.7", "11.0")}
    assert len(keys) == 8  # one cache per (target, TensorRT version, GPU)


# --- can_build_here, the gate, toolkit compile -----------------------------------------------
def test_can_build_here_says_why_not() -> None:
    orin = load_target(ORIN)
    ok, why = can_build_here(load_target("cpu"))
    assert not ok and "no engine to build" in why
    ok, why = can_build_here(orin, DeviceIdentity())
    assert not ok and "TensorRT is not installed" in why
    ok, why = can_build_here(orin, DeviceIdentity(tensorrt_version="10.3.0.30"))
    assert not ok and "no CUDA GPU" in why
    h100 = DeviceIdentity("10.3.0.30", "NVIDIA H100 80GB HBM3", "9.0")
    ok, why = can_build_here(orin, h100)
    assert not ok and "compute capability 9.0" in why and "8.7" in why
    ok, why = can_build_here(orin, dataclasses.replace(ORIN_DEVICE, tensorrt_version="10.7.0"))
    assert not ok and "TensorRT 10.7.0" in why and "10.3" in why
    ok, why = can_build_here(orin, ORIN_DEVICE)
    assert ok and "matches" in why


def test_can_build_here_on_this_machine() -> None:
    if detect_device().tensorrt_version is not None:
        pytest.skip("TensorRT is installed here")
    ok, why = can_build_here(load_target(ORIN))
    assert not ok and "TensorRT is not installed" in why


def test_gate_without_tensorrt(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    with pytest.raises(ToolkitError, match="cannot import tensorrt"):
        prepare_engine(bundle, read_manifest(bundle), rebuild_on_mismatch=True,
                       device=DeviceIdentity())


def test_gate_uses_a_matching_engine(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    plan = plant_engine(bundle, identity_for(bundle, l4t="36.4.0", jetpack="6.1"))
    said: list[str] = []
    status = ensure_engine(bundle, read_manifest(bundle), rebuild_on_mismatch=False,
                           progress=said.append, device=ORIN_DEVICE)
    assert status.plan == plan and not status.built
    assert len(status.notes) == 2 and any("L4T 36.4.0" in s for s in said)


def test_gate_refuses_a_mismatched_engine(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b")
    plant_engine(bundle, identity_for(bundle, tensorrt_version="10.3.0", precision="int8"))
    with pytest.raises(ToolkitError) as e:
        prepare_engine(bundle, read_manifest(bundle), rebuild_on_mismatch=False,
                       device=ORIN_DEVICE)
    assert "TensorRT 10.3.0, this device has 10.3.0.30" in e.value.message
    assert "built for int8, the bundle is fp16" in e.value.message
    assert "--rebuild-on-mismatch" in (e.value.hint or "")


def fake_build(calls: list[Path]):  # stands in for trt_build.build_engine (needs a GPU)
    def build(onnx: Path, manifest: Manifest, out_dir: Path, **kw: object):
        calls.append(out_dir)
        assert not (out_dir / "engine.json").exists()  # the stale identity went first
        (out_dir / "engine.plan").write_bytes(b"new plan")
        ident = identity_for(onnx.parent)
        ident.save(out_dir)
        return type("R", (), {"plan": out_dir / "engine.plan", "identity": ident,
                              "seconds": 1.0})()
    return build


def test_gate_builds_when_missing_or_allowed(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(engine_gate, "build_engine", fake_build(calls))
    bundle = write_bundle(tmp_path / "b")
    m = read_manifest(bundle)
    status = ensure_engine(bundle, m, rebuild_on_mismatch=False, device=ORIN_DEVICE)
    assert status.built and calls == [bundle / "engines" / "sm87-orin"]
    assert not ensure_engine(bundle, m, rebuild_on_mismatch=False, device=ORIN_DEVICE).built
    ensure_engine(bundle, m, rebuild_on_mismatch=False, force=True, device=ORIN_DEVICE)
    identity_for(bundle, gpu_name="Orin", tensorrt_version="10.2").save(calls[0])
    status = ensure_engine(bundle, m, rebuild_on_mismatch=True, device=ORIN_DEVICE)
    assert status.built and len(calls) == 3
    (calls[0] / "engine.json").write_text("not json")  # damaged identity: rebuilt when allowed
    assert ensure_engine(bundle, m, rebuild_on_mismatch=True, device=ORIN_DEVICE).built


def compile_cli(bundle: Path, *args: str):
    from toolkit.commands.compile import compile

    return CliRunner().invoke(compile, [str(bundle), *args])


def test_toolkit_compile_cpu_bundle_has_nothing_to_compile(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", target="cpu", runtime="onnxruntime")
    result = compile_cli(bundle)
    assert result.exit_code == 0, result.output
    assert "nothing to compile" in result.output


def test_toolkit_compile_encoder_bundle_has_nothing_to_compile(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / "b", contract=ENCODER_CONTRACT, kind="encoder")
    result = compile_cli(bundle)
    assert result.exit_code == 0 and "nothing to compile" in result.output


def test_toolkit_compile_jetson_bundle_without_tensorrt(tmp_path: Path) -> None:
    if detect_device().tensorrt_version is not None:
        pytest.skip("TensorRT is installed here")
    bundle = write_bundle(tmp_path / "b")
    result = compile_cli(bundle)
    assert result.exit_code == 2, result.output
    assert "TensorRT is not installed here" in result.output
    assert "builds it on the jetson-orin-nano-8gb at first load" in result.output
    assert not (bundle / "engines").exists()


def test_toolkit_compile_refuses_a_damaged_bundle(tmp_path: Path) -> None:
    from convert.compile import compile_bundle

    bundle = write_bundle(tmp_path / "b")
    (bundle / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ToolkitError, match="failed verification"):
        compile_bundle(bundle)


def test_compile_bundle_builds_when_the_machine_matches(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from convert import compile as compile_mod

    calls: list[Path] = []
    monkeypatch.setattr(engine_gate, "build_engine", fake_build(calls))
    monkeypatch.setattr(engine_gate, "detect_device", lambda: ORIN_DEVICE)
    monkeypatch.setattr(compile_mod, "can_build_here", lambda t: (True, "matches"))
    bundle = write_bundle(tmp_path / "b")
    first = compile_mod.compile_bundle(bundle)
    assert (first.status, first.exit_code) == ("built", 0)
    assert compile_mod.compile_bundle(bundle).status == "present"
    assert compile_mod.compile_bundle(bundle, force=True).status == "built"


def test_compile_is_registered() -> None:
    from toolkit.cli import COMMANDS

    assert "toolkit.commands.compile:compile" in COMMANDS


# --- architecture and API hygiene ------------------------------------------------------------
TRT_MODULES = ["device/runtime/engine_identity.py", "device/runtime/trt_build.py",
               "device/runtime/trt_backend.py", "device/runtime/engine_gate.py"]


@pytest.mark.parametrize("path", TRT_MODULES)
def test_trt_modules_import_nothing_heavy_at_module_level(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n.split(".")[0] in ("tensorrt", "pycuda", "convert")}


def test_trt_modules_import_without_tensorrt() -> None:
    assert trt_backend.TrtDecoderBackend.kind == "tensorrt"


def test_api_checker_catches_removed_calls(tmp_path: Path) -> None:
    bad = tmp_path / "old_runtime.py"
    bad.write_text("import tensorrt as trt\n"
                   "ok = ctx.execute_async_v3(stream)  # execute_async_v2 in a comment is fine\n"
                   "ctx.execute_async_v2(bindings, stream)\n"
                   "engine = builder.build_engine(network, config)\n"
                   "shape = engine.get_binding_shape(0)\n"
                   "config.max_workspace_size = 1 << 30\n"
                   "n = engine.num_bindings\n"
                   "ctx.set_binding_shape(0, (1, 8))\n"
                   "x = engine.binding_is_input(0)\n"
                   "result = build_engine(onnx, manifest)\n"
                   "msg = 'call build_engine_with_config(...)'\n")
    run = subprocess.run([sys.executable, str(ROOT / "tools/check_trt_api.py"), str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 1
    lines = [line.split(": ")[0] for line in run.stdout.splitlines()]
    assert lines == [f"{bad}:{n}" for n in (3, 4, 5, 6, 7, 8, 9)]


def test_api_checker_passes_on_the_repo() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "tools/check_trt_api.py")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout
