"""The pycuda half of the TensorRT backend on a real NVIDIA GPU, in one call, without TensorRT.

    python tools/fetch_gpu_deps.py                # where there is network: -> tools/gpu_deps/
    python tools/gpu_check.py OUT [--deps DIR]    # on the GPU machine: -> OUT/gpu_check.json

The GPU machine has CUDA, nvcc, Python 3.12 with torch, onnxruntime and numpy, and no network and
no TensorRT. If pycuda is not importable, the script builds it there: a venv that sees the system's
packages (numpy, torch), the carried setuptools/wheel, then pycuda from its sdist against the CUDA
that nvcc belongs to (--no-index --no-build-isolation: nothing is fetched), and re-runs itself in
that venv. Then it runs, on device 0, everything of device/runtime/trt_backend.py that does not need
TensorRT, through the backend's own methods (EnginelessBackend below leaves only the engine out):

  context        cuda.init, the primary context retained, pushed and popped (as the backend does)
  allocate       TrtDecoderBackend._allocate: cache (zeroed), staging, new_*, I/O, pinned host,
                 stream, events; every address 256-byte aligned, the cache reads back as zeros
  kv_writes      TrtDecoderBackend._write_new (strided Memcpy2D per row) for fp32 and fp16 caches,
                 each scenario compared byte for byte with device/runtime/kvcache.py StaticKVCache;
                 _cache_pointers: a slot run binds in place, any other selection is gathered
                 into staging, compared with StaticKVCache.rows
  kv_blocks      read_kv / write_kv (the prefix cache's device-to-device block copies) for fp32
                 and fp16, compared with StaticKVCache.read_block / write_block; release frees
  events         CUDA events around a device-to-device copy: time_till and the copy bandwidth
  mem_get_info   TrtDecoderBackend.memory(), and torch.cuda.mem_get_info for comparison
  memory_report  device/runtime/bench.py gpu_reader + MemorySampler: the GPU half of the report
  close          TrtDecoderBackend.close frees everything; memory() then reads no GPU
  tegrastats     recorded as absent off a Jetson (it runs only on one)

Every check is recorded, failed or not (its error's last lines included), with the environment
and the build's log tail, in one JSON file (schema gpu-check-v1). Exit 0 when every check passed.
tests/tools/test_gpu_check.py runs the same checks in CI against a simulated driver
(tests/support/fake_pycuda.py) and, where pycuda and a GPU exist, against the real one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bundle.contract import KVCacheLayout  # noqa: E402
from device.runtime.kvcache import StaticKVCache  # noqa: E402
from device.runtime.trt_backend import (  # noqa: E402
    ALIGN,
    DEFAULT_PREFILL_CHUNK,
    BufferPlan,
    TrtDecoderBackend,
)
from device.runtime.trt_build import PREFILL  # noqa: E402

SCHEMA = "gpu-check-v1"
RESULT = "gpu_check.json"
DEFAULT_DEPS = Path(__file__).parent / "gpu_deps"
SLOTS = 4
# (num_layers, kv_heads, max_seq, head_dim): one cache row [Hkv, S, D] is a multiple of 256 bytes
# in both dtypes, so a run of slots binds in place as on the board
LAYOUT = (2, 3, 64, 16)
# (slot ids, start positions, new tokens T): decode rows apart and adjacent (merged into one
# copy), a prefill, a full-width write, every slot at its own position including the last one
SCENARIOS: tuple[tuple[tuple[int, ...], tuple[int, ...], int], ...] = (
    ((2,), (5,), 1), ((0, 2, 3), (4, 9, 0), 1), ((1, 2), (7, 7), 1), ((3,), (2,), 6),
    ((0,), (0,), 16), ((0, 1, 2, 3), (63, 10, 0, 5), 1))
GATHER = (3, 1)  # not a run: gathered into staging
RUN = (1, 2)  # a run: bound in place at slot 1's row
COPY_BYTES = 256 << 20  # the event-timed device-to-device copy
# (slot, lo, hi) read as a block, then written to (slot, lo): a block moved to another slot and
# position, one at position 0, one ending at the last position
BLOCK_MOVES = (((1, 5, 13), (2, 40)), ((3, 0, 32), (0, 32)), ((2, 48, 64), (3, 0)))


class CheckError(Exception):
    """What stops the script before any check runs (no deps, no nvcc): one line and a hint."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(f"{message}\n  hint: {hint}")


# --- build phase -------------------------------------------------------------------------------
def find_cuda_root(path: str | None = None, run: Callable[..., Any] = subprocess.run) -> Path:
    """The CUDA installation nvcc belongs to. nvcc may be a wrapper script elsewhere (this
    project's CI has /usr/local/bin/nvcc -> exec /usr/local/cuda-13.0/bin/nvcc), so ask nvcc:
    its -dryrun prints TOP=<root>; the folder above nvcc's is the fallback (pycuda's guess)."""
    nvcc = shutil.which("nvcc", path=path)
    if nvcc is None:
        raise CheckError("nvcc is not on PATH", hint="add CUDA's bin folder (e.g. /usr/local/cuda/bin) "
                                                      "to PATH: pycuda compiles against it")
    try:
        p = run([nvcc, "-dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(nvcc).resolve().parent.parent


def find_sdist(deps: Path) -> Path:
    found = sorted(deps.glob("pycuda-*.tar.gz"))
    if not found:
        raise CheckError(f"no pycuda sdist in {deps}",
                         hint="run `python tools/fetch_gpu_deps.py` where there is network and carry "
                              "tools/gpu_deps/ beside this script")
    return found[-1]


def libcuda_dirs(work: Path, ldconfig: str | None = None) -> list[str]:
    """Where the linker finds the driver's libcuda.so. A driver install may have only
    libcuda.so.1 (the loader's name): then a folder under `work` gets a libcuda.so link to it."""
    if ldconfig is None:
        ldconfig = _cmd(["ldconfig", "-p"]) or ""
    found = [line.rsplit("=>", 1)[1].strip() for line in ldconfig.splitlines()
             if "=>" in line and line.strip().startswith("libcuda.so")]
    if plain := [f for f in found if f.endswith("libcuda.so")]:
        return [str(Path(plain[0]).parent)]
    if versioned := [f for f in found if f.endswith("libcuda.so.1")]:
        link_dir = work / "libcuda"
        link_dir.mkdir(parents=True, exist_ok=True)
        link = link_dir / "libcuda.so"
        if not link.exists():
            link.symlink_to(versioned[0])
        return [str(link_dir)]
    return []


def siteconf(cuda_root: Path, extra_lib_dirs: Sequence[str]) -> str:
    """pycuda's build configuration (aksetup reads siteconf.py beside setup.py; the environment
    does not set CUDA_ROOT, nvcc's folder does): CUDA's headers and libraries, the driver's
    libcuda, and CURAND only where the toolkit has it (pycuda.curandom is not used here)."""
    lib_dirs = [str(cuda_root / "lib64"), str(cuda_root / "lib64" / "stubs"), *extra_lib_dirs]
    curand = any((Path(d) / "libcurand.so").exists() for d in lib_dirs)
    return "\n".join([f"CUDA_ROOT = {str(cuda_root)!r}",
                      f"CUDA_INC_DIR = {[str(cuda_root / 'include')]!r}",
                      *(f"{name}_LIB_DIR = {lib_dirs!r}" for name in ("CUDADRV", "CUDART", "CURAND")),
                      f"CUDA_ENABLE_CURAND = {curand!r}", ""])


def unpack_sdist(sdist: Path, work: Path, conf: str) -> Path:
    """The sdist unpacked under `work`, with siteconf.py written beside its setup.py."""
    import tarfile

    dest = work / "src"
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    (src,) = [p for p in dest.iterdir() if (p / "setup.py").is_file()]
    (src / "siteconf.py").write_text(conf, encoding="utf-8")
    return src


def build_commands(python: str, venv: Path, deps: Path, source: Path) -> list[list[str]]:
    """venv (seeing the system's numpy and torch) -> setuptools, wheel -> pycuda's pure
    dependencies -> pycuda from its unpacked sdist, all from `deps` only."""
    vpy = str(venv / "bin" / "python")
    local = ["-m", "pip", "install", "--no-index", "--find-links", str(deps), "--no-deps"]
    return [[python, "-m", "venv", "--system-site-packages", str(venv)],
            [vpy, *local, "setuptools", "wheel"],
            [vpy, *local, "pytools", "platformdirs", "typing_extensions"],
            [vpy, *local, "--no-build-isolation", str(source)]]


def see_outer_venv(venv: Path, prefix: str = sys.prefix, base_prefix: str = sys.base_prefix,
                   outer: Sequence[str] | None = None) -> Path | None:
    """Where this interpreter is itself a venv (the H200 machine's python3 is
    /opt/torch/.venv/bin/python3, its numpy and torch in that venv), a venv made from it with
    --system-site-packages sees the *base* interpreter's packages, not this venv's: pycuda's
    setup.py then finds no numpy. A .pth file in the new venv lists this interpreter's
    site-packages (after the new venv's own, so pycuda installs and imports from there)."""
    own = sorted(venv.glob("lib/python*/site-packages"))
    if prefix == base_prefix or not own:
        return None
    import site

    dirs = list(outer if outer is not None else site.getsitepackages())
    pth = own[0] / "outer_venv.pth"
    pth.write_text("".join(f"{d}\n" for d in dirs), encoding="utf-8")
    return pth


def build_pycuda(work: Path, deps: Path, run: Callable[..., Any] = subprocess.run) -> dict[str, Any]:
    """Run build_commands; the record keeps each command's exit code, seconds and output tail."""
    cuda_root = find_cuda_root(run=run)
    conf = siteconf(cuda_root, libcuda_dirs(work))
    source = unpack_sdist(find_sdist(deps), work, conf)
    steps: list[dict[str, Any]] = []

    def step(cmd: list[str]) -> int:
        t0 = time.perf_counter()
        p = run(cmd, capture_output=True, text=True)
        steps.append({"command": " ".join(cmd), "rc": p.returncode,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "tail": (p.stdout + p.stderr)[-2000:]})
        return int(p.returncode)

    venv_cmd, *installs = build_commands(sys.executable, work / "venv", deps, source)
    # a Python without ensurepip (Debian's, without python3-venv) makes venvs only without pip;
    # the system's pip, seen through --system-site-packages, then installs into the venv
    rc = step(venv_cmd) and step([*venv_cmd[:-1], "--without-pip", venv_cmd[-1]])
    if rc == 0:
        see_outer_venv(work / "venv")
    for cmd in installs:
        if rc:
            break
        rc = step(cmd)
    ok = rc == 0
    return {"cuda_root": str(cuda_root), "siteconf": conf, "ok": ok, "steps": steps,
            "python": str(work / "venv" / "bin" / "python") if ok else None}


# --- the backend without its engine ------------------------------------------------------------
class EnginelessBackend(TrtDecoderBackend):
    """TrtDecoderBackend with the TensorRT engine left out: no plan is loaded and the buffer plan
    comes from the layout (fp32 logits) instead of the engine's tensors. Everything else -
    context, allocation, the Memcpy2D writes, the staging gather, memory(), close() - is the
    backend's own code."""

    def _load_engine(self) -> None:
        self.trt_version = "none (the engine is left out)"
        self._profile = PREFILL

    def _check_engine(self, max_prefill_tokens: int | None) -> BufferPlan:
        L = self.layout
        self._logits_dtype = np.dtype(np.float32)
        self.max_prefill = max_prefill_tokens or DEFAULT_PREFILL_CHUNK
        return BufferPlan(L.num_layers, L.kv_heads, L.max_seq, L.head_dim, self.slots,
                          self.vocab_size, max(self.max_prefill, self.slots),
                          np.dtype(L.dtype).itemsize, 4)


# --- the checks --------------------------------------------------------------------------------
def first_mismatch(got: bytes, want: bytes) -> int | None:
    """Byte offset of the first difference (the shorter length when only sizes differ)."""
    if got == want:
        return None
    a, b = np.frombuffer(got, np.uint8), np.frombuffer(want, np.uint8)
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def read_device(cuda: ModuleType, ptr: int, like: np.ndarray) -> bytes:
    host = np.empty_like(like)
    cuda.memcpy_dtoh(host, ptr)
    return host.tobytes()


def check_context(cuda: ModuleType) -> dict[str, Any]:
    cuda.init()
    dev = cuda.Device(0)
    ctx = dev.retain_primary_context()
    ctx.push()
    try:
        free, total = cuda.mem_get_info()
    finally:
        cuda.Context.pop()
        ctx.detach()
    return {"devices": cuda.Device.count(), "name": dev.name(),
            "compute_capability": ".".join(str(x) for x in dev.compute_capability()),
            "driver_version": cuda.get_driver_version(), "free_bytes": free, "total_bytes": total,
            "ok": total > 0 and 0 < free <= total}


def check_allocate(cuda: ModuleType, b: EnginelessBackend) -> dict[str, Any]:
    bufs = [*b._cache, *b._staging, *b._new, b._ids_d, b._pos_d, b._index_d, b._logits_d]
    misaligned = [int(x) for x in bufs if int(x) % ALIGN]
    b._cuda_ctx.push()
    try:
        zeros = np.zeros(b.plan.cache_layer_bytes, np.uint8)
        nonzero = [i for i, buf in enumerate(b._cache)
                   if read_device(cuda, int(buf), zeros) != zeros.tobytes()]
    finally:
        cuda.Context.pop()
    return {"buffers": len(bufs), "device_bytes": b.plan.device_bytes, "misaligned": misaligned,
            "cache_not_zeroed": nonzero, "ok": not misaligned and not nonzero}


def check_kv_writes(cuda: ModuleType, b: EnginelessBackend, seed: int = 0) -> dict[str, Any]:
    """Each scenario's new_* rows through _write_new, the whole cache compared with StaticKVCache."""
    rng = np.random.default_rng(seed)
    L, ref = b.layout, StaticKVCache(b.layout, b.slots)
    dt = np.dtype(L.dtype)
    done: list[dict[str, Any]] = []
    b._cuda_ctx.push()
    try:
        for slots, starts, T in SCENARIOS:
            new = [rng.standard_normal((len(slots), L.kv_heads, T, L.head_dim)).astype(dt)
                   for _ in b._new]
            for buf, n in zip(b._new, new):
                cuda.memcpy_htod(buf, n)
            b._start.record(b._stream)
            b._write_new(list(slots), list(starts), T)
            b._end.record(b._stream)
            b._stream.synchronize()
            ref.write(slots, starts, new)
            bad = [(i, first_mismatch(read_device(cuda, int(buf), want), want.tobytes()))
                   for i, (buf, want) in enumerate(zip(b._cache, ref.buffers))]
            bad = [(i, off) for i, off in bad if off is not None]
            done.append({"slots": list(slots), "starts": list(starts), "T": T,
                         "gpu_ms": round(b._start.time_till(b._end), 4),
                         "mismatch": [{"buffer": i, "byte": off} for i, off in bad]})
        gathered, in_place = _check_binding(cuda, b, ref)
    finally:
        cuda.Context.pop()
    ok = not any(s["mismatch"] for s in done) and gathered and in_place
    return {"dtype": L.dtype, "cache_bytes": b.plan.kv_cache_bytes, "scenarios": done,
            "gather_matches": gathered, "run_binds_in_place": in_place, "ok": ok}


def _check_binding(cuda: ModuleType, b: EnginelessBackend, ref: StaticKVCache) -> tuple[bool, bool]:
    row = b.plan.row_bytes
    ptrs = b._cache_pointers(list(GATHER))
    b._stream.synchronize()
    rows, _ = ref.rows(list(GATHER))
    gathered = all(read_device(cuda, p, r) == r.tobytes() for p, r in zip(ptrs, rows))
    in_place = b._cache_pointers(list(RUN)) == [int(buf) + RUN[0] * row for buf in b._cache]
    return gathered, in_place


def check_events(cuda: ModuleType, b: EnginelessBackend, nbytes: int) -> dict[str, Any]:
    b._cuda_ctx.push()
    try:
        src, dst = cuda.mem_alloc(nbytes), cuda.mem_alloc(nbytes)
        try:
            cuda.memset_d8(src, 7, nbytes)
            times = []
            for _ in range(3):
                b._start.record(b._stream)
                cuda.memcpy_dtod_async(dst, src, nbytes, b._stream)
                b._end.record(b._stream)
                b._end.synchronize()
                times.append(b._start.time_till(b._end))
            probe = np.empty(4096, np.uint8)
            cuda.memcpy_dtoh(probe, int(dst) + nbytes - probe.size)
        finally:
            src.free()
            dst.free()
    finally:
        cuda.Context.pop()
    best = min(times)
    return {"bytes": nbytes, "ms": [round(t, 4) for t in times],
            "read_write_gb_s": round(2 * nbytes / (best / 1e3) / 1e9, 1) if best > 0 else None,
            "copied": bool((probe == 7).all()), "ok": best > 0 and bool((probe == 7).all())}


def check_mem_get_info(b: EnginelessBackend, torch_info: Callable[[], Any] | None) -> dict[str, Any]:
    m = b.memory()
    free, total = m["gpu_free_bytes"], m["gpu_total_bytes"]
    out: dict[str, Any] = {**m, "ok": isinstance(free, int) and isinstance(total, int) and 0 < free <= total}
    if torch_info is not None:
        t_free, t_total = torch_info()
        out.update(torch_free_bytes=int(t_free), torch_total_bytes=int(t_total),
                   ok=out["ok"] and int(t_total) == total)
    return out


def check_memory_report(cuda: ModuleType, b: EnginelessBackend) -> dict[str, Any]:
    from device.runtime.bench import MemorySampler, gpu_reader

    reports: dict[str, dict[str, Any]] = {}
    for name, source in (("backend", b), ("pycuda", None)):
        reader, why, done = gpu_reader(source)
        sampler = MemorySampler(0.02, reader)
        sampler.start()
        b._cuda_ctx.push()
        try:
            extra = cuda.mem_alloc(64 << 20)  # something for the sampler to see
            sampler.sample_gpu()
            extra.free()
        finally:
            cuda.Context.pop()
        time.sleep(0.1)
        rep = sampler.stop(b.kv_cache_bytes(), None, False, why)
        done()
        reports[name] = {"gpu": rep.gpu, "gpu_reason": rep.gpu_reason, "samples": len(sampler.gpu_samples)}
    ok = all(r["gpu"] is not None and r["gpu"]["total_bytes"] > 0 for r in reports.values())
    return {**reports, "ok": ok}


def check_kv_blocks(cuda: ModuleType, b: EnginelessBackend) -> dict[str, Any]:
    """Each BLOCK_MOVES read and write on the device and on a host copy of its cache, then the
    whole cache compared; every block released returns its memory."""
    ref = StaticKVCache(b.layout, b.slots)
    b._cuda_ctx.push()
    try:
        for buf, host in zip(b._cache, ref.buffers):
            host[:] = np.frombuffer(read_device(cuda, int(buf), host), host.dtype).reshape(host.shape)
        free_before = cuda.mem_get_info()[0]
    finally:
        cuda.Context.pop()
    moves = []
    for (slot, lo, hi), (to, at) in BLOCK_MOVES:
        block = b.read_kv(slot, lo, hi)
        b.write_kv(to, at, block)
        ref.write_block(to, at, ref.read_block(slot, lo, hi))
        b._cuda_ctx.push()
        try:
            b._stream.synchronize()
            bad = [i for i, (buf, want) in enumerate(zip(b._cache, ref.buffers))
                   if read_device(cuda, int(buf), want) != want.tobytes()]
        finally:
            cuda.Context.pop()
        block.release()
        moves.append({"read": [slot, lo, hi], "write": [to, at], "bytes": block.nbytes,
                      "mismatch_buffers": bad})
    b._cuda_ctx.push()
    try:
        freed = cuda.mem_get_info()[0] == free_before
    finally:
        cuda.Context.pop()
    return {"moves": moves, "released_all": freed and not b._blocks,
            "ok": not any(m["mismatch_buffers"] for m in moves) and not b._blocks}


def check_close(b: EnginelessBackend) -> dict[str, Any]:
    b.close()
    m = b.memory()
    return {"after_close": m, "ok": m["gpu_free_bytes"] is None and m["gpu_total_bytes"] is None}


def check_tegrastats() -> dict[str, Any]:
    path = shutil.which("tegrastats")
    return {"present": path is not None, "ran": False, "ok": True,
            "why": "runs only on a Jetson (device/runtime/tegrastats.py)" if path is None else
                   f"{path} exists but this check does not run it"}


def run_checks(cuda: ModuleType, torch_info: Callable[[], Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every check, in order; one that raises is recorded with its error and the rest still run."""
    checks: dict[str, dict[str, Any]] = {}

    def record(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except Exception as e:  # a check's failure is a result, not the end of the run
            detail = {"ok": False, "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-1500:]}
        ok = bool(detail.pop("ok"))
        checks[name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 3), **detail}

    record("context", lambda: check_context(cuda))
    backends: dict[str, EnginelessBackend] = {}
    for dtype in ("float32", "float16"):
        def make(dtype: str = dtype) -> dict[str, Any]:
            backends[dtype] = EnginelessBackend(Path("(no engine)"), KVCacheLayout(*LAYOUT, dtype),
                                                vocab_size=128, slots=SLOTS)
            return check_allocate(cuda, backends[dtype])

        record(f"allocate_{dtype}", make)
        if dtype in backends:
            record(f"kv_writes_{dtype}", partial(check_kv_writes, cuda, backends[dtype]))
            record(f"kv_blocks_{dtype}", partial(check_kv_blocks, cuda, backends[dtype]))
    main = backends.get("float32")
    if main is not None:
        record("events", lambda: check_events(cuda, main, COPY_BYTES))
        record("mem_get_info", lambda: check_mem_get_info(main, torch_info))
        record("memory_report", lambda: check_memory_report(cuda, main))
    for dtype, b in backends.items():
        record(f"close_{dtype}", partial(check_close, b))
    record("tegrastats", check_tegrastats)
    return checks


# --- environment and result --------------------------------------------------------------------
def _cmd(cmd: Sequence[str]) -> str | None:
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not run: {e}"
    return (p.stdout + p.stderr).strip()[-1500:]


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                           "numpy": np.__version__, "nvcc": _cmd(["nvcc", "--version"]),
                           "nvidia_smi": _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                               "--format=csv,noheader"])}
    for mod in ("torch", "onnxruntime", "pycuda", "tensorrt"):
        try:
            # pycuda has no __version__ (VERSION_TEXT); its distribution's metadata has
            env[mod] = getattr(__import__(mod), "__version__", None) or importlib.metadata.version(mod)
        except Exception as e:  # absent (tensorrt, by design) or broken: say which
            env[mod] = f"not importable: {type(e).__name__}: {e}"[:300]
    return env


def torch_mem_get_info() -> Callable[[], Any] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return lambda: torch.cuda.mem_get_info(0)


def write_result(out: Path, result: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def run_phase(out: Path, build: dict[str, Any], cuda: ModuleType | None = None) -> dict[str, Any]:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    checks: dict[str, dict[str, Any]] = {}
    if cuda is None:
        try:
            import pycuda.driver as real

            cuda = real
        except Exception as e:  # built but not loadable (no driver, a CUDA mismatch): say so
            checks["import_pycuda"] = {"ok": False, "seconds": 0.0, "error": f"{type(e).__name__}: {e}"}
    if cuda is not None:
        # torch's view of the GPU is compared only with a real driver's (a module loaded from a
        # file): a simulated one (the tests) on a machine with a GPU would be held to the card's
        checks = run_checks(cuda, torch_mem_get_info() if getattr(cuda, "__file__", None) else None)
    result = {"schema": SCHEMA, "started": started, "host": platform.node(), "env": environment(),
              "build": build, "layout": dict(zip(("num_layers", "kv_heads", "max_seq", "head_dim"), LAYOUT)),
              "slots": SLOTS, "checks": checks, "passed": all(c["ok"] for c in checks.values())}
    write_result(out, result)
    return result


def pycuda_importable() -> bool:
    try:
        import pycuda.driver  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for gpu_check.json")
    ap.add_argument("--deps", type=Path, default=DEFAULT_DEPS, help="tools/fetch_gpu_deps.py's folder")
    ap.add_argument("--work", type=Path, default=None, help="where the venv is built (default: a temp dir)")
    ap.add_argument("--build-record", type=Path, default=None, help=argparse.SUPPRESS)  # the re-run
    args = ap.parse_args(argv)
    build: dict[str, Any] = {"ok": True, "why": "pycuda was already importable"}
    if args.build_record is not None:
        build = json.loads(args.build_record.read_text(encoding="utf-8"))
    elif not pycuda_importable():
        try:
            work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
            build = build_pycuda(work, args.deps)
        except CheckError as e:
            build = {"ok": False, "error": str(e)}
        if not build["ok"] or not build.get("python"):
            write_result(args.out, {"schema": SCHEMA, "env": environment(), "build": build,
                                    "checks": {}, "passed": False})
            print(f"error: building pycuda failed; see {args.out / RESULT}", file=sys.stderr)
            return 1
        record = work / "build.json"
        record.write_text(json.dumps(build), encoding="utf-8")
        return subprocess.run([build["python"], __file__, str(args.out), "--build-record",
                               str(record)]).returncode
    result = run_phase(args.out, build)
    for name, c in result["checks"].items():
        why = "" if c["ok"] else f": {c.get('error', 'see the JSON')}"
        print(f"{'ok  ' if c['ok'] else 'FAIL'} {name} ({c['seconds']} s){why}")
    print(f"{args.out / RESULT}: {'passed' if result['passed'] else 'FAILED'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
