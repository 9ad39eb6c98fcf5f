"""A real TensorRT engine from a tiny decoder bundle, checked against ONNX Runtime.

Needs TensorRT, pycuda and a CUDA GPU; skips cleanly otherwise (CI has none of them). The
bundle is the real pipeline's (tests/conftest.py tiny_bundle: a random tiny Llama through
StaticKVDecoder and torch.onnx.export, opset 17), for a Jetson target, so the engine is built
the way the daemon builds it: device.runtime.engine_gate.ensure_engine.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt")
if not hasattr(trt, "Builder"):  # tensorrt-stubs alone makes `import tensorrt` succeed
    pytest.skip("only tensorrt-stubs is installed, not TensorRT", allow_module_level=True)
cuda = pytest.importorskip("pycuda.driver")


def _has_gpu() -> bool:
    try:
        cuda.init()
        return cuda.Device.count() > 0
    except cuda.Error:
        return False


if not _has_gpu():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from bundle.errors import ToolkitError  # noqa: E402
from bundle.manifest import load_verified  # noqa: E402
from device.runtime.engine_gate import ensure_engine, prepare_engine  # noqa: E402
from device.runtime.engine_identity import EngineIdentity  # noqa: E402
from device.runtime.generate import generate  # noqa: E402
from device.runtime.ort_backend import OrtDecoderBackend  # noqa: E402
from device.runtime.trt_backend import TrtDecoderBackend  # noqa: E402

TARGET = "jetson-orin-nano-8gb"


@pytest.fixture(scope="module")
def built(tiny_bundle, tmp_path_factory: pytest.TempPathFactory):
    """(bundle copy, manifest, engine status, timing cache dir), built once for the module."""
    bundle = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundle("llama", TARGET), bundle)
    manifest = load_verified(bundle)
    cache_dir = bundle.parent / "timing"
    status = ensure_engine(bundle, manifest, rebuild_on_mismatch=False, timing_cache_dir=cache_dir)
    return bundle, manifest, status, cache_dir


def backends(built, slots: int = 3, **kw):
    bundle, manifest, status, _ = built
    layout, vocab = manifest.kv_layout(), manifest.dims.vocab_size
    ort = OrtDecoderBackend(bundle / manifest.model_file, layout, vocab, slots=slots)
    return TrtDecoderBackend(status.plan, layout, vocab, slots=slots, **kw), ort


def close_enough(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    assert float(np.abs(got - want).max()) <= 1e-3 * scale  # fp32 engine, TF32 off


def both(trt_b, ort_b, ids: list[list[int]], pos: list[list[int]], slots: list[int],
         index: list[int] | None = None) -> None:
    i, p = np.array(ids, np.int64), np.array(pos, np.int64)
    k = None if index is None else np.array(index, np.int64)
    close_enough(trt_b.step(i, p, slots, k).copy(), ort_b.step(i, p, slots, k))


def test_engine_folder(built) -> None:
    bundle, manifest, status, cache_dir = built
    folder = status.plan.parent
    assert status.built and folder.parent == bundle / "engines"
    assert json.loads((folder / "layers.json").read_text())  # inspector output
    assert (folder / "build.log").is_file()
    ident = EngineIdentity.load(folder)
    assert ident.tensorrt_version == trt.__version__ and ident.precision == manifest.precision
    assert [p["name"] for p in ident.profiles] == ["prefill", "decode"]
    assert len(list(cache_dir.glob(f"{TARGET}_trt*.cache"))) == 1
    assert load_verified(bundle)  # engines/ is device-local: the bundle still verifies


def test_gate_reuses_then_refuses_then_rebuilds(built) -> None:
    bundle, manifest, status, cache_dir = built
    again = ensure_engine(bundle, manifest, rebuild_on_mismatch=False, timing_cache_dir=cache_dir)
    assert not again.built and again.plan == status.plan
    ident = EngineIdentity.load(status.plan.parent)
    ident.tensorrt_version = "10.0.0.0"
    ident.save(status.plan.parent)
    with pytest.raises(ToolkitError, match="engine built with TensorRT 10.0.0.0"):
        prepare_engine(bundle, manifest, rebuild_on_mismatch=False, timing_cache_dir=cache_dir)
    said: list[str] = []
    rebuilt = ensure_engine(bundle, manifest, rebuild_on_mismatch=True, progress=said.append,
                            timing_cache_dir=cache_dir)
    assert rebuilt.built and any("reusing timing cache" in s for s in said)


def test_logits_match_onnxruntime_prefill_and_decode(built) -> None:
    trt_b, ort_b = backends(built, slots=3)
    try:
        both(trt_b, ort_b, [[5, 9, 11, 13, 17, 19, 23]], [list(range(7))], [0])
        both(trt_b, ort_b, [[6, 7, 8, 9, 10]], [list(range(5))], [2], [4])  # last token only
        both(trt_b, ort_b, [[30, 31, 32]], [list(range(3))], [1])
        both(trt_b, ort_b, [[40], [41], [42]], [[7], [3], [5]], [0, 1, 2])  # in place, from 0
        both(trt_b, ort_b, [[43], [44]], [[6], [8]], [2, 0])  # unsorted, gap: staging gather
        both(trt_b, ort_b, [[45], [46]], [[4], [7]], [1, 2])  # in place at slot 1's row
        both(trt_b, ort_b, [[47]], [[8]], [2])
        both(trt_b, ort_b, [[1, 2, 3], [4, 5, 6]], [[9, 10, 11], [5, 6, 7]], [0, 1], [2, 0])
        assert trt_b.last_step_ms is not None and trt_b.last_step_ms > 0
    finally:
        trt_b.close()


def test_chunked_prefill_matches(built) -> None:
    trt_b, ort_b = backends(built, slots=1, max_prefill_tokens=4)
    try:
        assert trt_b.max_prefill == 4
        both(trt_b, ort_b, [list(range(3, 14))], [list(range(11))], [0])  # 4 + 4 + 3 tokens
        both(trt_b, ort_b, [[20]], [[11]], [0])
        both(trt_b, ort_b, [list(range(3, 13))], [list(range(12, 22))], [0], [9, 2])  # 2 chunks
        both(trt_b, ort_b, [list(range(3, 13))], [list(range(22, 32))], [0], [9])  # 1 of 3
    finally:
        trt_b.close()


def test_greedy_tokens_match(built) -> None:
    trt_b, ort_b = backends(built, slots=1)
    try:
        prompt = [1, 10, 20, 30, 40]
        assert list(generate(trt_b, prompt, 20)) == list(generate(ort_b, prompt, 20))
    finally:
        trt_b.close()


def test_reporting_and_close(built) -> None:
    _, manifest, _, _ = built
    trt_b, _ = backends(built, slots=2)
    assert trt_b.kv_cache_bytes() == manifest.kv_layout().bytes_for(2)
    mem = trt_b.memory()
    assert mem["gpu_total_bytes"] and mem["gpu_free_bytes"] and mem["kv_cache_bytes"]
    assert trt_b.describe()["tensorrt"] == trt.__version__
    trt_b.close()
    trt_b.close()  # idempotent
    with pytest.raises(ToolkitError, match="closed"):
        trt_b.step(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), [0])


def test_too_many_slots_is_refused(built) -> None:
    _, manifest, _, _ = built
    with pytest.raises(ToolkitError, match="at most"):
        backends(built, slots=manifest.batch + 1)
