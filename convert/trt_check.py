"""The offline TensorRT parser check: an ONNX graph against the operator matrix and importer
restrictions of one TensorRT version, without TensorRT.

The rules are data, one table per TensorRT version (convert/trt_rules/tensorrt-<major.minor>.toml,
each with its onnx-tensorrt source and the file:line it read); this module only applies them.

    report = check_bundle(Path("bundles/smollm2-135m-jetson-int4"))   # the target's TensorRT
    for line in report.lines(): print(line)     # one line per offending node
    record_or_refuse(staging / "model.onnx", manifest, force)   # convert/quantize, Jetson targets

What it proves: every node is one the 10.x parser imports, in the form its importer accepts. What
it cannot prove: that the builder then finds kernels (run a board for that; README "What ran where").
"""

from __future__ import annotations

try:  # Python 3.11+; JetPack 6's Python 3.10 reads TOML with tomli
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[no-redef,import-not-found,unused-ignore]
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from bundle.errors import ToolkitError
from bundle.manifest import Manifest, TrtCheck, load_verified

RULES_DIR = Path(__file__).parent / "trt_rules"
STANDARD_DOMAINS = ("", "ai.onnx")
QDQ = ("QuantizeLinear", "DequantizeLinear")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
MAX_RECORDED = 100  # violation lines kept in the manifest (`toolkit check` prints all)


@dataclass(frozen=True)
class ParseTimeInput:
    """An input the importer reads at parse time: it must be an initializer or Constant."""

    op: str
    input: int
    name: str
    int32: bool  # the importer narrows the values to int32


@dataclass(frozen=True)
class Rules:
    """One tensorrt-<version>.toml, typed."""

    tensorrt: str
    source: str
    read_at: str
    opset_min: int
    opset_max: int
    operators: dict[str, tuple[str, ...]]  # op -> the matrix's Supported Types
    rules: dict[str, str]  # rule id -> what it flags
    quantized_types: tuple[str, ...]
    block_ranks: tuple[int, ...]
    block_input: str  # "initializer" | "any"
    block_types: tuple[str, ...]
    parse_time_inputs: tuple[ParseTimeInput, ...]
    type_of_output: tuple[str, ...]
    type_names: dict[str, str]  # ONNX element type name -> the matrix's name

    def describe(self) -> str:
        return f"tensorrt-{self.tensorrt}.toml: {self.source} at {self.read_at}"


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str  # the node's name (or "#index Op" when unnamed), a graph input, or "model"
    op: str
    message: str

    def line(self) -> str:
        return f"{self.node} ({self.op}): {self.message} [{self.rule}]"


@dataclass(frozen=True)
class CheckReport:
    """Every TensorRT version checked and its violations (empty: the graph parses)."""

    model: Path
    results: dict[str, list[Violation]]  # version -> violations
    rules: tuple[str, ...]  # Rules.describe() of each table read

    @property
    def passed(self) -> bool:
        return not any(self.results.values())

    def lines(self) -> list[str]:
        return [f"TensorRT {v}: {x.line()}" for v, found in self.results.items() for x in found]

    def grouped(self, named: int = 3) -> list[str]:
        """One line per version and kind of offence (rule, operator, message), with how many
        nodes and the first `named` of them: a CPU bundle's 120 MatMulNBits are one line, not
        120 (`toolkit check --all` prints lines())."""
        out = []
        for v, found in self.results.items():
            kinds: dict[tuple[str, str, str], list[str]] = {}
            for x in found:
                kinds.setdefault((x.rule, x.op, x.message), []).append(x.node)
            for (rule, op, message), nodes in kinds.items():
                more = f", ... {len(nodes) - named} more" if len(nodes) > named else ""
                count = f"{len(nodes)} nodes" if len(nodes) > 1 else "1 node"
                out.append(f"TensorRT {v}: {count} ({op}): {message} [{rule}]: "
                           f"{', '.join(nodes[:named])}{more}")
        return out

    def record(self, forced: bool = False) -> TrtCheck:
        lines = self.lines()
        return TrtCheck(tensorrt=list(self.results), passed=self.passed, rules=list(self.rules),
                        violations=lines[:MAX_RECORDED], violation_count=len(lines), forced=forced)


# --- the rule tables -------------------------------------------------------------------------
def known_versions() -> list[str]:
    """The TensorRT versions a rule table exists for, oldest first."""
    names = [p.stem.removeprefix("tensorrt-") for p in RULES_DIR.glob("tensorrt-*.toml")]
    return sorted(names, key=lambda v: tuple(int(x) for x in v.split(".")))


def major_minor(version: str) -> str:
    """'10.3.0.30' -> '10.3' (engines and rule tables are per major.minor)."""
    parts = version.strip().split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ToolkitError(f"{version!r} is not a TensorRT version",
                           hint=f"write major.minor, one of {', '.join(known_versions())}")
    return ".".join(parts[:2])


def load_rules(version: str) -> Rules:
    ver = major_minor(version)
    path = RULES_DIR / f"tensorrt-{ver}.toml"
    if not path.is_file():
        raise ToolkitError(f"no ONNX parser rule table for TensorRT {ver}",
                           hint=f"the toolkit has tables for {', '.join(known_versions())} "
                                f"(convert/trt_rules/); add one read from onnx-tensorrt's "
                                f"release/{ver} branch")
    d = tomllib.loads(path.read_text(encoding="utf-8"))
    q, types = d["quantization"], d["types"]
    return Rules(
        tensorrt=d["tensorrt"], source=d["source"], read_at=d["read_at"],
        opset_min=int(d["opset"]["min"]), opset_max=int(d["opset"]["max"]),
        operators={op: tuple(t) for op, t in d["operators"].items()}, rules=dict(d["rules"]),
        quantized_types=tuple(q["quantized_types"]), block_ranks=tuple(q["block_ranks"]),
        block_input=q["block_input"], block_types=tuple(q["block_types"]),
        parse_time_inputs=tuple(ParseTimeInput(**e) for e in d["initializers"]["inputs"]),
        type_of_output=tuple(types["of_output"]), type_names=dict(types["names"]))


# --- the graph as the importer sees it -------------------------------------------------------
class _Graph:
    """Types, shapes and constant values of a model's tensors; values of external initializers
    are read from `base_dir` only when a rule needs them."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        self.model = model
        self.base_dir = base_dir
        inferred = onnx.shape_inference.infer_shapes(model)  # types of intermediate tensors
        g = inferred.graph
        self.types: dict[str, int] = {}
        self.shapes: dict[str, tuple[int | None, ...]] = {}
        for vi in (*g.input, *g.value_info, *g.output):
            t = vi.type.tensor_type
            self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                             for d in t.shape.dim)
        self.initializers = {t.name: t for t in model.graph.initializer}
        for name, t in self.initializers.items():
            self.types[name] = t.data_type
            self.shapes[name] = tuple(t.dims)
        self.constants: dict[str, onnx.TensorProto] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t
                        self.types[node.output[0]] = a.t.data_type
                        self.shapes[node.output[0]] = tuple(a.t.dims)

    def is_constant(self, name: str) -> bool:
        """What onnx-tensorrt imports as weights: an initializer or a Constant node's output."""
        return name in self.initializers or name in self.constants

    def value(self, name: str) -> np.ndarray | None:
        t = self.initializers.get(name) or self.constants.get(name)
        if t is None:
            return None
        base = str(self.base_dir) if self.base_dir is not None else ""
        return np.asarray(numpy_helper.to_array(t, base_dir=base))

    def type_name(self, name: str) -> str | None:
        code = self.types.get(name)
        return onnx.TensorProto.DataType.Name(code) if code else None


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} {node.op_type}"


# --- the check -------------------------------------------------------------------------------
def check_model(model: onnx.ModelProto, rules: Rules, *, base_dir: Path | None = None,
                max_seq: int | None = None, batch: int | None = None) -> list[Violation]:
    """Every rule of `rules` on `model`, in graph order. max_seq/batch: the decoder's profiles
    (device/runtime/trt_build.py) that dynamic inputs must fit; None skips that rule (encoders
    and generic graphs are not compiled by the toolkit)."""
    graph = _Graph(model, base_dir)
    found: list[Violation] = []

    def add(rule: str, node: str, op: str, message: str) -> None:
        assert rule in rules.rules, f"{rule} missing from {rules.describe()}"
        found.append(Violation(rule, node, op, message))

    for imp in model.opset_import:
        if imp.domain in STANDARD_DOMAINS and not rules.opset_min <= imp.version <= rules.opset_max:
            add("opset_range", "model", "opset_import",
                f"ai.onnx opset {imp.version} is outside {rules.opset_min}-{rules.opset_max}")
    if max_seq is not None and batch is not None:
        _check_profiles(model, graph, max_seq, batch, add)
    for i, node in enumerate(model.graph.node):
        label = _node_label(node, i)
        if node.domain not in STANDARD_DOMAINS:
            add("custom_domain", label, node.op_type,
                f"domain {node.domain!r} is not ai.onnx; TensorRT would need a plugin for it")
            continue
        if node.op_type not in rules.operators:
            add("unsupported_op", label, node.op_type,
                f"{node.op_type} is not in TensorRT {rules.tensorrt}'s ONNX operator matrix")
            continue
        for rule, message in _node_problems(node, graph, rules):
            add(rule, label, node.op_type, message)
    return found


def _node_problems(node: onnx.NodeProto, g: _Graph, rules: Rules) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    op = node.op_type
    typed = node.output[0] if op in rules.type_of_output else (node.input[0] if node.input else "")
    tname = g.type_name(typed) if typed else None
    if tname is not None:
        matrix = rules.type_names.get(tname, tname)
        if matrix not in rules.operators[op]:
            out.append(("type", f"{typed} is {tname}; the matrix lists {', '.join(rules.operators[op])}"))
    if op != "DequantizeLinear":
        for k, name in enumerate(node.input):
            if op == "QuantizeLinear" and k == 2:  # its zero point names the quantized type
                continue
            qt = g.type_name(name) if name else None
            if qt in rules.quantized_types:
                out.append(("quantized_type", f"{name} is {qt}, usable only as a DequantizeLinear input"))
    if op in QDQ:
        out += _qdq_problems(node, g, rules)
    for entry in rules.parse_time_inputs:
        if entry.op != op or len(node.input) <= entry.input or not node.input[entry.input]:
            continue
        name = node.input[entry.input]
        if not g.is_constant(name):
            out.append(("initializer_input", f"{entry.name} ({name}) must be an initializer or "
                                             f"Constant for TensorRT {rules.tensorrt}'s importer"))
        elif entry.int32:
            v = g.value(name)
            if v is not None and v.size and (v.min() < INT32_MIN or v.max() > INT32_MAX):
                out.append(("int64_narrowed", f"{entry.name} ({name}) holds {v.min()}..{v.max()}, "
                                              "which the importer narrows to int32"))
    return out


def _qdq_problems(node: onnx.NodeProto, g: _Graph, rules: Rules) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    x, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
    zp = node.input[2] if len(node.input) > 2 else ""
    if scale:
        s = g.value(scale)
        if s is not None and s.size and not bool(np.all(s.astype(np.float64) > 0)):
            out.append(("scale_positive", f"scale {scale} has coefficients <= 0 (min {s.min()})"))
    if zp:
        z = g.value(zp)
        if z is None:
            out.append(("zero_point", f"zero point {zp} is not a constant; TensorRT needs all zeros"))
        elif z.size and bool(np.any(z.astype(np.float64) != 0)):
            out.append(("zero_point", f"zero point {zp} is not all zeros (symmetric quantization only)"))
    qtype = g.type_name(x if node.op_type == "DequantizeLinear" else zp) if (x or zp) else None
    x_shape = g.shapes.get(x)
    if qtype == "INT4" and x_shape and x_shape[-1] is not None and x_shape[-1] % 2:
        out.append(("int4_odd", f"{x} is INT4 with an odd last dimension {x_shape[-1]}"))
    s_shape = g.shapes.get(scale) if scale else None
    blocked = (node.op_type == "DequantizeLinear" and x_shape is not None and s_shape is not None
               and len(s_shape) == len(x_shape) and len(x_shape) > 1
               and int(np.prod([d or 1 for d in s_shape])) != 1)
    if not blocked:
        return out
    assert x_shape is not None and s_shape is not None
    axes = [i for i, (a, b) in enumerate(zip(x_shape, s_shape)) if a != b]
    block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
    if len(axes) != 1:
        out.append(("block_axes", f"scale {list(s_shape)} blocks axes {axes} of {list(x_shape)}; "
                                  "TensorRT takes exactly one blocked axis"))
    else:
        a = axes[0]
        dim, n = x_shape[a], s_shape[a]
        if dim is None or n is None or not n or dim % n or (block and block * n != dim):
            out.append(("block_axes", f"axis {a} of {list(x_shape)} is not {n} whole blocks"
                                      + (f" of block_size {block}" if block else "")))
    form = []
    if len(x_shape) not in rules.block_ranks:
        form.append(f"rank {len(x_shape)} (takes {rules.block_ranks})")
    if rules.block_input == "initializer" and not g.is_constant(x):
        form.append(f"{x} is not an initializer")
    if qtype not in rules.block_types:
        form.append(f"type {qtype} (takes {', '.join(rules.block_types)})")
    if form:
        out.append(("block_form", "blocked DequantizeLinear: " + "; ".join(form)))
    return out


def _check_profiles(model: onnx.ModelProto, g: _Graph, max_seq: int, batch: int, add: Any) -> None:
    """Every dynamic graph input against the profiles the device builds with."""
    from device.runtime.trt_build import input_shape_range, profile_shapes

    inits = set(g.initializers)
    profiles = profile_shapes(max_seq, batch)
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
        if all(d > 0 for d in dims):
            continue
        for prof in profiles:
            try:
                input_shape_range(vi.name, dims, prof)
            except ToolkitError as e:
                add("dynamic_shape", vi.name, "graph input", f"profile {prof.name}: {e.message}")
                break


# --- bundles ---------------------------------------------------------------------------------
def versions_for(manifest: Manifest, asked: str | None = None) -> list[str]:
    """--tensorrt, else the version the bundle's target names, else every table (a CPU bundle
    is checked against all of them: it is what someone would try to build)."""
    if asked:
        return [major_minor(asked)]
    if manifest.target.tensorrt:
        return [major_minor(manifest.target.tensorrt)]
    return known_versions()


def check_file(model_path: Path, versions: list[str], *, max_seq: int | None = None,
               batch: int | None = None) -> CheckReport:
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # a missing file, protobuf's DecodeError: a damaged bundle
        raise ToolkitError(f"cannot read {model_path} as ONNX ({type(e).__name__}: {e})",
                           hint="the bundle is damaged; convert it again or copy a fresh one") from e
    tables = [load_rules(v) for v in versions]
    results = {r.tensorrt: check_model(model, r, base_dir=model_path.parent, max_seq=max_seq,
                                       batch=batch) for r in tables}
    return CheckReport(model_path, results, tuple(r.describe() for r in tables))


def check_bundle(bundle: Path, tensorrt: str | None = None) -> CheckReport:
    """`toolkit check BUNDLE [--tensorrt V]`. The files are verified first, as compile and deploy
    do: a check that passes a bundle they would refuse says nothing true about it."""
    m = load_verified(bundle)
    return _check_manifest(Path(bundle) / m.model_file, m, versions_for(m, tensorrt))


def _check_manifest(model_path: Path, m: Manifest, versions: list[str]) -> CheckReport:
    decoder = m.kind == "decoder" and m.max_seq > 1
    return check_file(model_path, versions, max_seq=m.max_seq if decoder else None,
                      batch=m.batch if decoder else None)


def record_or_refuse(model_path: Path, manifest: Manifest, force: bool) -> None:
    """For a TensorRT target: check the staged graph and record the result on the manifest;
    a failure is a ToolkitError unless force (then the manifest records it as forced)."""
    if not manifest.target.builds_on_device:
        return
    report = _check_manifest(model_path, manifest, versions_for(manifest))
    manifest.trt_check = report.record(forced=force and not report.passed)
    if report.passed or force:
        return
    lines = report.lines()
    shown = "\n  ".join(lines[:20]) + (f"\n  ... {len(lines) - 20} more" if len(lines) > 20 else "")
    raise ToolkitError(f"TensorRT {', '.join(report.results)}'s ONNX parser would reject this "
                       f"graph ({len(lines)} offending nodes):\n  {shown}",
                       hint="nothing was written; --force writes the bundle with the failure "
                            "recorded in its manifest (trt_check)")
