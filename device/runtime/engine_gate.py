"""Before the daemon loads a TensorRT bundle: find this device's engine, check it, or build it.

    plan = prepare_engine(bundle, manifest, rebuild_on_mismatch=False, progress=steps)

    bundle/engines/<engine_key(gpu, cc)>/engine.plan + engine.json
      missing (or no engine.json: a build that never finished)  -> build it here, keep it
      present, identity matches this device and bundle          -> use it
      present, differs (TensorRT, GPU, model.onnx, profiles...) -> ToolkitError listing each
                                                                   difference and what to run,
                                                                   or rebuild when asked to

A rebuild is never silent: it takes minutes and gigabytes on a Jetson, so after a JetPack
upgrade the daemon says why it refuses, and `toolkit compile BUNDLE` (or --rebuild-on-mismatch)
is the explicit way on. JetPack/L4T differences alone are notes, not refusals (engine_identity).

`can_build_here(manifest.target)` answers `toolkit compile` on a host: an engine built here is only of
use when this machine's GPU and TensorRT are the target's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bundle.errors import ToolkitError
from bundle.manifest import Manifest, TargetRecord, sha256_file
from device.runtime.engine_identity import (
    ENGINES_DIR,
    IDENTITY_FILE,
    PLAN_FILE,
    DeviceIdentity,
    EngineIdentity,
    compare,
    detect_device,
    engine_key,
)
from device.runtime.trt_build import (
    EngineBuildResult,
    Progress,
    ProgressLike,
    as_progress,
    build_engine,
    default_timing_cache_dir,
    profile_shapes,
)


@dataclass
class EngineStatus:
    plan: Path
    identity: EngineIdentity
    built: bool  # True: this call built it
    build: EngineBuildResult | None = None
    notes: list[str] = field(default_factory=list)  # differences that do not block loading


def prepare_engine(bundle_dir: Path, manifest: Manifest, *, rebuild_on_mismatch: bool,
                   progress: ProgressLike = None, timing_cache_dir: Path | None = None,
                   device: DeviceIdentity | None = None) -> Path:
    """The engine.plan the daemon should load for this bundle on this device."""
    return ensure_engine(bundle_dir, manifest, rebuild_on_mismatch=rebuild_on_mismatch,
                         progress=progress, timing_cache_dir=timing_cache_dir,
                         device=device).plan


def ensure_engine(bundle_dir: Path, manifest: Manifest, *, rebuild_on_mismatch: bool,
                  force: bool = False, progress: ProgressLike = None,
                  timing_cache_dir: Path | None = None,
                  device: DeviceIdentity | None = None) -> EngineStatus:
    """prepare_engine with the details: whether it was built, and the non-blocking notes.
    force=True rebuilds even a matching engine."""
    say = as_progress(progress)
    device = device or detect_device()
    gpu, cc = _require_runtime(device)
    bundle_dir = Path(bundle_dir)
    engine_dir = bundle_dir / ENGINES_DIR / engine_key(gpu, cc)
    complete = (engine_dir / PLAN_FILE).is_file() and (engine_dir / IDENTITY_FILE).is_file()
    if complete and not force:
        status = _check_existing(engine_dir, device, manifest, _onnx_sha(bundle_dir, manifest),
                                 rebuild_on_mismatch, say)
        if status is not None:
            return status
    elif not complete:
        say(f"no TensorRT engine for this GPU ({gpu}) in the bundle yet: building one now; "
            f"it is kept in {engine_dir} for the next start")
    result = _build(bundle_dir, manifest, engine_dir, timing_cache_dir, device, say)
    return EngineStatus(result.plan, result.identity, built=True, build=result)


def _require_runtime(device: DeviceIdentity) -> tuple[str, str]:
    if device.tensorrt_version is None:
        raise ToolkitError("this bundle needs TensorRT, and python cannot import tensorrt here",
                           hint="run it on the Jetson it was converted for (JetPack ships "
                                "TensorRT), or convert again with --target cpu")
    if device.gpu_name is None or device.compute_capability is None:
        raise ToolkitError("this bundle needs a CUDA GPU, and pycuda sees none here",
                           hint="install pycuda (pip install pycuda) on the Jetson, and check "
                                "that the GPU is visible (tegrastats, nvidia-smi)")
    return device.gpu_name, device.compute_capability


def _onnx_sha(bundle_dir: Path, manifest: Manifest) -> str:
    entry = manifest.files.get(manifest.model_file)
    return entry.sha256 if entry else sha256_file(bundle_dir / manifest.model_file)


def _check_existing(engine_dir: Path, device: DeviceIdentity, manifest: Manifest, onnx_sha: str,
                    rebuild_on_mismatch: bool, say: Progress) -> EngineStatus | None:
    """The matching engine's status, or None when it must be rebuilt (and that is allowed)."""
    try:
        identity = EngineIdentity.load(engine_dir)
    except ToolkitError as e:
        if not rebuild_on_mismatch:
            raise
        say(f"rebuilding the TensorRT engine: {e.message}")
        return None
    expected = [p.to_json() for p in profile_shapes(manifest.max_seq, manifest.batch)]
    found = compare(identity, device, onnx_sha, precision=manifest.precision, profiles=expected)
    blocking = [m for m in found if m.blocking]
    notes = [m.message for m in found if not m.blocking]
    for note in notes:
        say(f"note: {note}")
    if not blocking:
        return EngineStatus(engine_dir / PLAN_FILE, identity, built=False, notes=notes)
    if not rebuild_on_mismatch:
        listed = "\n  - ".join(m.message for m in blocking)
        raise ToolkitError(f"the TensorRT engine in {engine_dir} does not match this device:\n"
                           f"  - {listed}",
                           hint="`toolkit compile BUNDLE` on this device rebuilds it, or start "
                                "the daemon with --rebuild-on-mismatch")
    say("rebuilding the TensorRT engine (" + ", ".join(m.field for m in blocking) + " changed)")
    return None


def _build(bundle_dir: Path, manifest: Manifest, engine_dir: Path, timing_cache_dir: Path | None,
           device: DeviceIdentity, say: Progress) -> EngineBuildResult:
    """Build in place. engine.json goes first and comes back last, so an interrupted build
    leaves a folder without identity, which the next start treats as missing."""
    try:
        engine_dir.mkdir(parents=True, exist_ok=True)
        (engine_dir / IDENTITY_FILE).unlink(missing_ok=True)
    except OSError as e:
        raise ToolkitError(f"cannot write the engine into {engine_dir}: {e}",
                           hint="the bundle folder must be writable by the daemon: the engine "
                                "is kept there for the next start") from e
    return build_engine(bundle_dir / manifest.model_file, manifest, engine_dir,
                        timing_cache_dir=timing_cache_dir or default_timing_cache_dir(),
                        progress=say, device=device)


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def can_build_here(target: TargetRecord, device: DeviceIdentity | None = None) -> tuple[bool, str]:
    """(True, what matches) when an engine built on this machine would load on the target:
    TensorRT importable, a GPU, the target's compute capability and TensorRT major.minor.
    Otherwise (False, why not)."""
    if not target.builds_on_device:
        return False, f"target {target.name} runs {target.runtime}: there is no engine to build"
    device = device or detect_device()
    if device.tensorrt_version is None:
        return False, "TensorRT is not installed here (python cannot import tensorrt)"
    if device.gpu_name is None or device.compute_capability is None:
        return False, "no CUDA GPU is visible here (pycuda is missing or sees no GPU)"
    if target.compute_capability and device.compute_capability != target.compute_capability:
        return False, (f"this GPU ({device.gpu_name}, compute capability "
                       f"{device.compute_capability}) is not the target's ({target.name}: "
                       f"{target.compute_capability}); an engine only runs on the GPU kind that "
                       "built it")
    if target.tensorrt and _major_minor(device.tensorrt_version) != target.tensorrt:
        return False, (f"this machine has TensorRT {device.tensorrt_version}, target "
                       f"{target.name} has {target.tensorrt} (JetPack {target.jetpack}); an "
                       "engine only loads on the TensorRT version that built it")
    return True, (f"this machine matches {target.name}: {device.gpu_name} (compute capability "
                  f"{device.compute_capability}), TensorRT {device.tensorrt_version}")
