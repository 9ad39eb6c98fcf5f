"""`toolkit compile BUNDLE`: build a Jetson bundle's TensorRT engine ahead of the daemon.

    result = compile_bundle(Path("bundles/smollm2-135m-jetson-orin-nano-8gb-fp16"))
    result.status    # "built" | "present" | "deferred" | "nothing"

A TensorRT engine only runs on the TensorRT version and GPU that built it, so the engine is built
where it will run: here when this machine is the target's kind (device/engine_gate.can_build_here),
otherwise by the daemon on the device at first load. Not being able to build here is not an
error - the bundle is complete without an engine - so it is a result ("deferred") with the
reason, and the command exits 2 so scripts can tell "no engine yet" from success:

    exit 0  built, already up to date, or nothing to compile (CPU / encoder bundles)
    exit 1  an error (ToolkitError: a damaged bundle, a failed build)
    exit 2  not built here; the daemon builds it on the device at first load
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bundle.contract import DECODER_CONTRACT
from bundle.manifest import load_verified
from device.runtime.engine_gate import can_build_here, ensure_engine
from device.runtime.trt_build import ProgressLike

EXIT_DEFERRED = 2


@dataclass
class CompileResult:
    bundle: Path
    status: str  # "built" | "present" | "deferred" | "nothing"
    message: str
    engine: Path | None = None
    seconds: float | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_DEFERRED if self.status == "deferred" else 0


def compile_bundle(bundle_dir: Path, *, force: bool = False,
                   progress: ProgressLike = None) -> CompileResult:
    """Build (or check) the bundle's engine for this device; see the module docstring."""
    bundle = Path(bundle_dir)
    manifest = load_verified(bundle)  # a damaged bundle is an error before anything else
    name, runtime = manifest.target.name, manifest.target.runtime
    if runtime != "tensorrt":
        return CompileResult(bundle, "nothing", f"{bundle} is a {name} bundle ({runtime}): "
                             "there is nothing to compile; its ONNX graph runs as it is")
    if manifest.contract.name != DECODER_CONTRACT:
        return CompileResult(bundle, "nothing", f"{bundle} is a {manifest.kind} bundle: it runs "
                             "on ONNX Runtime on the device; there is nothing to compile")
    ok, reason = can_build_here(manifest.target)
    if not ok:
        return CompileResult(bundle, "deferred", (
            f"no engine built here: {reason}.\nThe daemon builds it on the {name} at first load "
            f"(minutes; kept in {bundle}/engines/ for later starts), or run "
            f"`toolkit compile {bundle}` there."))
    status = ensure_engine(bundle, manifest, rebuild_on_mismatch=True, force=force,
                           progress=progress)
    if status.build is not None:
        return CompileResult(bundle, "built", f"built {status.plan} in {status.build.seconds:.0f}s "
                             f"({reason})", status.plan, status.build.seconds)
    return CompileResult(bundle, "present", f"up to date: {status.plan} matches this device "
                         "(--force rebuilds it)", status.plan)
