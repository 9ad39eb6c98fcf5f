"""Format registry: the target file names a format per precision (targets/*.toml `formats`), and
this maps the name to the code that writes it. Nothing here knows target names.

    fmt = format_for(target, "int4")         # "ort-matmulnbits" on cpu, "qdq-int4-..." on Jetson
    out = fmt.apply(job)                     # -> FormatOutput(model, details)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from bundle.errors import ToolkitError
from bundle.progress import QUIET, Steps
from quantize.calibration import CalibrationSet
from targets import Target

if TYPE_CHECKING:
    from quantize.sensitivity import Sensitivity


@dataclass(frozen=True)
class QuantOptions:
    """Knobs with defaults that the gate and the benchmark settled; the CLI exposes a few."""

    block_size: int = 32  # int4/int8 blocks along K (the packaged SmolLM2 GGUF uses 32)
    # int4 grid of the weight blocks, None: let the gate choose along the format's `ladder`
    # of (grid, block size) (fastest graph first; the next only when the gate rejects one):
    #   "symmetric"   zero point 0 (the plainest graph; what TensorRT's INT4 DQ requires)
    #   "zero-point"  an integer zero point per block (MatMulNBits' zero_points; no extra nodes)
    #   "offsets"     a float offset per block, exact on Q4_1-style weights, at the price of one
    #                 small extra MatMul + Add per weight (quantize/offsets.py)
    int4_grid: str | None = None
    # CPU 8-bit layers (int8 bundles and a mixed int4 step's widened ones): "zero-point" (an
    # integer zero point per block: the block's own [min, max] in 256 levels; SmolLM2 int8:
    # layers' relative RMS error 5.4e-3 -> 4.7e-3; with the head in blocks of 32, KL from fp32
    # over 12.6 k tokens 0.0071 -> 0.0047, decode speed 0.96-1.00x in A/Bs; README) or
    # "symmetric". TensorRT's INT8 DQ takes zero point 0 only: the Jetson formats stay symmetric
    # whatever this says.
    int8_grid: str = "zero-point"
    # AWQ (quantize/awq.py) before the plain int4 grids (symmetric, zero-point), from the
    # calibration text: what lets the plain grids pass the gate (SmolLM2: symmetric +26 % -> +12 %
    # perplexity), so the ladder's first, fastest graph is usually the one kept. The offset grid
    # (exact on Q4_1 blocks) never takes it.
    awq: bool = True
    # mixed int4 (a step of the ladder, after the same grid alone failed the gate): the most
    # sensitive ceil(fraction * units) weight units (quantize/sensitivity.py) at 8 bits
    int8_fraction: float = 0.0
    accuracy_level: int = 4  # MatMulNBits: int8 compute (the fast CPU path)
    head_bits: int = 8  # CPU: the LM head (tied or not) / embedding tables
    head_block: int = 64  # CPU: their block size where it divides K (quantize/cpu.py NBitsConfig)
    smooth_alpha: float | None = 0.7  # W8A8 SmoothQuant migration strength; None: off
    calibration_method: str = "max"  # "max" | "percentile" (quantize/activations.py)


@dataclass
class FormatJob:
    """What a format needs: the fp32 graph and where it came from, plus calibration data."""

    model: onnx.ModelProto
    model_path: Path  # the source bundle's model file
    precision: str
    kind: str  # "decoder" | "encoder"
    work_dir: Path  # scratch space beside the bundle being written
    target: Target | None = None  # compute_dtype decides whether the TensorRT graphs go fp16
    options: QuantOptions = field(default_factory=QuantOptions)
    calibration: CalibrationSet | None = None
    steps: Steps = QUIET
    threads: int | None = None
    # kept across the ladder's steps by the pipeline: AWQ's rescaled model, its record and the
    # sensitivity are the same for every mixed step of one (grid, block), so made once
    memo: dict[Any, Any] = field(default_factory=dict)


@dataclass
class FormatOutput:
    model: onnx.ModelProto
    details: dict[str, Any]
    kv_dtype: str | None = None  # the cache dtype the graph now takes (None: unchanged)


@dataclass(frozen=True)
class Format:
    name: str
    runtime: str  # "onnxruntime" | "tensorrt"
    precisions: tuple[str, ...]
    calibrated: bool  # needs activation statistics from the calibration text
    summary: str
    apply: Callable[[FormatJob], FormatOutput]
    # int4 (grid, block size, 8-bit fraction) in the order the gate tries them: the fastest
    # graph first, the next only when the gate rejects it; block None: the options' block_size
    ladder: tuple[tuple[str, int | None, float], ...] = ()
    # precision -> the gate's default perplexity budget where this format's loss is not the
    # precision's usual one (quantize/gate.py DEFAULT_THRESHOLDS): weight-only int8, whose
    # activations are rounded only per block inside the kernel, is held to +1 %
    max_ppl_increase: tuple[tuple[str, float], ...] = ()

    @property
    def grids(self) -> tuple[str, ...]:
        """The int4 grids it writes (what --int4-grid may name)."""
        return tuple(dict.fromkeys(grid for grid, _, _ in self.ladder))


# The mixed steps after the fastest grid fails: its most sensitive 1/8, 1/4, 1/2 of the weight
# units at 8 bits. Doubling keeps the gate runs to three and the chosen set within 2x of the
# smallest that passes; past half, a mix costs most of int8's size (half the units at 8 bits is
# about 3/4 of int8's weight bytes), so the ladder goes on to the exact grids instead. Fractions
# of the unit count, not of bytes: the ranking is per unit, and the bytes are recorded per step.
MIXED_FRACTIONS = (1 / 8, 1 / 4, 1 / 2)


def _mixed(grid: str, block: int | None) -> tuple[tuple[str, int | None, float], ...]:
    """`grid` alone, then with the MIXED_FRACTIONS at 8 bits."""
    return tuple((grid, block, f) for f in (0.0, *MIXED_FRACTIONS))


AWQ_GRIDS = ("symmetric", "zero-point")  # the offset grid is exact on Q4_1 blocks: no AWQ
AWQ_ROWS = 1024  # calibration token rows per input for AWQ's error search


def uses_awq(precision: str, options: QuantOptions) -> bool:
    return options.awq and precision == "int4" and (options.int4_grid or "symmetric") in AWQ_GRIDS


@dataclass
class Prepared:
    """AWQ's outcome for one (grid, block): what the grid and the mixed steps read."""

    grid: str
    exclude: set[str]  # weights never at 4 bits (the LM head, tied or not)
    record: dict[str, Any]  # the manifest's AWQ record
    importance: dict[str, np.ndarray]  # weight -> row weights [K] of the rounding
    # measured by the grid's first mixed step (_ranking) and kept with AWQ's model in the memo:
    # a grid the ladder has no mixed step for never pays for it
    sensitivity: Sensitivity | None = None


def _awq(job: FormatJob, grid: str, exclude: set[str]) -> Prepared:
    """job.model rescaled by AWQ for `grid`'s rounding (replaced by the rescaled copy when an
    earlier ladder step of the same grid and block made it)."""
    import copy

    key = ("awq", grid, job.options.block_size)
    if key not in job.memo:
        job.memo.clear()  # the ladder visits one grid's steps together: one model held at a time
        prepared = _run_awq(job, grid, exclude)
        job.memo[key] = (copy.deepcopy(job.model), prepared)
        return prepared
    model, prepared = job.memo[key]
    job.model = copy.deepcopy(model)  # the format rewrites it in place
    job.steps.say(f"    AWQ for the {grid} grid: from the previous step")
    return prepared


def _run_awq(job: FormatJob, grid: str, exclude: set[str]) -> Prepared:
    from quantize import activations
    from quantize.awq import awq, awq_inputs

    if job.calibration is None:
        raise ToolkitError("AWQ needs calibration data")  # a caller bug: the pipeline makes it
    tensors = awq_inputs(job.model)
    feeds = _feeds(job)(job.model, job.calibration.windows)
    rows = activations.collect_rows(job.model, tensors, feeds, job.work_dir, AWQ_ROWS,
                                    samples=len(job.calibration.windows), steps=job.steps,
                                    threads=job.threads)
    stats = awq(job.model, rows, _quantizer(grid, job.options.block_size), exclude)
    job.steps.say(f"    AWQ: {stats.scaled} inputs rescaled, {stats.plain} kept (plain rounding "
                  f"was best), {stats.skipped} not rescaled; output error "
                  f"{stats.error_ratio:.2f}x plain rounding's on the calibration rows")
    record = {"grid": grid, "rows_per_input": AWQ_ROWS, **stats.to_json(),
              "rounding": "each block rounded by output error (row weights E[x^2])"}
    return Prepared(grid, exclude, record, stats.importance)


def _feeds(job: FormatJob) -> Any:
    from quantize import activations

    return activations.decoder_feeds if job.kind == "decoder" else activations.encoder_feeds


def _quantizer(grid: str, block: int) -> Any:
    """The 4-bit rounding of `grid`: (w [K, N], row importance [K]) -> dequantized w."""
    from quantize.blockwise import quantize_symmetric, quantize_zero_point

    fn = quantize_symmetric if grid == "symmetric" else quantize_zero_point

    def quantizer(w: np.ndarray, h: np.ndarray) -> np.ndarray:
        return fn(w, 4, block, importance=h).dequantize()

    return quantizer


def _ranking(job: FormatJob, prepared: Prepared) -> Sensitivity:
    """The units of job.model (AWQ's rescaled graph, not yet quantized) ranked by sensitivity
    (quantize/sensitivity.py) on a few calibration windows; made once per (grid, block)."""
    from quantize.sensitivity import measure, window_count

    if prepared.sensitivity is None:
        assert job.calibration is not None  # AWQ ran on it
        windows = job.calibration.windows
        n = min(window_count(job.calibration.seq_len), len(windows))
        picked = [windows[round(i * (len(windows) - 1) / max(n - 1, 1))] for i in range(n)]
        sens = measure(job.model, list(_feeds(job)(job.model, picked)),
                       _quantizer(prepared.grid, job.options.block_size), prepared.importance,
                       prepared.exclude, job.kind, prepared.grid, job.options.block_size,
                       job.work_dir, job.threads, job.steps)
        if sens.units:
            top = sens.units[0]
            unit = "nats/token" if job.kind == "decoder" else "relative error"
            job.steps.say(f"    sensitivity: {len(sens.units)} weight units over {sens.tokens} "
                          f"tokens, the most sensitive {' + '.join(top.layers)} "
                          f"({top.divergence:.4g} {unit} at 4 bits)")
        prepared.sensitivity = sens
    return prepared.sensitivity


def _widened(job: FormatJob, details: dict[str, Any], prepared: Prepared | None,
             fraction: float) -> frozenset[str]:
    """The weights the mixed step keeps at 8 bits; records the sensitivity (when measured) and
    the set. Called before the format rewrites job.model."""
    if prepared is None:
        if fraction > 0:  # a caller bug: _tries adds mixed steps only beside AWQ
            raise ToolkitError("a mixed 4/8-bit step needs AWQ's calibration rows")
        return frozenset()
    details["awq"] = prepared.record
    sens = _ranking(job, prepared) if fraction > 0 else prepared.sensitivity
    if sens is not None:
        details["sensitivity"] = sens.to_json()
    units = sens.widest(fraction) if sens else ()
    details["int8_weights"] = {
        "fraction": fraction, "units": len(units), "of": len(sens.units) if sens else None,
        "layers": [name for u in units for name in u.layers],
        "weights": [w for u in units for w in u.weights],
        "elements": sum(u.elements for u in units),
        "rule": "the most sensitive ceil(fraction x units) at 8 bits, the rest at 4"}
    return frozenset(w for u in units for w in u.weights)


def _nbits(job: FormatJob) -> FormatOutput:
    from quantize.cpu import NBitsConfig, head_weights, matmul_nbits

    o = job.options
    bits = 4 if job.precision == "int4" else 8
    grid = (o.int4_grid or "symmetric") if bits == 4 else o.int8_grid
    prepared = _awq(job, grid, head_weights(job.model.graph)) if uses_awq(job.precision, o) else None
    details: dict[str, Any] = {}
    wide = _widened(job, details, prepared, o.int8_fraction)
    cfg = NBitsConfig(bits=bits, block=o.block_size, grid=grid,
                      accuracy_level=o.accuracy_level, head_bits=max(o.head_bits, bits),
                      head_block=o.head_block, eight_bit=wide, grid8=o.int8_grid)
    r = matmul_nbits(job.model, cfg, prepared.importance if prepared else None)
    return FormatOutput(r.model, {**r.details, **details})


def _matmul_integer(job: FormatJob) -> FormatOutput:
    import tempfile

    from quantize.cpu import matmul_integer

    with tempfile.TemporaryDirectory(dir=job.work_dir) as tmp:  # not left in the bundle
        r = matmul_integer(job.model_path, Path(tmp) / "dynamic.onnx")
    return FormatOutput(r.model, r.details)


def _trt_fp16(job: FormatJob) -> FormatOutput:
    from quantize.trt_qdq import fp16

    r = fp16(job.model)
    return FormatOutput(r.model, r.details, kv_dtype="float16")


def _trt_w8a8(kind: str) -> Callable[[FormatJob], FormatOutput]:
    def apply(job: FormatJob) -> FormatOutput:
        from quantize import activations
        from quantize.smooth import smooth
        from quantize.trt_qdq import activation_inputs, tied_head_inputs, w8a8

        if job.calibration is None:
            raise ToolkitError(f"format qdq-{kind} needs calibration data")  # a caller bug
        tensors = activation_inputs(job.model)
        feeds = (activations.decoder_feeds if job.kind == "decoder" else activations.encoder_feeds)(
            job.model, job.calibration.windows)
        ranges = activations.collect_ranges(job.model, tensors, feeds, job.work_dir,
                                            job.options.calibration_method,
                                            samples=len(job.calibration.windows), steps=job.steps,
                                            threads=job.threads)
        details: dict[str, Any] = {"calibration_method": job.options.calibration_method}
        if job.options.smooth_alpha is not None:
            ranges, stats = smooth(job.model, ranges, job.options.smooth_alpha)
            details["smoothquant"] = {"alpha": job.options.smooth_alpha, **stats.to_json()}
        keep = tied_head_inputs(job.model)
        r = w8a8(job.model, ranges, kind, exclude_inputs=keep, fp16=_fp16(job))
        details.update(r.details)
        details["tied_lm_head"] = ("kept fp16: the embedding Gather needs the float table on "
                                   "TensorRT anyway, and per-tensor int8 on its input cost the "
                                   "most accuracy" if keep else "none")
        return FormatOutput(r.model, details, kv_dtype=r.details["compute_dtype"])

    return apply


def _fp16(job: FormatJob) -> bool:
    """TensorRT graphs run in the target's compute dtype (float16 on every Jetson file)."""
    return job.target is None or job.target.compute_dtype == "float16"


def _trt_int4(job: FormatJob) -> FormatOutput:
    from quantize.trt_qdq import int4_weight_only, tied_head_weights

    skip = tied_head_weights(job.model)
    prepared = (_awq(job, "symmetric", set(skip)) if uses_awq(job.precision, job.options)
                else None)
    details: dict[str, Any] = {}
    wide = _widened(job, details, prepared, job.options.int8_fraction)
    r = int4_weight_only(job.model, job.options.block_size, job.options.int4_grid == "offsets", skip,
                         fp16=_fp16(job), importance=prepared.importance if prepared else None,
                         int8=wide)
    r.details["tied_lm_head"] = ("kept fp16 (shared with the embedding Gather; int4 on it cost "
                                 "the most accuracy)" if skip else "none")
    r.details["grid"] = job.options.int4_grid or "symmetric"
    r.details.update(details)
    return FormatOutput(r.model, r.details, kv_dtype=r.details["compute_dtype"])


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("ort-matmulnbits", "onnxruntime", ("int8", "int4"), False,
           "block-wise weight-only MatMulNBits, int8 compute (accuracy_level 4)", _nbits,
           # zero points in blocks of 64 ran 1.09x genai int4 on SmolLM2 (A/B), symmetric in 32s
           # 0.96x; the offsets keep a Q4_1 source's own 32s. Symmetric in 64s is left out:
           # SmolLM2 +22 % perplexity even after AWQ, a failed try that costs a whole AWQ search
           # then zero points in 64s with the most sensitive units at 8 bits (MIXED_FRACTIONS)
           ladder=(*_mixed("zero-point", 64), ("symmetric", 32, 0.0), ("zero-point", 32, 0.0),
                   ("offsets", 32, 0.0)),
           # int8: SmolLM2 -0.05 %, the never-4-bit tiny decoder +0.14 % (README, Quantization);
           # the activations are rounded only inside the kernel, per block of 32
           max_ppl_increase=(("int8", 0.01),)),
    Format("ort-matmul-integer", "onnxruntime", ("int8",), False,
           "dynamic int8 MatMulInteger (per-tensor activations at run time)", _matmul_integer),
    Format("trt-fp16", "tensorrt", ("fp16",), False,
           "fp16 weights and activations, fp32 logits and norm statistics", _trt_fp16),
    Format("qdq-int8-symmetric", "tensorrt", ("int8",), True,
           "static W8A8 Q/DQ: per-channel weights, calibrated per-tensor activations, "
           "zero points 0, SmoothQuant", _trt_w8a8("int8")),
    Format("qdq-int4-block-weight-only", "tensorrt", ("int4",), False,
           "INT4 weights, DequantizeLinear(block_size) on 2-D constants, zero points 0", _trt_int4,
           ladder=(*_mixed("symmetric", None), ("offsets", None, 0.0))),
    Format("qdq-fp8", "tensorrt", ("fp8",), True,
           "static FP8 (E4M3) Q/DQ: per-channel weights, calibrated per-tensor activations",
           _trt_w8a8("fp8")),
)}


def format_for(target: Target, precision: str, override: str | None = None) -> Format:
    """The target's format for a precision (after Target.check_precision), or `override`."""
    target.check_precision(precision)
    if precision == "fp32":
        raise ToolkitError("fp32 is what `toolkit convert` writes; quantize to a lower precision",
                           hint=f"choose one of {', '.join(p for p in target.precisions if p != 'fp32')}")
    name = override or target.formats.get(precision)
    if name is None:
        raise ToolkitError(f"target {target.name} names no format for {precision}",
                           hint=f"add `{precision} = \"...\"` to the target's formats")
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ToolkitError(f"format {name!r} (target {target.name}, {precision}) is not implemented; "
                           f"known formats: {', '.join(sorted(FORMATS))}")
    if precision not in fmt.precisions or fmt.runtime != target.runtime:
        raise ToolkitError(f"format {name} writes {'/'.join(fmt.precisions)} for {fmt.runtime}, "
                           f"not {precision} for {target.name} ({target.runtime})")
    return fmt
