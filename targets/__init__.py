"""Deployment targets: one TOML data file per target in this folder, read into `Target` records.

    t = load_target("jetson-orin-nano-8gb")
    t.check_precision("fp8")        # ToolkitError: fp8 needs ..., this target runs fp32, fp16, ...
"""

from __future__ import annotations

try:  # Python 3.11+; JetPack 6's Python 3.10 reads TOML with tomli (the same parser, pre-stdlib)
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[no-redef]
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundle.errors import ToolkitError
from bundle.manifest import EngineRecord, TargetRecord

TARGET_DIR = Path(__file__).parent
DEFAULT_TARGET = "cpu"
MIN_MAX_SEQ = 16  # the shortest static cache convert builds (and plan sizes)

# Every precision a target file may name, most accurate first (a target lists a subset, in order).
PRECISIONS = ("fp32", "fp16", "fp8", "int8", "int4")
FLOAT_DTYPES = ("float32", "float16")
GIB = 1 << 30  # memory_gb and os_reserve_gb are binary GB (DRAM is sold in powers of two)
# Builder scratch (WORKSPACE pool) as a share of the memory left after the OS reserve. On unified
# memory (every Jetson, tensorrt_jetson.md §5.1) the build also holds the parsed weights and the
# engine under construction in that same DRAM, and TensorRT's own TACTIC_DRAM pool defaults to
# 75 % of it (§1.3); TensorRT's default WORKSPACE (all of the device's memory) lets it pick tactics
# whose scratch then cannot be allocated on an 8 GB board (§8 pitfall 16). A quarter (1.6 GiB on
# an 8 GB Orin) leaves three quarters for weights, engine and OS; whether it is ever the limit for
# a small decoder's GEMMs is UNVERIFIED on a device: build.log names tactics skipped for scratch.
# The bundle carries the result (TargetRecord.engine.workspace_bytes): the board builds with it.
WORKSPACE_FRACTION = 0.25
MIN_WORKSPACE = 256 << 20


@dataclass(frozen=True)
class Target:
    name: str
    family: str  # "cpu" | "jetson"
    runtime: str  # "onnxruntime" | "tensorrt"
    description: str
    precisions: tuple[str, ...]  # what it can run, most accurate first
    memory_bandwidth_gbs: float
    peak_tflops: dict[str, float]  # precision -> dense peak, for the roofline
    memory_gb: float | None = None  # None: the host's own memory (cpu target), read at run time
    unified_memory: bool = False
    os_reserve_gb: float = 0.0
    compute_capability: str | None = None
    jetpack: str | None = None
    l4t: str | None = None
    tensorrt: str | None = None
    cuda: str | None = None
    arch: tuple[str, ...] = ()
    formats: dict[str, str] = field(default_factory=dict)  # precision -> quantization format
    default_max_seq: int = 2048
    compute_dtype: str = "float32"  # activations and every tensor left unquantized
    kv_dtype: str = "float32"  # the static KV cache the runtime allocates
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def builds_on_device(self) -> bool:
        """TensorRT engines only run on the TensorRT version and GPU that built them."""
        return self.runtime == "tensorrt"

    @property
    def host_memory(self) -> bool:
        """True when the memory is the host's own (memory_gb unset: the cpu target)."""
        return self.memory_gb is None

    def max_seq_for(self, positions: int, rope_limit: int | None = None,
                    asked: int | None = None) -> int:
        """The max_seq a convert or plan uses: `asked`, or when none is asked the target's
        default, capped by the model's positions and by where its RoPE tables stop being static
        (models/params.py static_rope_limit); either checked against the model and MIN_MAX_SEQ.
        Convert and plan both call it, so a plan is never made for a cache convert would refuse."""
        seq = min(self.default_max_seq, positions, rope_limit or positions) if asked is None else asked
        if rope_limit and seq > rope_limit:
            raise ToolkitError(f"--max-seq {seq}: this model's RoPE scaling changes past "
                               f"{rope_limit} positions and cannot be baked into a static cache "
                               "longer than that",
                               hint=f"use --max-seq {rope_limit} or less")
        if seq > positions:
            raise ToolkitError(f"--max-seq {seq} is beyond the model's limit of {positions} "
                               "positions", hint=f"use --max-seq {positions} or less")
        if seq < MIN_MAX_SEQ:
            raise ToolkitError(f"--max-seq {seq} is too small (at least {MIN_MAX_SEQ})",
                               hint=f"use --max-seq {MIN_MAX_SEQ} or more")
        return seq

    def memory_total_bytes(self) -> int:
        """The target's memory; for memory_gb None, the host's MemTotal (psutil)."""
        if self.memory_gb is not None:
            return int(self.memory_gb * GIB)
        import psutil

        return int(psutil.virtual_memory().total)

    def os_reserve_bytes(self) -> int:
        return int(self.os_reserve_gb * GIB)

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            known = "" if precision in PRECISIONS else f" ({precision!r} is not a precision)"
            why = f"{self._why_not(precision)}; " if self._why_not(precision) else ""
            raise ToolkitError(
                f"target {self.name} cannot run {precision}{known}: {why}"
                f"this target runs {', '.join(self.precisions)}",
                hint=f"choose one of those precisions (`toolkit targets show {self.name}` explains)")

    def _why_not(self, precision: str) -> str:
        """The hardware reason a precision is absent, where there is one (tensorrt_jetson.md §2.3)."""
        if precision in ("fp8", "fp4") and self.compute_capability:
            return (f"{precision} needs compute capability >= 8.9 (Ada, Hopper, Blackwell, e.g. "
                    f"jetson-thor) and {self.name} is SM {self.compute_capability}; TensorRT "
                    "fails with 'Networks with FP8 Q/DQ layers require hardware with FP8 support'")
        if precision in ("fp16", "fp8") and self.runtime == "onnxruntime":
            return (f"ONNX Runtime's CPU provider implements few ops in {precision}, so the cpu "
                    "target runs fp32 or quantized weights")
        return ""

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    def workspace_bytes(self) -> int | None:
        """The TensorRT builder's WORKSPACE pool limit on this target: WORKSPACE_FRACTION of
        (memory - OS reserve), or None (TensorRT's default) when the memory is the host's."""
        if self.host_memory:
            return None
        usable = self.memory_total_bytes() - self.os_reserve_bytes()
        return max(MIN_WORKSPACE, int(usable * WORKSPACE_FRACTION))

    def record(self) -> TargetRecord:
        """What a bundle carries of its target (bundle/manifest.py): all a board needs to
        check and build against, so the device never reads this catalogue."""
        if self.builds_on_device:
            engine = EngineRecord(
                "build-on-device", "a TensorRT engine only runs on the TensorRT version and GPU "
                "that built it; the daemon builds it at first load (or `toolkit compile` on a "
                "matching host)", workspace_bytes=self.workspace_bytes())
        else:
            engine = EngineRecord("not-needed", "ONNX Runtime runs model.onnx directly")
        return TargetRecord(
            name=self.name, family=self.family, runtime=self.runtime,  # type: ignore[arg-type]
            engine=engine, memory_bytes=None if self.host_memory else self.memory_total_bytes(),
            os_reserve_bytes=self.os_reserve_bytes(), tensorrt=self.tensorrt, jetpack=self.jetpack,
            compute_capability=self.compute_capability)


def target_names() -> list[str]:
    return sorted(p.stem for p in TARGET_DIR.glob("*.toml"))


def list_targets() -> list[Target]:
    return [load_target(name) for name in target_names()]


def load_target(name: str) -> Target:
    path = TARGET_DIR / f"{name}.toml"
    if not path.is_file() or "/" in name:
        known = ", ".join(target_names())
        raise ToolkitError(f"unknown target {name!r}; known targets: {known}",
                           hint="`toolkit targets` lists them with what each can run")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for key in ("precisions", "arch", "notes", "sources"):
        if key in data:
            data[key] = tuple(data[key])
    try:
        target = Target(**data)
    except TypeError as e:  # a data file with a missing or unknown field is our bug, say which
        raise ToolkitError(f"target file {path} is malformed: {e}") from e
    problems = validate(target)
    if problems:
        raise ToolkitError(f"target file {path} is malformed: {'; '.join(problems)}")
    return target


def validate(t: Target) -> list[str]:
    """What is inconsistent in a target's data (an empty list when nothing is)."""
    problems = []
    if [p for p in PRECISIONS if p in t.precisions] != list(t.precisions):
        problems.append(f"precisions {list(t.precisions)} must be a subset of {list(PRECISIONS)}, "
                        "in that order (most accurate first)")
    if missing := [p for p in t.precisions if p not in t.peak_tflops]:
        problems.append(f"peak_tflops lacks {missing}")
    if extra := [p for p in t.formats if p not in t.precisions]:
        problems.append(f"formats names precisions it does not run: {extra}")
    if missing := [p for p in t.precisions if p not in t.formats and p not in ("fp32", "fp16")]:
        problems.append(f"no format for the quantized precisions {missing}")
    for name in ("compute_dtype", "kv_dtype"):
        if getattr(t, name) not in FLOAT_DTYPES:
            problems.append(f"{name} must be one of {FLOAT_DTYPES}")
    if t.family == "jetson" and (t.memory_gb is None or not t.unified_memory
                                 or t.os_reserve_gb <= 0 or t.tensorrt is None):
        problems.append("a jetson target needs memory_gb, unified_memory, os_reserve_gb, tensorrt")
    if t.memory_gb is not None and t.os_reserve_gb >= t.memory_gb:
        problems.append("os_reserve_gb leaves no memory")
    return problems
