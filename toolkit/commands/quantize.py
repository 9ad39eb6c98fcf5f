"""toolkit quantize BUNDLE --precision P: an fp32 bundle -> a quantized bundle, gated on accuracy."""

from __future__ import annotations

from pathlib import Path

import click

from quantize.calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN
from toolkit.options import gate_options, threads_option

PRECISIONS = ["fp16", "fp8", "int8", "int4"]


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--precision", "-p", required=True, type=click.Choice(PRECISIONS),
              help="Target precision; the bundle's target decides the format (`toolkit targets show`).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="UTF-8 text to calibrate activation ranges (static Q/DQ formats). "
                   "Default: the text the toolkit ships.")
@click.option("--samples", type=int, default=DEFAULT_SAMPLES, show_default=True,
              help="Calibration windows.")
@click.option("--seq-len", type=int, default=DEFAULT_SEQ_LEN, show_default=True,
              help="Tokens per calibration window.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle folder. Default: beside BUNDLE, with the precision in its name.")
@click.option("--force", is_flag=True,
              help="Replace an existing output, and write the bundle even when the gate fails "
                   "(the manifest records the failure).")
@gate_options
@click.option("--int4-grid", type=click.Choice(["symmetric", "zero-point", "offsets"]), default=None,
              help="int4 block grid, in blocks of 32. Default: the gate walks the format's ladder "
                   "of (grid, block size), fastest first (cpu: zero-point/64, then zero-point/64 "
                   "with the most sensitive 1/8, 1/4, 1/2 of the weights at 8 bits, symmetric/32, "
                   "zero-point/32, offsets/32), and keeps the first that passes.")
@click.option("--awq/--no-awq", default=None,
              help="int4: AWQ before the symmetric and zero-point grids (rescales each weight's "
                   "input channels by their calibration activations and rounds by output error; "
                   "the offset grid stays exact). Default: on.")
@threads_option("CPU threads for calibration and the gate.")
@click.option("--format", "fmt", default=None, metavar="NAME",
              help="Override the target's format for this precision (experiments and benchmarks; "
                   "e.g. ort-matmulnbits or ort-matmul-integer for cpu int8).")
def quantize(bundle: Path, precision: str, calibration: Path | None, samples: int, seq_len: int,
             output: Path | None, force: bool, limits: dict[str, float | None], int4_grid: str | None,
             awq: bool | None, threads: int | None, fmt: str | None) -> None:
    """Quantize an fp32 BUNDLE to a lower precision for the same target.

    The format comes from the bundle's target (cpu: MatMulNBits for ONNX Runtime; Jetson:
    Q/DQ or fp16 graphs for TensorRT). The result is checked against the fp32 bundle on
    held-out text (perplexity, top-1 agreement, greedy continuations; cosine for encoders); a
    failing gate exits non-zero and writes nothing unless --force.

    \b
    Examples:
      toolkit quantize bundles/smollm2-135m-cpu-fp32 --precision int4
      toolkit quantize bundles/smollm2-135m-jetson-fp32 -p int8 --calibration prompts.txt
      toolkit quantize bundles/all-minilm-l6-v2-cpu-fp32 -p int8 --min-cosine 0.995
    """
    from bundle.progress import Steps
    from quantize.formats import QuantOptions
    from quantize.pipeline import GateFailure, quantize_bundle, steps_total
    from quantize.report import failure_summary, summary

    _check_int4_flags(precision, int4_grid, awq)
    options = QuantOptions(int4_grid=int4_grid, awq=awq is not False)
    try:
        result = quantize_bundle(bundle, precision, calibration=calibration, samples=samples,
                                 seq_len=seq_len, out=output, force=force, thresholds=limits,
                                 steps=Steps(total=steps_total(precision, options)), threads=threads,
                                 fmt=fmt, options=options)
    except GateFailure as e:
        click.echo(failure_summary(e.gate), err=True)
        raise
    click.echo(summary(result))


def _check_int4_flags(precision: str, int4_grid: str | None, awq: bool | None) -> None:
    from bundle.errors import ToolkitError

    if int4_grid and precision != "int4":
        raise ToolkitError(f"--int4-grid applies to int4, not {precision}", hint="drop --int4-grid")
    if awq is not None and precision != "int4":
        raise ToolkitError(f"--awq/--no-awq applies to int4 weights, not {precision}",
                           hint="drop the flag")
    if awq and int4_grid == "offsets":
        raise ToolkitError("AWQ applies to the plain int4 grids (symmetric, zero-point); the offset "
                           "grid keeps each block's own range and takes no rescaling",
                           hint="drop --awq, or choose --int4-grid symmetric or zero-point")
