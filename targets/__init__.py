"""Deployment targets: one TOML data file per target in this folder, read into `Target` records.

    t = load_target("jetson-orin-nano-8gb")
    t.check_precision("fp8")        # ToolkitError: fp8 needs ..., this target runs fp32, fp16, ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from toolkit.errors import ToolkitError

TARGET_DIR = Path(__file__).parent
DEFAULT_TARGET = "cpu"


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
    notes: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()

    @property
    def builds_on_device(self) -> bool:
        """TensorRT engines only run on the TensorRT version and GPU that built them."""
        return self.runtime == "tensorrt"

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise ToolkitError(
                f"target {self.name} cannot run {precision}; it runs {', '.join(self.precisions)}",
                hint=f"choose one of those precisions (`toolkit targets show {self.name}` explains)")

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def list_targets() -> list[Target]:
    return [load_target(p.stem) for p in sorted(TARGET_DIR.glob("*.toml"))]


def load_target(name: str) -> Target:
    path = TARGET_DIR / f"{name}.toml"
    if not path.is_file() or "/" in name:
        known = ", ".join(p.stem for p in sorted(TARGET_DIR.glob("*.toml")))
        raise ToolkitError(f"unknown target {name!r}; known targets: {known}",
                           hint="`toolkit targets` lists them with what each can run")
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    for key in ("precisions", "arch", "notes", "sources"):
        if key in data:
            data[key] = tuple(data[key])
    try:
        return Target(**data)
    except TypeError as e:  # a data file with a missing or unknown field is our bug, say which
        raise ToolkitError(f"target file {path} is malformed: {e}") from e
