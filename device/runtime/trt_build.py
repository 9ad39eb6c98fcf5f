"""Build a TensorRT engine from a bundle's model.onnx, on the device that will run it.

    result = build_engine(bundle / "model.onnx", manifest, bundle / "engines" / key,
                          timing_cache_dir=default_timing_cache_dir(), progress=print)

The chain is tensorrt_jetson.md §1.1/§1.5: Builder -> network (flags 0, or STRONGLY_TYPED) ->
OnnxParser.parse_from_file -> builder config -> two optimization profiles ->
build_serialized_network -> engine.plan. Only API present from TensorRT 10.0 through 10.16 is
called unguarded; everything newer or removed in TensorRT 11 sits behind a hasattr fallback:

  * precision flags (FP16, INT8; deprecated 10.12, removed 11.0) -> a STRONGLY_TYPED network
    where BuilderFlag lacks them (the graph's own types then decide);
  * IProgressMonitor / config.progress_monitor -> phase messages only;
  * ParserError.node_name / node_operator -> the node index alone.

Optimization profiles (static-kv-v1, bundle/contract.py: only batch and seq vary, the cache's
max_seq axis is static):

    profile 0 "prefill"  input_ids/position_ids [1, 1 | min(128, S-1) | S-1]   past_* [1, Hkv, S, D]
                         logits_index [1 | 1 | S-1]
    profile 1 "decode"   input_ids/position_ids [1..slots, 1]                  past_* [1..slots, Hkv, S, D]
                         logits_index [1]

Prefill stops at S-1 tokens because a full cache leaves no room for a generated token
(device/runtime/generate.py refuses such prompts); its logits are tuned for the last position only (what
generation asks for), up to every position (perplexity). Decode is tuned (opt) for a full set of slots: decode
is memory-bound, so batch 1 runs the same kernels at nearly the same speed, and a full batch is
when speed matters.

Precision (precision_plan): Q/DQ bundles are explicitly quantized, so no calibrator is ever set.
quantize/ writes every reduced-precision graph with explicit types (fp16 weights and activations,
fp32 RMSNorm statistics, INT8/INT4/FP8 Q/DQ), so fp16, int8, int4 and fp8 all build STRONGLY_TYPED:
the graph's types decide, and no FP16 flag can move the norm chain to fp16 where it overflows.
(fp8 needs Thor: TensorRT >= 10.13, compute capability >= 8.9.)
fp32 clears TF32 (on by default), because an fp32 bundle promises fp32 matmuls. Logits stay
fp32: network outputs keep their ONNX type (float32 in the contract) in a weakly typed network,
and we pin it in case the parser says otherwise.

Files written into out_dir: engine.plan, engine.json (EngineIdentity), layers.json (engine
inspector, DETAILED verbosity), build.log (TensorRT's log, INFO and above).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from bundle.atomic import write_atomic
from bundle.errors import ToolkitError
from bundle.manifest import Manifest, sha256_file
from bundle.progress import Steps
from device.runtime.engine_identity import (
    BUILD_LOG,
    LAYERS_FILE,
    PLAN_FILE,
    DeviceIdentity,
    EngineIdentity,
    detect_device,
    timing_cache_key,
)

if TYPE_CHECKING:
    import tensorrt as trt

Progress = Callable[[str], None]
ProgressLike = Progress | Steps | None

PREFILL, DECODE = 0, 1  # profile indices, in the order they are added
PREFILL_OPT = 128  # prefill kernels are tuned for prompts of this length
LOG_MIN_LEVEL = 3  # ILogger.Severity: 0 internal error, 1 error, 2 warning, 3 info, 4 verbose


def as_progress(progress: ProgressLike) -> Progress:
    """Accept a callable, a bundle.progress.Steps (its .say) or None (silence)."""
    if progress is None:
        return lambda _msg: None
    if isinstance(progress, Steps):
        return progress.say
    return progress


def default_timing_cache_dir() -> Path:
    """$XDG_CACHE_HOME/edge-toolkit/trt-timing: shared by every bundle built on this device."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-toolkit" / "trt-timing"


# --- profiles --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileShapes:
    name: str
    batch: tuple[int, int, int]  # min, opt, max
    seq: tuple[int, int, int]
    logits: tuple[int, int, int]  # n_logits: how many positions of the step get logits

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "batch": list(self.batch), "seq": list(self.seq),
                "logits": list(self.logits)}


def profile_shapes(max_seq: int, slots: int) -> list[ProfileShapes]:
    """[prefill, decode] for a bundle's max_seq and batch (= KV cache slots)."""
    if max_seq < 2:
        raise ToolkitError(f"max_seq {max_seq} leaves no room to generate; it must be at least 2")
    if slots < 1:
        raise ToolkitError(f"the bundle has {slots} slots (batch); it must be at least 1")
    top = max_seq - 1
    return [ProfileShapes("prefill", (1, 1, 1), (1, min(PREFILL_OPT, top), top), (1, 1, top)),
            ProfileShapes("decode", (1, slots, slots), (1, 1, 1), (1, 1, 1))]


Shape = tuple[int, ...]


def input_shape_range(name: str, static_shape: Shape, prof: ProfileShapes) -> tuple[Shape, ...]:
    """(min, opt, max) of one graph input under a profile. static_shape is the network's view of
    the input (-1 for dynamic axes); the cache's trailing [Hkv, S, D] must be static."""
    if name in ("input_ids", "position_ids"):
        if len(static_shape) != 2:
            raise ToolkitError(f"graph input {name} has shape {list(static_shape)}; "
                               "static-kv-v1 says [batch, seq]")
        return tuple((b, s) for b, s in zip(prof.batch, prof.seq))
    if name == "logits_index":
        if len(static_shape) != 1:
            raise ToolkitError(f"graph input logits_index has shape {list(static_shape)}; "
                               "static-kv-v1 says [n_logits]")
        return tuple((k,) for k in prof.logits)
    if name.startswith("past_"):
        rest = static_shape[1:]
        if len(static_shape) != 4 or any(d < 1 for d in rest):
            raise ToolkitError(f"graph input {name} has shape {list(static_shape)}; static-kv-v1 "
                               "needs [batch, kv_heads, max_seq, head_dim] with only batch dynamic",
                               hint="convert the model again with this toolkit")
        return tuple((b, *rest) for b in prof.batch)
    raise ToolkitError(f"unexpected graph input {name!r}: not part of the static-kv-v1 contract",
                       hint="only decoder bundles written by `toolkit convert` can be compiled")


# --- precision -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrecisionPlan:
    set_flags: tuple[str, ...]  # trt.BuilderFlag names
    clear_flags: tuple[str, ...] = ()
    strongly_typed: bool = False
    note: str = ""


_FLAGS = {
    "fp32": PrecisionPlan((), ("TF32",), note="fp32 kernels, TF32 off"),
    # quantize/ writes explicitly typed graphs for these: fp16 weights and activations, but the
    # RMSNorm statistics kept fp32 on purpose (SmolLM2's residual reaches ~25,000 and its square
    # overflows fp16). A weakly typed build with the FP16 flag may run that chain in fp16 anyway,
    # so these build strongly typed: the graph's types decide, as for fp8.
    "fp16": PrecisionPlan((), strongly_typed=True, note="strongly typed: fp16 graph, fp32 norms"),
    "int8": PrecisionPlan((), strongly_typed=True, note="strongly typed: INT8 Q/DQ, fp16 elsewhere"),
    "int4": PrecisionPlan((), strongly_typed=True,
                          note="strongly typed: INT4 weight-only block DQ into fp16 GEMMs"),
    "fp8": PrecisionPlan((), strongly_typed=True, note="strongly typed: FP8 Q/DQ as the graph says"),
}
FP8_MIN_CC = (8, 9)  # Ada / Hopper / Blackwell; Orin (8.7) and Xavier (7.2) have no FP8 (§2.3)


def precision_plan(precision: str, *, precision_flags: bool = True) -> PrecisionPlan:
    """Builder flags for a bundle precision. precision_flags=False is TensorRT >= 11, which removed
    the precision flags (§1.3): the network is strongly typed and the graph's types decide."""
    if precision not in _FLAGS:
        raise ToolkitError(f"cannot build a TensorRT engine for precision {precision!r}; "
                           f"known: {', '.join(_FLAGS)}")
    if not precision_flags:
        return PrecisionPlan((), strongly_typed=True,
                             note="this TensorRT has no precision flags: strongly typed")
    return _FLAGS[precision]


def check_precision_hardware(precision: str, compute_capability: str | None) -> None:
    if precision != "fp8" or compute_capability is None:
        return
    major, minor = (int(x) for x in compute_capability.split(".")[:2])
    if (major, minor) < FP8_MIN_CC:
        raise ToolkitError(f"fp8 needs compute capability 8.9 or newer; this GPU is "
                           f"{compute_capability}", hint="convert the model for fp16 or int8")


# --- logging ---------------------------------------------------------------------------------
class LogSink:
    """Where the build's ILogger writes: a file, plus the errors kept for the error message."""

    TAGS = {0: "F", 1: "E", 2: "W", 3: "I", 4: "V"}

    def __init__(self, path: Path, min_level: int = LOG_MIN_LEVEL) -> None:
        self.path, self.min_level = path, min_level
        self.errors: list[str] = []
        self._file: IO[str] | None = open(path, "w", encoding="utf-8")

    def write(self, level: int, msg: str) -> None:
        if level <= 1:
            self.errors.append(msg)
        if level <= self.min_level and self._file is not None:
            self._file.write(f"[{self.TAGS.get(level, '?')}] {msg}\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def tail(self, n: int = 5) -> str:
        return "\n  ".join(self.errors[-n:]) or "(no error in TensorRT's log)"


def _make_logger(sink: LogSink) -> trt.ILogger:
    import tensorrt as trt

    class FileLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 trampolines need the base __init__

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            sink.write(int(severity), msg)

    return FileLogger()


def _attach_progress_monitor(config: trt.IBuilderConfig, say: Progress) -> Any:
    """Phase messages from TensorRT's IProgressMonitor, where this TensorRT has one."""
    import tensorrt as trt

    if not hasattr(trt, "IProgressMonitor") or not hasattr(config, "progress_monitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str, num_steps: int) -> None:
            if not parent_phase:  # top-level phases only; nested ones are noise
                say(f"  TensorRT: {phase_name}")

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            return None

    monitor = Monitor()
    config.progress_monitor = monitor
    return monitor  # keep referenced until the build returns


# --- the build -------------------------------------------------------------------------------
@dataclass
class EngineBuildResult:
    engine_dir: Path
    plan: Path
    identity: EngineIdentity
    layers: Path
    log: Path
    timing_cache: Path
    seconds: float
    plan_bytes: int


def format_parser_error(err: Any) -> str:
    """One line per trt.ParserError: node index, name and operator where the binding has them
    (node_name/node_operator: tensorrt_jetson.md §1.2), the description and the error code."""
    node = int(err.node())
    name = getattr(err, "node_name", None)
    op = getattr(err, "node_operator", None)
    where = f"node {node}" if node >= 0 else "model"
    if callable(name) and name():
        where += f" {name()!r}"
    if callable(op) and op():
        where += f" ({op()})"
    return f"{where}: {err.desc()} [{err.code()}]"


def _parse(parser: trt.OnnxParser, onnx_path: Path, trt_version: str) -> None:
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    listed = "\n  - ".join(errors or ["(the parser gave no details)"])
    raise ToolkitError(f"TensorRT {trt_version} cannot import {onnx_path}:\n  - {listed}",
                       hint="the graph uses an operator or type this TensorRT's ONNX parser lacks "
                            "(TensorRT 10.3 reads opsets 9-20); convert with this toolkit's "
                            "exporter, or upgrade JetPack")


def _network_flags(plan: PrecisionPlan) -> int:
    import tensorrt as trt

    if plan.strongly_typed:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # explicit batch is implied in TensorRT 10 (§1.1)


def _configure(builder: trt.Builder, plan: PrecisionPlan, workspace: int | None,
               opt_level: int) -> trt.IBuilderConfig:
    import tensorrt as trt

    config = builder.create_builder_config()
    if workspace is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    for name in plan.set_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan.clear_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    config.builder_optimization_level = opt_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # full layers.json
    return config


def _keep_logits_fp32(network: trt.INetworkDefinition, plan: PrecisionPlan) -> None:
    import tensorrt as trt

    if plan.strongly_typed:  # types follow the graph; setting them is not allowed
        return
    for i in range(network.num_outputs):
        out = network.get_output(i)
        if out.name == "logits" and out.dtype != trt.float32:
            out.dtype = trt.float32


def shape_of(dims: trt.Dims) -> Shape:
    return tuple(int(dims[i]) for i in range(len(dims)))


def _add_profiles(builder: trt.Builder, network: trt.INetworkDefinition,
                  config: trt.IBuilderConfig, profiles: list[ProfileShapes]) -> None:
    import tensorrt as trt

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for prof in profiles:
        p = builder.create_optimization_profile()
        for t in inputs:
            lo, opt, hi = input_shape_range(t.name, shape_of(t.shape), prof)
            try:
                p.set_shape(t.name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
            except (ValueError, RuntimeError) as e:  # docstring says ValueError; 10.16 asserts
                raise ToolkitError(f"profile {prof.name}: shapes {lo}/{opt}/{hi} for {t.name} "
                                   f"rejected by TensorRT: {e}") from e
        if config.add_optimization_profile(p) < 0:
            raise ToolkitError(f"TensorRT rejected optimization profile {prof.to_json()}")


def _attach_timing_cache(config: trt.IBuilderConfig, path: Path,
                         say: Progress) -> trt.ITimingCache:
    """Load the device's timing cache (or start one). The returned cache must stay referenced
    until the build returns (§8 pitfall 9)."""
    blob = path.read_bytes() if path.is_file() else b""
    cache: trt.ITimingCache | None = config.create_timing_cache(blob)  # None: unreadable blob
    if cache is not None and config.set_timing_cache(cache, False):
        if blob:
            say(f"reusing timing cache {path}")
        return cache
    say(f"timing cache {path} is unreadable or from another device/TensorRT; starting anew")
    fresh = config.create_timing_cache(b"")
    config.set_timing_cache(fresh, False)
    return fresh


def _write_layer_info(plan: trt.IHostMemory, logger: trt.ILogger, path: Path) -> None:
    """Deserialize the fresh plan once: it proves the plan loads, and the inspector's JSON
    (DETAILED verbosity) goes beside it."""
    import tensorrt as trt

    runtime = trt.Runtime(logger)
    engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise ToolkitError("TensorRT built an engine it cannot load back",
                           hint=f"see {path.parent / BUILD_LOG}")
    inspector = engine.create_engine_inspector()
    path.write_text(inspector.get_engine_information(trt.LayerInformationFormat.JSON),
                    encoding="utf-8")


def build_engine(onnx_path: Path, manifest: Manifest, out_dir: Path, *, timing_cache_dir: Path,
                 workspace_bytes: int | None = None, opt_level: int = 3,
                 progress: ProgressLike = None,
                 device: DeviceIdentity | None = None) -> EngineBuildResult:
    """Build engine.plan (+ engine.json, layers.json, build.log) for this device into out_dir.

    workspace_bytes None: the bundle's target record's (manifest.target.engine.workspace_bytes). opt_level is
    builder_optimization_level 0-5 (3 = TensorRT's default). device: this machine's identity,
    recorded in engine.json (None: detect_device())."""
    import tensorrt as trt

    if not 0 <= opt_level <= 5:
        raise ToolkitError(f"builder optimization level {opt_level} is not in 0..5")
    say = as_progress(progress)
    t0 = time.perf_counter()
    target = manifest.target
    device = device or detect_device()
    check_precision_hardware(manifest.precision, device.compute_capability)
    plan_cfg = precision_plan(manifest.precision,
                              precision_flags=hasattr(trt.BuilderFlag, "FP16"))
    profiles = profile_shapes(manifest.max_seq, manifest.batch)
    workspace = workspace_bytes if workspace_bytes is not None else target.engine.workspace_bytes
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timing_cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path = timing_cache_dir / (timing_cache_key(
        target.name, trt.__version__, device.compute_capability) + ".cache")
    sink = LogSink(out_dir / BUILD_LOG)
    try:
        logger = _make_logger(sink)
        say(f"building a TensorRT {trt.__version__} engine ({manifest.precision}: "
            f"{plan_cfg.note}; workspace {_mib(workspace)}, optimization level {opt_level}); "
            "this takes minutes on a Jetson")
        plan_bytes = _build_plan(logger, sink, onnx_path, out_dir, plan_cfg, profiles,
                                 workspace, opt_level, cache_path, say)
    finally:
        sink.close()
    identity = _identity(trt.__version__, device, manifest.precision, profiles, onnx_path)
    identity.save(out_dir)
    seconds = time.perf_counter() - t0
    say(f"engine built in {seconds:.0f}s: {out_dir / PLAN_FILE} ({_mib(plan_bytes)})")
    return EngineBuildResult(out_dir, out_dir / PLAN_FILE, identity, out_dir / LAYERS_FILE,
                             out_dir / BUILD_LOG, cache_path, seconds, plan_bytes)


def _build_plan(logger: trt.ILogger, sink: LogSink, onnx_path: Path, out_dir: Path,
                plan_cfg: PrecisionPlan, profiles: list[ProfileShapes], workspace: int | None,
                opt_level: int, cache_path: Path, say: Progress) -> int:
    """Parse, configure, build, write engine.plan + the timing cache + layers.json."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(plan_cfg))
    parser = trt.OnnxParser(network, logger)
    _parse(parser, onnx_path, trt.__version__)
    _keep_logits_fp32(network, plan_cfg)
    config = _configure(builder, plan_cfg, workspace, opt_level)
    _add_profiles(builder, network, config, profiles)
    cache = _attach_timing_cache(config, cache_path, say)
    monitor = _attach_progress_monitor(config, say)
    plan: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        raise ToolkitError(f"TensorRT could not build the engine:\n  {sink.tail()}",
                           hint=f"the full log is {out_dir / BUILD_LOG}; on a small board, stop "
                                "other programs (the build needs several times the model's size)")
    n = write_atomic(out_dir / PLAN_FILE, memoryview(plan))  # IHostMemory: the buffer protocol
    write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    del monitor, cache, config, parser, network, builder  # free build memory before loading
    _write_layer_info(plan, logger, out_dir / LAYERS_FILE)
    return n


def _identity(trt_version: str, device: DeviceIdentity, precision: str,
              profiles: list[ProfileShapes], onnx_path: Path) -> EngineIdentity:
    return EngineIdentity(
        tensorrt_version=trt_version, gpu_name=device.gpu_name or "unknown",
        compute_capability=device.compute_capability or "unknown", jetpack=device.jetpack,
        l4t=device.l4t, precision=precision, profiles=[p.to_json() for p in profiles],
        source_onnx_sha256=sha256_file(onnx_path))


def _mib(n: int | None) -> str:
    return "TensorRT's default" if n is None else f"{n / (1 << 20):.0f} MiB"
