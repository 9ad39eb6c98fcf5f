"""tools/gpu_check.py and tools/fetch_gpu_deps.py: the build commands, the failure records, and every
check run end to end against a simulated driver (tests/support/fake_pycuda.py) - including that a wrong
Memcpy2D is caught byte for byte - and, where pycuda and a GPU exist, against the real one."""

from __future__ import annotations

import importlib.util
import json
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fake_pycuda  # noqa: E402
import pytest
from paths import TOOLS

from device.runtime import trt_backend  # noqa: E402


def load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")
fetch = load("fetch_gpu_deps")
CHECKS = ["context", "allocate_float32", "kv_writes_float32", "kv_blocks_float32", "allocate_float16",
          "kv_writes_float16", "kv_blocks_float16", "events", "mem_get_info", "memory_report",
          "close_float32", "close_float16", "tegrastats"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A fresh simulated pycuda.driver wherever the backend imports it; a 1 MiB timed copy."""
    drv = fake_pycuda.install(monkeypatch)
    monkeypatch.setattr(gpu_check, "COPY_BYTES", 1 << 20)
    return drv


def test_every_check_passes_on_the_simulated_driver(fake: types.ModuleType, tmp_path: Path) -> None:
    result = gpu_check.run_phase(tmp_path, {"ok": True, "why": "test"}, cuda=fake)
    assert list(result["checks"]) == CHECKS
    failed = {k: v for k, v in result["checks"].items() if not v["ok"]}
    assert not failed and result["passed"], failed
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["schema"] == "gpu-check-v1" and saved["passed"]
    kv = saved["checks"]["kv_writes_float16"]
    assert len(kv["scenarios"]) == len(gpu_check.SCENARIOS) and kv["gather_matches"]
    assert kv["run_binds_in_place"] and kv["dtype"] == "float16"
    assert saved["checks"]["memory_report"]["backend"]["gpu"]["total_bytes"] == fake_pycuda.CAPACITY
    assert saved["checks"]["close_float32"]["after_close"]["gpu_free_bytes"] is None
    assert fake.memory.blocks == {}  # close() freed every buffer
    assert saved["checks"]["tegrastats"]["ran"] is False


def test_a_simulated_driver_is_not_held_to_a_real_cards_memory(fake: types.ModuleType, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # on the GPU machine torch sees the H200 (141 GiB) while the simulated driver has its own
    # capacity: only a driver module loaded from a file is compared with torch
    monkeypatch.setattr(gpu_check, "torch_mem_get_info", lambda: lambda: (1 << 40, 1 << 41))
    assert gpu_check.run_phase(tmp_path, {"ok": True}, cuda=fake)["passed"]
    assert gpu_check.main([str(tmp_path / "out")]) == 0
    monkeypatch.setattr(fake, "__file__", "/site-packages/pycuda/_driver.so", raising=False)
    checks = gpu_check.run_phase(tmp_path, {"ok": True}, cuda=fake)["checks"]
    assert not checks["mem_get_info"]["ok"] and checks["mem_get_info"]["torch_total_bytes"] == 1 << 41


def test_a_wrong_strided_copy_is_caught_byte_for_byte(fake: types.ModuleType, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = trt_backend.slice_copies

    def off_by_one_position(*args: Any) -> list[trt_backend.Copy2D]:
        itemsize = args[-1]
        return [c if c.dst_x_in_bytes else
                trt_backend.replace(c, dst_x_in_bytes=args[5] * itemsize)  # start 0 -> start 1
                for c in real(*args)]

    monkeypatch.setattr(trt_backend, "slice_copies", off_by_one_position)
    result = gpu_check.run_phase(tmp_path, {"ok": True}, cuda=fake)
    kv = result["checks"]["kv_writes_float32"]
    assert not kv["ok"] and not result["passed"]
    first_bad = next(i for i, s in enumerate(kv["scenarios"]) if s["mismatch"])
    first_at_0 = next(i for i, (_, starts, _) in enumerate(gpu_check.SCENARIOS) if 0 in starts)
    assert first_bad == first_at_0  # the first write to position 0 (the cache differs from then on)
    assert result["checks"]["events"]["ok"]  # the other checks still ran


def test_a_check_that_raises_is_recorded_and_the_rest_run(fake: types.ModuleType, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> tuple[int, int]:
        raise fake.Error("driver says no")

    monkeypatch.setattr(fake, "mem_get_info", broken)
    result = gpu_check.run_phase(tmp_path, {"ok": True}, cuda=fake)
    assert list(result["checks"]) == CHECKS
    ctx = result["checks"]["context"]
    assert not ctx["ok"] and ctx["error"] == "Error: driver says no" and "Traceback" in ctx["traceback"]
    assert result["checks"]["kv_writes_float32"]["ok"]


def sdist(folder: Path) -> Path:
    """A stand-in pycuda sdist: a tarball with a setup.py in its top folder."""
    import io
    import tarfile

    path = folder / "pycuda-2026.1.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = b"# setup.py\n"
        info = tarfile.TarInfo("pycuda-2026.1/setup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_build_commands_use_only_the_carried_files(tmp_path: Path) -> None:
    venv, src = tmp_path / "venv", tmp_path / "src" / "pycuda-2026.1"
    cmds = gpu_check.build_commands("/usr/bin/python3.12", venv, tmp_path, src)
    assert cmds[0] == ["/usr/bin/python3.12", "-m", "venv", "--system-site-packages", str(venv)]
    for cmd in cmds[1:]:
        assert cmd[:3] == [str(venv / "bin" / "python"), "-m", "pip"]
        assert "--no-index" in cmd and cmd[cmd.index("--find-links") + 1] == str(tmp_path)
    assert cmds[-1][-2:] == ["--no-build-isolation", str(src)]
    with pytest.raises(gpu_check.CheckError, match="fetch_gpu_deps.py"):
        gpu_check.find_sdist(tmp_path / "empty")


def test_a_venv_made_from_a_venv_sees_the_outer_venvs_packages(tmp_path: Path) -> None:
    own = tmp_path / "venv" / "lib" / "python3.12" / "site-packages"
    own.mkdir(parents=True)
    assert gpu_check.see_outer_venv(tmp_path / "venv", "/usr", "/usr") is None  # a plain Python
    pth = gpu_check.see_outer_venv(tmp_path / "venv", "/opt/torch/.venv", "/usr",
                                   ["/opt/torch/.venv/lib/python3.12/site-packages"])
    assert pth == own / "outer_venv.pth"
    assert pth.read_text().splitlines() == ["/opt/torch/.venv/lib/python3.12/site-packages"]


def fake_nvcc(root: Path, top: Path | None = None) -> Path:
    """cuda/bin/nvcc; with `top`, a wrapper whose -dryrun names another CUDA root."""
    bin_dir = root / "cuda" / "bin"
    bin_dir.mkdir(parents=True)
    nvcc = bin_dir / "nvcc"
    dry = f"echo '#$ TOP={top}/bin/..'" if top else "echo 'Cuda compilation tools, release 13.0'"
    nvcc.write_text(f"#!/bin/sh\n{dry}\n")
    nvcc.chmod(0o755)
    return bin_dir


def test_cuda_root_is_where_nvcc_says_or_lives(tmp_path: Path) -> None:
    assert gpu_check.find_cuda_root(str(fake_nvcc(tmp_path))) == (tmp_path / "cuda").resolve()
    real = tmp_path / "real" / "cuda-13.0"
    (real / "bin").mkdir(parents=True)
    wrapped = fake_nvcc(tmp_path / "wrapper", top=real)
    assert gpu_check.find_cuda_root(str(wrapped)) == real.resolve()
    with pytest.raises(gpu_check.CheckError, match="nvcc is not on PATH"):
        gpu_check.find_cuda_root(str(tmp_path / "real"))


def test_libcuda_is_found_or_linked(tmp_path: Path) -> None:
    plain = "\tlibcuda.so (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so\n"
    versioned = "\tlibcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
    other = "\tlibcudart.so.13 (libc6,x86-64) => /usr/local/cuda/lib64/libcudart.so.13\n"
    assert gpu_check.libcuda_dirs(tmp_path, plain + versioned) == ["/usr/lib/x86_64-linux-gnu"]
    (linked,) = gpu_check.libcuda_dirs(tmp_path, versioned + other)
    assert os.readlink(Path(linked) / "libcuda.so") == "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    assert gpu_check.libcuda_dirs(tmp_path / "x", other) == []


def test_siteconf_names_cuda_and_enables_curand_only_where_it_exists(tmp_path: Path) -> None:
    conf: dict[str, Any] = {}
    exec(gpu_check.siteconf(tmp_path, ["/drv"]), conf)
    assert conf["CUDA_ROOT"] == str(tmp_path) and conf["CUDA_INC_DIR"] == [str(tmp_path / "include")]
    assert conf["CUDADRV_LIB_DIR"] == [str(tmp_path / "lib64"), str(tmp_path / "lib64" / "stubs"), "/drv"]
    assert conf["CUDA_ENABLE_CURAND"] is False
    (tmp_path / "lib64").mkdir()
    (tmp_path / "lib64" / "libcurand.so").write_bytes(b"")
    exec(gpu_check.siteconf(tmp_path, []), conf)
    assert conf["CUDA_ENABLE_CURAND"] is True


def build_runner(seen: list[list[str]], rc: Callable[[list[str]], int]) -> Callable[..., Any]:
    def run(cmd: list[str], **kw: Any) -> Any:
        if "-dryrun" in cmd:  # find_cuda_root asking nvcc
            return types.SimpleNamespace(returncode=0, stdout="", stderr="")
        seen.append(cmd)
        return types.SimpleNamespace(returncode=rc(cmd), stdout="", stderr="no setuptools wheel")

    return run


def test_build_stops_at_the_first_failing_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_nvcc(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    sdist(tmp_path)
    seen: list[list[str]] = []
    run = build_runner(seen, lambda cmd: len(seen) - 1)  # the second command fails
    record = gpu_check.build_pycuda(tmp_path / "work", tmp_path, run=run)
    assert len(seen) == 2 and not record["ok"] and record["python"] is None
    assert record["steps"][-1]["rc"] == 1 and record["steps"][-1]["tail"] == "no setuptools wheel"
    conf = (tmp_path / "work" / "src" / "pycuda-2026.1" / "siteconf.py").read_text()
    assert conf == record["siteconf"] and f"CUDA_ROOT = {str((tmp_path / 'cuda').resolve())!r}" in conf


def test_a_venv_without_ensurepip_falls_back_to_the_systems_pip(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_nvcc(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    sdist(tmp_path)
    seen: list[list[str]] = []
    # ensurepip is missing: only a venv --without-pip can be made
    run = build_runner(seen, lambda cmd: int(cmd[2] == "venv" and "--without-pip" not in cmd))
    record = gpu_check.build_pycuda(tmp_path / "work", tmp_path, run=run)
    assert record["ok"] and record["python"] == str(tmp_path / "work" / "venv" / "bin" / "python")
    assert [s["rc"] for s in record["steps"]] == [1, 0, 0, 0, 0]
    assert "--without-pip" in seen[1] and seen[-1][-1] == str(tmp_path / "work" / "src" / "pycuda-2026.1")


def test_main_records_a_build_that_cannot_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "pycuda_importable", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--deps", str(tmp_path), "--work", str(tmp_path / "w")]) == 1
    saved = json.loads((out / "gpu_check.json").read_text())
    assert not saved["passed"] and "nvcc is not on PATH" in saved["build"]["error"]


def test_fetch_downloads_the_sdist_and_pinned_pure_wheels(tmp_path: Path) -> None:
    sdist, wheels = fetch.download_commands(tmp_path, "python")
    assert sdist[-1] == fetch.PYCUDA and sdist[sdist.index("--no-binary") + 1] == "pycuda"
    assert wheels[wheels.index("--platform") + 1] == "any"
    assert wheels[wheels.index("--python-version") + 1] == "3.12"
    assert all("==" in w for w in fetch.WHEELS) and set(fetch.WHEELS) <= set(wheels)
    names = {w.split("==")[0] for w in fetch.WHEELS}
    assert {"setuptools", "wheel", "pytools"} <= names


def _real_gpu() -> types.ModuleType | None:
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError):
        return None
    try:
        cuda.init()
        return cuda if cuda.Device.count() > 0 else None
    except cuda.Error:
        return None


def test_every_check_passes_on_a_real_gpu(tmp_path: Path) -> None:
    cuda = _real_gpu()
    if cuda is None:
        pytest.skip("no pycuda or no CUDA GPU here (tools/gpu_check.py runs these on one)")
    result = gpu_check.run_phase(tmp_path, {"ok": True, "why": "test"}, cuda=cuda)
    assert result["passed"], {k: v for k, v in result["checks"].items() if not v["ok"]}


def test_main_runs_the_checks_when_pycuda_imports(fake: types.ModuleType, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main([str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert all(f"ok   {name} (" in printed for name in CHECKS) and printed.rstrip().endswith("passed")
    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert saved["build"] == {"ok": True, "why": "pycuda was already importable"}
