"""Who built a TensorRT engine, and can this device load it? Pure Python: no TensorRT import here.

A TensorRT plan only runs on the TensorRT version and GPU that built it (tensorrt_jetson.md §1.8,
§8 pitfall 11), so every engine a bundle carries has a record beside it:

    bundle/engines/<key>/engine.plan    the serialized engine
    bundle/engines/<key>/engine.json    EngineIdentity: TensorRT version, GPU, JetPack/L4T,
                                        precision, optimization profiles, SHA-256 of model.onnx
    bundle/engines/<key>/layers.json    the engine inspector's layer information
    bundle/engines/<key>/build.log      TensorRT's log of the build

`<key>` names the GPU kind (engine_key), not the TensorRT version: a JetPack upgrade on the same
board finds the old engine, and `compare` says exactly what changed and what to run, instead of
silently spending minutes (and gigabytes) on a rebuild at daemon start.

Device facts come from three places, each optional (a None field means "not found here"):
/etc/nv_tegra_release (the L4T release, hence JetPack), `tensorrt.__version__`, and pycuda's view
of GPU 0 (name, compute capability).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundle.errors import ToolkitError

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
ENGINES_DIR = "engines"  # inside a bundle; not hashed by the manifest (device-local)
PLAN_FILE = "engine.plan"
IDENTITY_FILE = "engine.json"
LAYERS_FILE = "layers.json"
BUILD_LOG = "build.log"

REBUILD_HINT = ("rebuild with `toolkit compile BUNDLE` on this device, or start the daemon with "
                "--rebuild-on-mismatch")

# L4T (Jetson Linux) release -> JetPack, from tensorrt_jetson.md §5.2. Exact releases first,
# then "major.minor" and "major" prefixes for the rows the table gives as ranges.
_JETPACK_EXACT = {
    "35.4.1": "5.1.2",
    "35.6.4": "5.1.6",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
    "38.2.0": "7.0",
    "38.2.1": "7.0",
    "38.4.0": "7.1",
}
_JETPACK_PREFIX = {
    "36.3": "6.0",
    "38.2": "7.0",
    "38.4": "7.1",
    "35": "5.1",  # 5.1.x: 35.x; the table names only 35.4.1 and 35.6.4 exactly
    "39": "7.2",  # 39.0 EA, 39.x GA (community maps disagree on 39.1 vs 39.2)
}


# --- /etc/nv_tegra_release -------------------------------------------------------------------
@dataclass(frozen=True)
class L4TRelease:
    """One parsed nv_tegra_release: "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: ..." """

    major: int  # 36
    revision: str  # "4.3"
    board: str | None = None
    eabi: str | None = None
    gcid: str | None = None
    date: str | None = None

    @property
    def version(self) -> str:
        """Three-part L4T version: R36 + REVISION 4.3 -> "36.4.3"; R38 + 2.0 -> "38.2.0"."""
        parts = [str(self.major), *self.revision.split(".")]
        while len(parts) < 3:
            parts.append("0")
        return ".".join(parts[:3])


_RELEASE_RE = re.compile(r"#\s*R(?P<major>\d+)\s*\((?P<kind>[^)]*)\)\s*,\s*REVISION:\s*(?P<rev>[\d.]+)")
_FIELD_RE = re.compile(r"\b(GCID|BOARD|EABI|DATE):\s*([^,]*?)\s*(?=,\s*[A-Z_]+:|$)")


def parse_nv_tegra_release(text: str) -> L4TRelease:
    """Parse the first line of /etc/nv_tegra_release. Anything else is a ToolkitError naming the
    text, since a device we cannot identify must not be matched against an engine."""
    for line in text.splitlines():
        m = _RELEASE_RE.search(line)
        if not m:
            continue
        fields = {k: v for k, v in _FIELD_RE.findall(line)}
        return L4TRelease(major=int(m["major"]), revision=m["rev"].strip("."),
                          board=fields.get("BOARD"), eabi=fields.get("EABI"),
                          gcid=fields.get("GCID"), date=fields.get("DATE"))
    first = text.strip().splitlines()[0] if text.strip() else "(empty)"
    raise ToolkitError(f"cannot read the L4T release from nv_tegra_release: {first!r}",
                       hint="expected a line like '# R36 (release), REVISION: 4.3, ...'")


def l4t_to_jetpack(l4t: str) -> str | None:
    """JetPack version for an L4T version ("36.4.3" -> "6.2"); None when the table lacks it."""
    parts = l4t.split(".")
    full = ".".join((parts + ["0", "0"])[:3])
    if full in _JETPACK_EXACT:
        return _JETPACK_EXACT[full]
    return _JETPACK_PREFIX.get(".".join(parts[:2])) or _JETPACK_PREFIX.get(parts[0])


# --- this device -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceIdentity:
    tensorrt_version: str | None = None  # "10.3.0.30"
    gpu_name: str | None = None  # "Orin"
    compute_capability: str | None = None  # "8.7"
    jetpack: str | None = None  # "6.2"
    l4t: str | None = None  # "36.4.3"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def detect_device(tegra_release: Path = TEGRA_RELEASE) -> DeviceIdentity:
    """What this machine offers; fields are None where the fact is not available (no Jetson,
    no TensorRT, no pycuda, no GPU). Never raises for a missing piece."""
    l4t = jetpack = None
    if tegra_release.is_file():
        try:
            release = parse_nv_tegra_release(tegra_release.read_text(encoding="utf-8",
                                                                     errors="replace"))
            l4t, jetpack = release.version, l4t_to_jetpack(release.version)
        except (OSError, ToolkitError):
            pass
    gpu_name, cc = _detect_gpu()
    return DeviceIdentity(_tensorrt_version(), gpu_name, cc, jetpack, l4t)


def _tensorrt_version() -> str | None:
    """TensorRT's version, or None without a usable TensorRT. `import tensorrt` alone is not
    proof: tensorrt-stubs installs a bare tensorrt/ folder of .pyi files, which Python imports
    as an empty namespace package."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):  # OSError: a wheel whose libnvinfer is missing
        return None
    version = getattr(trt, "__version__", None)
    return str(version) if version and hasattr(trt, "Builder") else None


def _detect_gpu() -> tuple[str | None, str | None]:
    """(name, "major.minor") of CUDA device 0 through pycuda, or (None, None)."""
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError):  # no pycuda, or no libcuda.so (no driver)
        return None, None
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return None, None
        dev = cuda.Device(0)
        major, minor = dev.compute_capability()
        return str(dev.name()), f"{major}.{minor}"
    except cuda.Error:  # driver present but no usable device
        return None, None


# --- an engine's identity --------------------------------------------------------------------
@dataclass
class EngineIdentity:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    jetpack: str | None
    l4t: str | None
    precision: str
    profiles: list[dict[str, Any]]  # trt_build.ProfileShapes.to_json() per profile, in order
    source_onnx_sha256: str
    built_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc)
                          .isoformat(timespec="seconds"))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> EngineIdentity:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("engine identity is not a JSON object")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, engine_dir: Path) -> Path:
        path = Path(engine_dir) / IDENTITY_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def load(cls, engine_dir: Path) -> EngineIdentity:
        path = Path(engine_dir) / IDENTITY_FILE
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, TypeError) as e:
            # ValueError covers json.JSONDecodeError; TypeError a missing field
            raise ToolkitError(f"{path} is unreadable or incomplete: {e}",
                               hint=REBUILD_HINT) from e


# --- comparing -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    field: str
    engine: str | None
    device: str | None
    message: str
    blocking: bool = True  # False: worth saying, but the engine still loads


def compare(engine: EngineIdentity, device: DeviceIdentity, onnx_sha: str, *,
            precision: str | None = None,
            profiles: list[dict[str, Any]] | None = None) -> list[Mismatch]:
    """Every difference between an engine and this device (and the bundle it serves), each with a
    sentence that says what differs and what to run. Blocking: TensorRT version, GPU, compute
    capability, model.onnx, precision, profiles. Not blocking: JetPack / L4T alone (same
    TensorRT and GPU load the plan; the note explains a later failure if the system changed)."""
    out: list[Mismatch] = []
    trt_e, trt_d = engine.tensorrt_version, device.tensorrt_version
    if trt_e != trt_d:
        have = trt_d or "no TensorRT"
        out.append(Mismatch("tensorrt_version", trt_e, trt_d,
                            f"engine built with TensorRT {trt_e}, this device has {have}: "
                            f"{REBUILD_HINT}"))
    if engine.gpu_name != device.gpu_name:
        out.append(Mismatch("gpu_name", engine.gpu_name, device.gpu_name,
                            f"engine built on GPU {engine.gpu_name!r}, this device has "
                            f"{device.gpu_name or 'no GPU'!r}: {REBUILD_HINT}"))
    if engine.compute_capability != device.compute_capability:
        out.append(Mismatch("compute_capability", engine.compute_capability,
                            device.compute_capability,
                            f"engine built for compute capability {engine.compute_capability}, "
                            f"this GPU is {device.compute_capability or 'unknown'}: "
                            f"{REBUILD_HINT}"))
    if engine.source_onnx_sha256 != onnx_sha:
        out.append(Mismatch("source_onnx_sha256", engine.source_onnx_sha256, onnx_sha,
                            f"engine built from a different model.onnx (SHA-256 "
                            f"{engine.source_onnx_sha256[:12]}…, the bundle's is {onnx_sha[:12]}…):"
                            f" the bundle was converted again; {REBUILD_HINT}"))
    if precision is not None and engine.precision != precision:
        out.append(Mismatch("precision", engine.precision, precision,
                            f"engine built for {engine.precision}, the bundle is {precision}: "
                            f"{REBUILD_HINT}"))
    if profiles is not None and engine.profiles != profiles:
        out.append(Mismatch("profiles", json.dumps(engine.profiles), json.dumps(profiles),
                            f"engine optimization profiles {_brief(engine.profiles)} differ from "
                            f"the bundle's (max_seq/batch) {_brief(profiles)}: {REBUILD_HINT}"))
    out += _system_notes(engine, device)
    return out


def _system_notes(engine: EngineIdentity, device: DeviceIdentity) -> list[Mismatch]:
    notes = []
    for name, label in (("jetpack", "JetPack"), ("l4t", "L4T")):
        e, d = getattr(engine, name), getattr(device, name)
        if e != d:
            notes.append(Mismatch(name, e, d, blocking=False, message=(
                f"engine built on {label} {e or 'unknown'}, this device runs {d or 'unknown'} "
                "(same TensorRT and GPU, so it loads; if it fails, " + REBUILD_HINT + ")")))
    return notes


def _brief(profiles: list[dict[str, Any]]) -> str:
    return "; ".join(f"{p.get('name')}: batch {p.get('batch')} seq {p.get('seq')}" for p in profiles)


# --- keys --------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def engine_key(gpu_name: str, compute_capability: str) -> str:
    """engines/<key>: one engine per GPU kind, e.g. ("Orin", "8.7") -> "sm87-orin"."""
    return f"sm{compute_capability.replace('.', '')}-{_slug(gpu_name)}"


def timing_cache_key(target_name: str, tensorrt_version: str,
                     compute_capability: str | None) -> str:
    """A timing cache is only valid for one TensorRT version and GPU (its header carries the
    device properties, tensorrt_jetson.md §1.3), and we keep one per target as well:
    ("jetson-orin-nano-8gb", "10.3.0.30", "8.7") -> "jetson-orin-nano-8gb_trt10.3.0.30_sm87"."""
    cc = compute_capability.replace(".", "") if compute_capability else "unknown"
    return f"{_slug(target_name)}_trt{tensorrt_version}_sm{cc}"
