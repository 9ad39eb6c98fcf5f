"""quantize_bundle: an fp32 bundle -> a quantized bundle for the same target, gated on accuracy.

  1. checks          source bundle verified and fp32; precision allowed by its target; the
                     target's format for it known; calibration text readable; output free
  2. calibration     (static Q/DQ formats only) token windows of the calibration text
  3. quantize        the format's graph rewrite (quantize/formats.py), saved into a staged bundle
  4. gate            quantized vs fp32 on held-out text (quantize/gate.py); a failure removes
                     the staged bundle unless force=True, which writes it with the failure recorded
  5. bundle          tokenizer copied, manifest (precision, quantization record, kv dtype),
                     report.md, hashes; atomic rename

The lead's `toolkit convert MODEL --precision P` calls this on the fp32 bundle it just wrote:
    result = quantize_bundle(fp32_bundle, "int4", out=final_path, force=force, steps=steps)
"""

from __future__ import annotations

import copy
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import models  # noqa: F401  (pinned before any onnxruntime.transformers import: see graph.py)
from bundle.errors import ToolkitError
from bundle.manifest import Manifest, Quantization, SourceBundle, load_verified
from bundle.progress import QUIET, Steps
from bundle.staging import check_output, dir_size, finalize, staged_bundle
from quantize.calibration import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    CalibrationSet,
    Text,
    read_text,
    token_windows,
)
from quantize.formats import Format, FormatJob, FormatOutput, QuantOptions, format_for, uses_awq
from quantize.gate import GateResult, Thresholds, decoder_gate, encoder_gate, thresholds_for
from targets import load_target

STEPS = 3  # progress steps this module reports (for Steps(total=...))


def steps_total(precision: str, options: QuantOptions | None = None) -> int:
    """For Steps(total=...): 0 (no counter) when the int4 grid may take a second try."""
    options = options or QuantOptions()
    return 0 if precision == "int4" and options.int4_grid is None else STEPS


class GateFailure(ToolkitError):
    """The quantized model failed the accuracy gate; nothing was written. Carries the figures."""

    def __init__(self, gate: GateResult, precision: str, fmt: str) -> None:
        reasons = "; ".join(gate.failures)
        super().__init__(f"{precision} ({fmt}) failed the accuracy gate: {reasons}; no bundle written",
                         hint="try another precision, loosen the limit that failed (--max-ppl-"
                              "increase, --min-top1, --min-greedy, --min-cosine on `toolkit "
                              "quantize` or `toolkit convert`), or pass --force to write the "
                              "bundle anyway with the failure recorded in its manifest")
        self.gate = gate


@dataclass
class QuantizeResult:
    bundle: Path
    manifest: Manifest
    source: Path
    format: str
    gate: GateResult
    bytes: int
    source_bytes: int
    seconds: dict[str, float]

    @property
    def passed(self) -> bool:
        return self.gate.passed


def default_output(bundle: Path, precision: str) -> Path:
    """A sibling folder: bundles/smollm2-135m-cpu-fp32 -> bundles/smollm2-135m-cpu-int4."""
    bundle = Path(bundle).absolute()
    stem = bundle.name[: -len("-fp32")] if bundle.name.endswith("-fp32") else bundle.name
    return bundle.parent / f"{stem}-{precision}"


def quantize_bundle(bundle: Path, precision: str, *, calibration: Path | None = None,
                    samples: int = DEFAULT_SAMPLES, seq_len: int = DEFAULT_SEQ_LEN,
                    out: Path | None = None, force: bool = False,
                    thresholds: Thresholds | dict[str, float | None] | None = None,
                    steps: Steps | None = None, options: QuantOptions | None = None,
                    fmt: str | None = None, threads: int | None = None,
                    memo: dict[Any, Any] | None = None) -> QuantizeResult:
    """Quantize an fp32 bundle to `precision` in the format its target names (or `fmt`).
    Raises GateFailure (a ToolkitError) when the gate fails and force is False. `memo`: what
    one ladder step leaves for the next (AWQ's model and the sensitivity ranking); a caller that
    writes several steps of one bundle and calibration text alone (bench/quantize.py) may pass
    the same dict to each call."""
    steps = steps or QUIET
    options = options or QuantOptions()
    bundle = Path(bundle)
    src = load_verified(bundle)  # 1. checks, cheapest first
    fmt_rec, limits = _check(src, precision, fmt, thresholds)
    tries = _tries(precision, options, fmt_rec)
    text = read_text(calibration)
    out = Path(out) if out else default_output(bundle, precision)
    if out.absolute() == bundle.absolute():
        raise ToolkitError("the output is the input bundle", hint="choose another -o")
    check_output(out, force)
    tok = _tokenizer(bundle, src)
    needed = fmt_rec.calibrated or any(uses_awq(precision, t) for t in tries)
    cal = _calibration(src, needed, text, tok, samples, seq_len, steps)  # 2.
    t0 = time.perf_counter()
    tried: list[dict[str, Any]] = []  # gate figures of each int4 grid tried
    ranked: dict[str, Any] | None = None  # the last sensitivity ranking a tried step measured
    memo = {} if memo is None else memo  # what one ladder step leaves for the next (FormatJob.memo)
    with staged_bundle(out, force) as staging:
        for i, opts in enumerate(tries):
            label = "" if len(tries) == 1 else f", {_grid(opts)}"
            with steps.step(f"quantizing to {precision} ({fmt_rec.name}{label})"):  # 3.
                produced = _apply(bundle, src, fmt_rec, precision, staging, opts, cal, steps, threads,
                                  memo)
                from convert.export import save_model

                model_path = save_model(produced.model, staging)
                del produced.model
                model_bytes = dir_size(staging)  # the graph and its weights: nothing else yet
            manifest = _manifest(src, precision, fmt_rec, produced, opts, cal, text)
            with steps.step("accuracy gate: quantized vs fp32 on held-out text"):  # 4.
                gate = _gate(bundle, src, model_path, manifest, tok, limits, threads)
            if len(tries) > 1:
                tried.append(_try_record(opts, gate, produced.details, model_bytes))
                assert manifest.quantization is not None
                manifest.quantization.grid_choice = {
                    "rule": f"{' -> '.join(_grid(t) for t in tries)}: the faster graph first, "
                            "the next only when the gate rejects it",
                    "ladder": [[t.int4_grid, t.block_size, t.int8_fraction] for t in tries],
                    "tried": list(tried)}
                ranked = produced.details.get("sensitivity", ranked)
                if ranked and "sensitivity" not in produced.details:  # kept grid not ranked
                    manifest.quantization.grid_choice["sensitivity"] = ranked
            if gate.passed:
                break
            if i + 1 < len(tries):
                steps.say(f"    the {_grid(opts)} failed the gate ({'; '.join(gate.failures)}); "
                          f"trying the {_grid(tries[i + 1])}")
        if not gate.passed and not force:
            raise GateFailure(gate, precision, fmt_rec.name)
        with steps.step("writing the bundle"):  # 5.
            if (bundle / "tokenizer").is_dir():
                shutil.copytree(bundle / "tokenizer", staging / "tokenizer")
            assert manifest.quantization is not None
            manifest.quantization.gate = gate.record()
            manifest.quantization.forced = bool(force and not gate.passed)
            from convert.trt_check import record_or_refuse
            from quantize.report import render

            record_or_refuse(model_path, manifest, force)  # Jetson: the TensorRT parser's rules

            (staging / "report.md").write_text(render(manifest), encoding="utf-8")
            finalize(staging, manifest)
    seconds = dict(steps.timings) or {"total": time.perf_counter() - t0}
    return QuantizeResult(out, manifest, bundle, fmt_rec.name, gate, dir_size(out), dir_size(bundle),
                          seconds)


def _tries(precision: str, options: QuantOptions, fmt: Format) -> list[QuantOptions]:
    """The option sets to try in order: int4 with int4_grid=None walks the format's grid ladder
    (the plainer, faster graph first) and stops at the first the gate accepts."""
    if precision != "int4" or not fmt.grids:
        return [options]
    if options.int4_grid is not None:
        if options.int4_grid not in fmt.grids:
            raise ToolkitError(f"format {fmt.name} has no {options.int4_grid!r} int4 grid",
                               hint=f"choose one of {', '.join(fmt.grids)}")
        return [options]
    # mixed steps rank the weights on AWQ's calibration rows: without AWQ there are none
    return [replace(options, int4_grid=grid, block_size=block or options.block_size,
                    int8_fraction=fraction)
            for grid, block, fraction in fmt.ladder if not fraction or options.awq]


def _grid(opts: QuantOptions) -> str:
    from fractions import Fraction

    share = Fraction(opts.int8_fraction).limit_denominator(64)  # 0.125 -> 1/8
    mixed = f", the most sensitive {share} of the weights at 8 bits" if opts.int8_fraction else ""
    return f"{opts.int4_grid} grid in blocks of {opts.block_size}{mixed}"


def _try_record(opts: QuantOptions, gate: GateResult, details: dict[str, Any],
                model_bytes: int) -> dict[str, Any]:
    """One ladder step: its grid, the 8-bit units, the bytes of its graph, the gate's figures."""
    figures = gate.to_json()
    return {"grid": opts.int4_grid, "block_size": opts.block_size,
            "int8_fraction": opts.int8_fraction,
            "int8_units": details.get("int8_weights", {}).get("units", 0),
            "model_bytes": model_bytes, "passed": gate.passed,
            **{k: figures.get(k) for k in ("ppl_increase", "top1_agreement", "cosine_min")}}


def _check(src: Manifest, precision: str, fmt: str | None,
           thresholds: Thresholds | dict[str, float | None] | None) -> tuple[Format, Thresholds]:
    if src.kind not in ("decoder", "encoder"):
        raise ToolkitError(f"a {src.kind} bundle (an ONNX file bundled as-is) cannot be quantized",
                           hint="convert the model from Hugging Face or GGUF first")
    if src.precision != "fp32":
        raise ToolkitError(f"the bundle is already {src.precision}; quantization starts from fp32",
                           hint="pass the fp32 bundle `toolkit convert` wrote")
    target = load_target(src.target.name)
    fmt_rec = format_for(target, precision, fmt)
    return fmt_rec, gate_limits(fmt_rec, precision, thresholds)


def gate_limits(fmt: Format, precision: str,
                thresholds: Thresholds | dict[str, float | None] | None) -> Thresholds:
    """The gate's limits: the user's (None: not given), then the format's own perplexity budget,
    then the precision's defaults."""
    if isinstance(thresholds, Thresholds):
        return thresholds
    given = {k: v for k, v in (thresholds or {}).items() if v is not None}
    budget = dict(fmt.max_ppl_increase).get(precision)
    return thresholds_for(precision, **{"max_ppl_increase": budget, **given})


def _tokenizer(bundle: Path, src: Manifest) -> Any:
    from device.runtime.tokenizer import BundleTokenizer

    if not src.tokenizer:
        raise ToolkitError("the bundle has no tokenizer; the gate needs one to read held-out text")
    return BundleTokenizer(bundle / src.tokenizer.path, src.tokenizer)


def _calibration(src: Manifest, needed: bool, text: Text, tok: Any, samples: int, seq_len: int,
                 steps: Steps) -> CalibrationSet | None:
    """The calibration windows, when the format (static activation ranges) or AWQ reads them."""
    # a decoder's static cache holds max_seq - 1 new tokens; an encoder reads at most its
    # position table (BERT's learned positions: a longer window fails inside the graph)
    limit = src.max_seq - 1 if src.kind == "decoder" else min(512, src.dims.max_positions)
    cal = token_windows(text, tok, samples, seq_len, max_len=limit)  # validates the text too
    if not needed:
        return None
    steps.say(f"    calibration: {len(cal.windows)} samples x {cal.seq_len} tokens from "
              f"{text.source} ({cal.tokens} tokens)")
    return cal


def _apply(bundle: Path, src: Manifest, fmt: Format, precision: str, staging: Path,
           options: QuantOptions, cal: CalibrationSet | None, steps: Steps,
           threads: int | None, memo: dict[Any, Any]) -> FormatOutput:
    from quantize.graph import load_model

    path = bundle / src.model_file
    job = FormatJob(load_model(path), path, precision, src.kind, staging, load_target(src.target.name),
                    options, cal, steps, threads, memo)
    return fmt.apply(job)


def _gate(bundle: Path, src: Manifest, model_path: Path, manifest: Manifest, tok: Any,
          limits: Thresholds, threads: int | None) -> GateResult:
    if src.kind == "encoder":
        return encoder_gate(bundle / src.model_file, model_path, tok, src.pooling, limits,
                            threads=threads)
    runtime = ("onnxruntime-cpu" if src.target.runtime == "onnxruntime" else
               "onnxruntime-cpu as a proxy for the TensorRT engine (build and check on the device)")
    return decoder_gate(bundle / src.model_file, model_path, src.kv_layout(), manifest.kv_layout(),
                        src.dims.vocab_size,
                        tok, limits, threads=threads, runtime_note=runtime)


def _manifest(src: Manifest, precision: str, fmt: Format, produced: FormatOutput,
              options: QuantOptions, cal: CalibrationSet | None, text: Text) -> Manifest:
    m = copy.deepcopy(src)
    m.precision = precision
    m.files = {}
    opset = produced.details.get("opset")
    if opset:
        m.contract = replace(m.contract, opset=int(opset))
    if produced.kv_dtype and m.kind == "decoder":  # the cache's tensors follow from it
        m.contract = replace(m.contract, kv_dtype=produced.kv_dtype)
    model_entry = src.files.get(src.model_file)
    m.quantization = Quantization(
        format=fmt.name, runtime=fmt.runtime, summary=fmt.summary,
        source_bundle=SourceBundle(src.name, src.created_at,
                                   model_entry.sha256 if model_entry else None),
        options=dict(options.__dict__), details=produced.details,
        calibration=cal.to_json() if cal else {"used": False, "why": "weight-only format",
                                               "text": text.source},
        tools=_tool_versions())
    if fmt.runtime == "tensorrt":
        m.quantization.tensorrt = {
            "build": "STRONGLY_TYPED (the graph carries its own types and Q/DQ scales)",
            "opset": opset, "opset_note": ("opset 21 INT4 block DequantizeLinear: the 10.x parser has no "
                                           "upper opset check and infers blocks from the scale's "
                                           "shape (convert/trt_rules/tensorrt-10.3.toml); the "
                                           "engine build is unverified on a board")
            if opset and opset >= 21 else "within TensorRT 10.3's documented opsets 9-20"}
    return m


def _tool_versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def convert_and_quantize(model: str, target: str, precision: str, out: Path | None,
                         max_seq: int | None, batch: int, force: bool, threads: int | None,
                         calibration: Path | None,
                         thresholds: dict[str, float | None] | None = None) -> str:
    """`toolkit convert --precision P`: the fp32 bundle is built in a temporary folder beside
    the output (the quantizer's reference), quantized into the output, then deleted. Returns
    the printable summary of both stages."""
    import shutil
    import tempfile

    from bundle.staging import check_output
    from convert.pipeline import convert_model, default_output
    from convert.summary import convert_summary
    from models import resolve
    from quantize.report import failure_summary
    from quantize.report import summary as summary_of

    tgt = load_target(target)
    tgt.check_precision(precision)  # before an expensive convert, like the calibration file
    read_text(calibration)
    src = resolve(model)
    final = Path(out) if out else default_output(src.name, tgt.name, precision)
    check_output(final, force)
    final.absolute().parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.fp32-", dir=final.absolute().parent))
    try:
        fp32 = convert_model(model, target, work / "fp32", max_seq, batch, force, threads,
                             Steps(total=5), precision=precision)
        # the fp32 bundle is the gate's reference and is deleted below: do not print its path
        summary = convert_summary(fp32).replace(str(fp32.bundle), "fp32 reference (deleted after "
                                                                  "quantizing)")
        try:
            q = quantize_bundle(fp32.bundle, precision, calibration=calibration, out=final,
                                force=force, threads=threads, thresholds=thresholds,
                                steps=Steps(total=steps_total(precision)))
        except GateFailure as e:
            print(failure_summary(e.gate), file=sys.stderr)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary.split("\nnext:")[0] + "\n" + summary_of(q)
