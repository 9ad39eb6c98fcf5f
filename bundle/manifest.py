"""manifest.json: what a bundle is, as typed records; written by the host, read by the device.

A bundle is a folder:
    manifest.json        this record, written last (its presence marks a complete bundle)
    model.onnx           the graph (+ model.onnx.data when weights are external)
    tokenizer/           tokenizer files and chat_template.jinja (language models)
    report.md            the human-readable convert report
    engines/             TensorRT engines built on the device (not hashed: device-local)

Every file except manifest.json and engines/ is listed in `files` with its SHA-256 and size, so
a modified, truncated or missing file is found before anything is loaded.

Every fact is stored once. The cache layout (layers, kv heads, head_dim) is the model's dims
plus `max_seq` and the contract's `kv_dtype` (Manifest.kv_layout()); a decoder's input and
output tensors follow from the same facts (Manifest.decoder_contract()), so neither is stored.
What a board needs to know about its target (TensorRT version, GPU, memory, the engine
builder's workspace) is in the target record, so the device never reads the host's target
catalogue. docs/manifest.schema.json is generated from these records (python -m bundle.schema).

Schema versions: 1 (toolkit 0.1: nested dicts, max_seq stored three times) is read through
`migrate_v1`; 2 is this. A newer schema is refused with "upgrade the toolkit".
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from bundle import __version__
from bundle.contract import (
    DECODER_CONTRACT,
    ENCODER_CONTRACT,
    GENERIC_CONTRACT,
    DecoderContract,
    KVCacheLayout,
)
from bundle.errors import ToolkitError
from bundle.records import RecordError, decode, encode

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
UNHASHED_DIRS = ("engines",)  # device-local artefacts, rebuilt per device

Kind = Literal["decoder", "encoder", "generic"]


# --- the model ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDims:
    """The normalised dimensions every stage reads (never the raw Hugging Face config)."""

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    max_positions: int
    norm_eps: float
    tie_embeddings: bool
    rope_theta: float | None = None
    sliding_window: int | None = None  # of the layers that slide (models/params.py says which)
    mlp_matrices: int = 3  # 3: gated (gate, up, down); 2: plain (fc1, fc2)

    COUNTS = ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab_size",
              "max_positions", "mlp_matrices")

    def __post_init__(self) -> None:
        # A damaged manifest (the file itself is not hashed) must fail here, in one line, not as
        # a negative-sized array or an allocation of terabytes in a runtime later on.
        for name in self.COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RecordError(f"dims.{name} is {value!r}; it must be a whole number of 1 or more",
                                  hint="the manifest is damaged; convert the model again")
        if not 0 <= self.norm_eps < math.inf:
            raise RecordError(f"dims.norm_eps is {self.norm_eps!r}; it must be a finite number, 0 or "
                              "more", hint="the manifest is damaged; convert the model again")

    @property
    def params(self) -> int:
        """Matmul + embedding parameters (norms and biases ignored: < 0.1 %)."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = self.mlp_matrices * self.hidden * self.intermediate
        emb = self.vocab_size * self.hidden * (1 if self.tie_embeddings else 2)
        return self.num_layers * (attn + mlp) + emb

    def kv_layout(self, max_seq: int, dtype: str = "float32") -> KVCacheLayout:
        """The static cache of this model at `max_seq` positions: the one place the layout is
        built from the dimensions (the manifest, the export's parity check, the fit plan)."""
        return KVCacheLayout(self.num_layers, self.kv_heads, max_seq, self.head_dim, dtype)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PackageRef:
    """The PyPI package a packaged model came from."""

    name: str
    version: str


@dataclass(frozen=True)
class Source:
    """Where the model came from: kind ("hf", "gguf", "onnx"), name, path and SHA-256."""

    kind: str
    name: str
    path: str
    sha256: str | None = None
    package: PackageRef | None = None


@dataclass(frozen=True)
class Architecture:
    """The model's architecture: its Hugging Face model_type, ArchSpec family and dimensions."""

    model_type: str
    family: str
    dims: ModelDims
    attention: str | None = None  # how the graph expresses attention, and what fell back to plain ops


# --- the graph's IO contract (bundle/contract.py explains it) ------------------------------------
@dataclass(frozen=True)
class GraphTensor:
    """An input or output of a graph whose IO is not derived from dims (encoders, ONNX graphs
    bundled as-is): name, numpy dtype name, shape (symbolic axes are strings)."""

    name: str
    dtype: str
    shape: list[str | int]


@dataclass(frozen=True)
class Contract:
    """The graph's IO contract. Decoders: the cache update and the cache dtype; their tensors
    follow from the dims (Manifest.decoder_contract()). Graphs bundled as-is: their tensors."""

    name: Literal["static-kv-v1", "encoder-v1", "onnx-passthrough-v1"]
    opset: int
    cache_update: Literal["in-place", "host-writes-new"] | None = None
    kv_dtype: Literal["float32", "float16", "bfloat16"] | None = None
    inputs: list[GraphTensor] | None = None
    outputs: list[GraphTensor] | None = None


# --- the target --------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineRecord:
    """What the device does before serving: build a TensorRT engine at first load, or nothing.
    workspace_bytes is the builder's WORKSPACE pool limit (None: TensorRT's default)."""

    status: Literal["build-on-device", "not-needed"]
    why: str
    workspace_bytes: int | None = None


@dataclass(frozen=True)
class TargetRecord:
    """The target the bundle was made for: what a board checks and builds against, copied from
    targets/<name>.toml at convert time. memory_bytes None: the host's own memory (cpu)."""

    name: str
    family: str
    runtime: Literal["onnxruntime", "tensorrt"]
    engine: EngineRecord
    memory_bytes: int | None = None
    os_reserve_bytes: int = 0
    tensorrt: str | None = None  # major.minor the engine must be built with
    jetpack: str | None = None
    compute_capability: str | None = None

    @property
    def builds_on_device(self) -> bool:
        return self.runtime == "tensorrt"


# --- records of what was checked --------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerRecord:
    """The tokenizer folder, chat template and the ids that stop generation."""

    path: str
    chat_template: str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop_tokens: list[str] = field(default_factory=list)
    bos_token_id: int | None = None
    add_bos: bool = False


@dataclass(frozen=True)
class Pooling:
    """Sentence-embedding pooling the runtime applies to an encoder's last_hidden_state."""

    mode: Literal["mean", "cls", "max"]
    normalize: bool
    source: str = ""


@dataclass
class ParityCheck:
    name: str
    ok: bool
    detail: str


@dataclass
class Parity:
    """The exported graph against PyTorch: each check, the largest logits difference and
    whether greedy tokens were identical."""

    passed: bool
    checks: list[ParityCheck] = field(default_factory=list)
    max_abs_logits_diff: float | None = None
    greedy_match: bool | None = None
    greedy_tokens: int | None = None
    tolerance: float | None = None
    note: str = ""

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(ParityCheck(name, bool(ok), detail))
        self.passed = self.passed and bool(ok)

    def raise_if_failed(self, what: str) -> None:
        if not self.passed:
            failed = "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)
            raise ToolkitError(f"parity failed for {what}: {failed}",
                               hint="the exported graph does not reproduce the PyTorch model; "
                                    "no bundle was written. Please report this with the model.")


@dataclass(frozen=True)
class Components:
    """Bytes of memory a decoder needs on its target, by component (targets/plan.py)."""

    weights: int
    kv_cache: int
    activations: int
    runtime: int
    os_reserve: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime + self.os_reserve


@dataclass(frozen=True)
class Speed:
    """The roofline estimate of one plan row."""

    decode_tokens_s: float  # per sequence; the batch decodes `batch` of these per step
    decode_bound: Literal["memory", "compute"]  # which roof the decode step hits
    decode_bytes_per_step: int
    prefill_tokens: int  # a prompt that fills the context
    prefill_s: float  # lower bound: dense peak, perfect overlap


@dataclass(frozen=True)
class PlanRow:
    """One precision on the target: memory by component and the roofline speed."""

    precision: str
    format: str
    bytes_per_param: float
    components: Components
    speed: Speed


@dataclass(frozen=True)
class PlanRecord:
    """The fit plan made at convert time (toolkit plan): every precision's memory need on the
    target, the verdict for `precision`, and the limits that would fit. A board checks the row
    of the bundle's precision against its own memory (device/serve/deploy.py)."""

    precision: str
    memory_total: int
    memory_source: Literal["target", "host MemTotal"]
    fits: bool
    explanation: str
    rows: list[PlanRow]
    prefill_chunk: int | None = None
    best_precision: str | None = None
    max_seq_fit: int | None = None
    batch_fit: int | None = None
    chunk_fit: int | None = None
    fallback_precision: str | None = None
    fallback_max_seq: int | None = None
    warnings: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    def row(self, precision: str) -> PlanRow | None:
        return next((r for r in self.rows if r.precision == precision), None)


@dataclass(frozen=True)
class GateRecord:
    """The accuracy gate: the quantized graph against its fp32 bundle on held-out text."""

    passed: bool
    failures: list[str]
    thresholds: dict[str, float | None]
    heldout: str
    runtime: str
    ppl_fp32: float | None = None
    ppl_quantized: float | None = None
    ppl_increase: float | None = None
    top1_agreement: float | None = None
    tokens: int | None = None
    greedy_fraction: float | None = None
    greedy: list[dict[str, Any]] | None = None
    cosine_min: float | None = None
    cosine_mean: float | None = None
    sentences: int | None = None


@dataclass(frozen=True)
class SourceBundle:
    """The fp32 bundle a quantized bundle was made from."""

    name: str
    created_at: str
    model_sha256: str | None = None


@dataclass
class Quantization:
    """How the weights were quantized (format, options, calibration) and the gate's verdict.
    details, options and calibration are the format's own figures (quantize/formats.py)."""

    format: str
    runtime: str
    summary: str
    source_bundle: SourceBundle
    options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    gate: GateRecord | None = None
    forced: bool = False
    grid_choice: dict[str, Any] | None = None
    tensorrt: dict[str, Any] | None = None


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


# --- the manifest ----------------------------------------------------------------------------
@dataclass
class Manifest:
    """A bundle: what it is, what it was checked against, and the hash of every file."""

    kind: Kind
    source: Source
    contract: Contract
    precision: str  # "fp32" | "fp16" | "int8" | "int4" | "fp8" | "as-is"
    target: TargetRecord
    max_seq: int  # the static KV capacity per slot (0: not a decoder)
    batch: int  # KV slots the graph (and a TensorRT profile) is made for
    architecture: Architecture | None = None  # None: an ONNX graph bundled as-is
    model_file: str = "model.onnx"
    tokenizer: TokenizerRecord | None = None
    pooling: Pooling | None = None
    parity: Parity | None = None
    quantization: Quantization | None = None
    plan: PlanRecord | None = None
    trt_check: TrtCheck | None = None  # Jetson bundles: the offline TensorRT parser check
    files: dict[str, FileEntry] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    toolkit_version: str = __version__
    created_at: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.batch, bool) or self.batch < 1:
            raise RecordError(f"manifest.batch is {self.batch!r}; a bundle has at least 1 slot",
                              hint="the manifest is damaged; convert the model again")
        if self.kind == "decoder":  # its cache holds 1 to max_positions tokens (convert caps it)
            top = self.architecture.dims.max_positions if self.architecture is not None else None
            if not 1 <= self.max_seq <= (top or self.max_seq):
                raise RecordError(f"manifest.max_seq is {self.max_seq!r}; this decoder's cache holds "
                                  f"{f'1 to {top}' if top else '1 or more'} tokens",
                                  hint="the manifest is damaged; convert the model again")
        elif self.max_seq < 0:
            raise RecordError(f"manifest.max_seq is {self.max_seq!r}; it cannot be negative",
                              hint="the manifest is damaged; convert the model again")
        named = [*self.bundle_paths(), *(("files", rel) for rel in self.files)]
        for where, rel in named:
            if problem := relpath_problem(rel):
                raise RecordError(f"manifest.{where} {rel!r} {problem}",
                                  hint="a manifest may only name files inside its bundle")

    def unhashed_paths(self) -> list[str]:
        """The paths the manifest names that its `files` list does not hash, as sentences: a
        file no hash covers could be swapped for anything. (Checked when a manifest is read;
        a manifest being built has no hashes yet.)"""
        problems = []
        for where, rel in self.bundle_paths():
            covered = rel in self.files
            if where == "tokenizer.path":  # a folder: it must hold hashed files
                covered = any(f.startswith(rel + "/") for f in self.files)
            if not covered:
                problems.append(f"manifest.{where} {rel!r} is not among the hashed files")
        return problems

    def bundle_paths(self) -> list[tuple[str, str]]:
        """(field, relative path) of every file the manifest names outside `files`."""
        paths = [("model_file", self.model_file)]
        if self.tokenizer is not None:
            paths.append(("tokenizer.path", self.tokenizer.path))
            if self.tokenizer.chat_template:
                paths.append(("tokenizer.chat_template", self.tokenizer.chat_template))
        return paths

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def dims(self) -> ModelDims:
        if self.architecture is None:
            raise ToolkitError(f"bundle {self.name} ({self.kind}) records no model dimensions")
        return self.architecture.dims

    def kv_layout(self) -> KVCacheLayout:
        """The runtime's static cache: one K and one V buffer per layer."""
        if self.kind != "decoder" or self.contract.kv_dtype is None:
            raise ToolkitError(f"bundle {self.name} is a {self.kind}: it has no KV cache")
        return self.dims.kv_layout(self.max_seq, self.contract.kv_dtype)

    def decoder_contract(self) -> DecoderContract:
        """The decoder graph's inputs and outputs, every name and shape (bundle/contract.py)."""
        kv = self.kv_layout()
        return DecoderContract(kv.num_layers, kv.kv_heads, kv.head_dim, kv.max_seq,
                               self.dims.vocab_size, kv.dtype,
                               in_place=self.contract.cache_update == "in-place")

    def io_json(self) -> dict[str, Any]:
        """The IO contract spelled out (report.md, `toolkit check`)."""
        if self.contract.name == DECODER_CONTRACT:
            return {**self.decoder_contract().to_json(), "opset": self.contract.opset}
        return encode(self.contract)  # type: ignore[no-any-return]

    def to_json(self) -> str:
        return json.dumps(encode(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "manifest") -> Manifest:
        """Read a manifest of any schema this toolkit knows (older ones are migrated)."""
        if not isinstance(data, dict) or not isinstance(data.get("schema_version"), int):
            raise RecordError(f"{where} is not a toolkit manifest (no integer schema_version)")
        version = data["schema_version"]
        if version > SCHEMA_VERSION:
            raise ToolkitError(f"{where} has schema version {version}; this toolkit reads up to "
                               f"{SCHEMA_VERSION}", hint="upgrade the toolkit on this machine")
        if version < 1:
            raise ToolkitError(f"{where} has schema version {version}, which no toolkit wrote",
                               hint="re-convert the model with `toolkit convert`")
        if version == 1:
            data = migrate_v1(data, where)
        manifest = decode(cls, data, where)
        if problems := manifest.unhashed_paths():
            raise RecordError(f"{where}: {'; '.join(problems)}",
                              hint="every file a bundle uses must be listed in `files` with its hash; "
                                   "re-convert the model with `toolkit convert`")
        if manifest.kind == "decoder" and (manifest.architecture is None
                                           or manifest.contract.kv_dtype is None):
            raise RecordError(f"{where}: a decoder needs architecture.dims and contract.kv_dtype")
        return manifest


def relpath_problem(rel: str) -> str | None:
    """Why `rel` may not name a file inside a bundle (None: it may)."""
    p = PurePosixPath(rel)
    if not rel or "\\" in rel or "\x00" in rel:
        return "is not a plain relative path"
    if p.is_absolute():
        return "is an absolute path"
    if ".." in p.parts:
        return "leaves the bundle folder (..)"
    if str(p) != rel or rel == ".":  # 'a//b', './a', 'a/': one file must have one name
        return f"is not normalised (write {str(p)!r})"
    return None


# --- schema 1 (toolkit 0.1) ------------------------------------------------------------------
def migrate_v1(data: dict[str, Any], where: str = "manifest") -> dict[str, Any]:
    """A schema-1 manifest as schema 2. What 0.1 stored twice is taken from one place and
    checked against the other; what 0.1 did not record (the target's memory, the builder's
    workspace) is left unset, so a board uses TensorRT's defaults. Whatever cannot be read
    is refused with "re-convert"."""
    try:
        return _migrate_v1(data)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ToolkitError(f"{where} is a schema-1 manifest this toolkit cannot migrate ({e!r})",
                           hint="re-convert the model with `toolkit convert`") from e


def _migrate_v1(v1: dict[str, Any]) -> dict[str, Any]:
    kind = v1["kind"]
    arch = v1.get("architecture") or {}
    contract_v1 = dict(v1["contract"])
    kv = v1.get("kv_cache") or {}
    max_seq = int(v1["max_seq"])
    if kind == "decoder" and kv and int(kv.get("max_seq", max_seq)) != max_seq:
        raise ValueError(f"kv_cache.max_seq {kv.get('max_seq')} != max_seq {max_seq}")
    contract: dict[str, Any] = {"name": contract_v1["name"], "opset": int(contract_v1.get("opset", 17))}
    if contract_v1["name"] == DECODER_CONTRACT:
        contract["cache_update"] = contract_v1.get("cache_update", "host-writes-new")
        contract["kv_dtype"] = kv.get("dtype", "float32")
    elif contract_v1["name"] in (ENCODER_CONTRACT, GENERIC_CONTRACT):
        contract["inputs"] = [_tensor_v1(t) for t in contract_v1.get("inputs", [])]
        contract["outputs"] = [_tensor_v1(t) for t in contract_v1.get("outputs", [])]
    else:
        raise ValueError(f"unknown contract {contract_v1['name']!r}")
    t = v1["target"]
    engine = dict(t.get("engine") or {})
    target = {"name": t["name"], "family": t["family"], "runtime": t["runtime"],
              "engine": {"status": engine.get("status", "not-needed"), "why": engine.get("why", "")},
              "tensorrt": engine.get("tensorrt"), "jetpack": engine.get("jetpack"),
              "compute_capability": engine.get("compute_capability")}
    quant = v1.get("quantization")
    if quant is not None:
        quant = {k: v for k, v in quant.items() if k != "precision"}
    out: dict[str, Any] = {k: v1[k] for k in ("kind", "source", "precision", "max_seq", "batch", "files",
                              "toolkit_version", "created_at") if k in v1}
    out.update(schema_version=SCHEMA_VERSION, contract=contract, target=target,
               model_file=v1.get("model_file", "model.onnx"), tokenizer=v1.get("tokenizer"),
               pooling=v1.get("pooling"), parity=v1.get("parity"), quantization=quant,
               plan=_plan_v1(v1.get("plan")),
               architecture=({"model_type": arch["model_type"], "family": arch.get("family", ""),
                              "dims": arch["dims"]} if arch.get("dims") else None))
    return out


def _tensor_v1(t: dict[str, Any]) -> dict[str, Any]:
    """0.1 wrote encoder tensors with a dtype name, passthrough ones with an ONNX elem_type."""
    if "dtype" in t:
        return {"name": t["name"], "dtype": t["dtype"], "shape": t["shape"]}
    names = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
             10: "float16", 11: "float64", 16: "bfloat16"}
    return {"name": t["name"], "dtype": names.get(int(t["elem_type"]), f"onnx:{t['elem_type']}"),
            "shape": t["shape"]}


def _plan_v1(plan: dict[str, Any] | None) -> dict[str, Any] | None:
    if not plan:
        return None
    fallback = plan.get("fallback") or [None, None]
    rows = [{"precision": r["precision"], "format": r["format"],
             "bytes_per_param": r["bytes_per_param"],
             "components": {k: v for k, v in r["components"].items() if k != "total"},
             "speed": r["speed"]} for r in plan.get("rows", [])]
    return {"precision": plan["precision"], "memory_total": plan["memory_total"],
            "memory_source": plan["memory_source"], "fits": plan["fits"],
            "explanation": plan.get("explanation", ""), "rows": rows,
            "prefill_chunk": plan.get("prefill_chunk"), "best_precision": plan.get("best_precision"),
            "max_seq_fit": plan.get("max_seq_fit"), "batch_fit": plan.get("batch_fit"),
            "chunk_fit": plan.get("chunk_fit"), "fallback_precision": fallback[0],
            "fallback_max_seq": fallback[1], "warnings": plan.get("warnings", []),
            "assumptions": plan.get("assumptions", [])}


# --- reading, hashing, verifying --------------------------------------------------------------
BlockHook = Callable[[str, bytes], None]  # (relative path, block) for each block hashed


def sha256_file(path: Path, chunk: int = 1 << 20, on_block: Callable[[bytes], None] | None = None) -> str:
    """Hex SHA-256 of a file, read in blocks of `chunk` bytes from offset 0; `on_block` sees each
    block (the deploy computes its per-chunk CRC32s in the same pass)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_block is not None:
                on_block(block)
    return h.hexdigest()


def hash_tree(root: Path, block: int = 1 << 20, on_block: BlockHook | None = None) -> dict[str, FileEntry]:
    """SHA-256 and size of every file under root except the manifest and device-local dirs."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel == MANIFEST or rel.split("/")[0] in UNHASHED_DIRS:
            continue
        hook = (lambda data, rel=rel: on_block(rel, data)) if on_block is not None else None
        entries[rel] = FileEntry(sha256=sha256_file(path, block, hook), bytes=path.stat().st_size)
    return entries


def parse_manifest(text: str | bytes, where: str = "manifest") -> Manifest:
    """manifest.json's bytes as a Manifest; ToolkitError for anything that is not one."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int > 4300 digits
        raise ToolkitError(f"{where} is not valid JSON: {e}", hint="re-run `toolkit convert`") from e
    return Manifest.from_dict(data, where)


def read_manifest(bundle: Path) -> Manifest:
    """Parse manifest.json; a missing, unreadable, malformed or newer-schema manifest is a
    ToolkitError."""
    path = Path(bundle) / MANIFEST
    if not Path(bundle).exists():
        raise ToolkitError(f"{bundle} does not exist", hint="pass the folder `toolkit convert` wrote")
    if not path.is_file():
        raise ToolkitError(f"{bundle} is not a bundle: it has no {MANIFEST}",
                           hint="pass the folder `toolkit convert` wrote")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ToolkitError(f"cannot read {path}: {e.strerror or e}") from e
    return parse_manifest(raw, str(path))


def verify_files(bundle: Path, manifest: Manifest, block: int = 1 << 20,
                 on_block: BlockHook | None = None) -> list[str]:
    """Every problem with the bundle's files, as sentences; an empty list means intact."""
    bundle = Path(bundle)
    problems: list[str] = []
    actual = hash_tree(bundle, block, on_block)
    for rel, entry in manifest.files.items():
        got = actual.get(rel)
        if got is None:
            problems.append(f"{rel} is missing")
        elif got.bytes != entry.bytes:
            problems.append(f"{rel} has {got.bytes} bytes, the manifest says {entry.bytes}")
        elif got.sha256 != entry.sha256:
            problems.append(f"{rel} was modified (SHA-256 {got.sha256[:12]}…, "
                            f"manifest {entry.sha256[:12]}…)")
    for rel in sorted(set(actual) - set(manifest.files)):
        problems.append(f"{rel} is not listed in the manifest")
    return problems


def load_verified(bundle: Path) -> Manifest:
    """read_manifest + verify_files, raising one ToolkitError that lists every problem."""
    manifest = read_manifest(bundle)
    check_intact(bundle, manifest)
    return manifest


def check_intact(bundle: Path, manifest: Manifest, block: int = 1 << 20,
                 on_block: BlockHook | None = None) -> None:
    """verify_files for a manifest already read; one ToolkitError that lists every problem.
    `on_block` sees each block hashed (the deploy computes its chunk CRC32s in that pass)."""
    problems = verify_files(bundle, manifest, block, on_block)
    if problems:
        listed = "\n  - ".join(problems)
        raise ToolkitError(f"bundle {bundle} failed verification:\n  - {listed}",
                           hint="the bundle was changed after it was written; convert it again "
                                "or deploy a fresh copy")


# --- the offline TensorRT parser check (convert/trt_check.py) ---------------------------------
@dataclass(frozen=True)
class TrtCheck:
    """The graph against the ONNX parser rules of each TensorRT version its target names
    (convert/trt_rules/tensorrt-<version>.toml): passed, or the offending nodes, one line each.
    forced: written anyway with --force. violations keeps the first 100 lines of violation_count."""

    tensorrt: list[str]
    passed: bool
    rules: list[str]
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    forced: bool = False

    def summary(self) -> str:
        """One line for report.md."""
        verdict = ("passed" if self.passed else
                   f"FAILED, {self.violation_count} offending node line(s)"
                   + (" (written with --force)" if self.forced else ""))
        return (f"TensorRT {', '.join(self.tensorrt)} ONNX parser check (offline, `toolkit check`): "
                f"{verdict}")
