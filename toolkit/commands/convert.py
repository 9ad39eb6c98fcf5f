"""toolkit convert MODEL --target T: export, compile, check parity, write the bundle."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.options import gate_options, shape_options, target_option, threads_option


@click.command()
@click.argument("model")
@target_option
@shape_options
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle folder. Default: bundles/<model>-<target>-<precision>.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@threads_option("CPU threads for parity runs.")
@click.option("--precision", "-p", type=click.Choice(["fp32", "fp16", "int8", "int4", "fp8"]),
              default="fp32", show_default=True,
              help="Quantize after converting (as `toolkit quantize` does, behind its accuracy "
                   "gate), in the format the target runs.")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration text (UTF-8) for --precision; default: text shipped with the toolkit.")
@gate_options
def convert(model: str, target: str, max_seq: int | None, batch: int, output: Path | None,
            force: bool, threads: int | None, precision: str, calibration: Path | None,
            limits: dict[str, float | None]) -> None:
    """Convert MODEL into a bundle for a target.

    MODEL is a Hugging Face folder, a .gguf file, an .onnx file, or a packaged model name
    (smollm2-135m, all-minilm-l6-v2). Every convert checks the exported graph against PyTorch
    (logits and 32 greedy tokens) and writes nothing if it does not match. With --precision
    the fp32 bundle is then quantized, and nothing is written if the accuracy gate fails
    (--force writes it anyway, with the failure recorded; the gate's limits as in `toolkit
    quantize`). --force also converts a model the fit plan says will not fit the target, and
    replaces an existing bundle.

    \b
    Examples:
      toolkit convert smollm2-135m --target cpu
      toolkit convert smollm2-135m --target cpu --precision int4
      toolkit convert all-minilm-l6-v2
      toolkit convert ./my-llama --target jetson-orin-nano-8gb --max-seq 4096
    """
    from bundle.progress import Steps
    from convert.pipeline import convert_model
    from convert.summary import convert_summary

    if precision == "fp32":
        _check_fp32_flags(calibration, limits)
        result = convert_model(model, target, output, max_seq, batch, force, threads, Steps(total=5))
        click.echo(convert_summary(result))
        return
    from quantize.pipeline import convert_and_quantize

    click.echo(convert_and_quantize(model, target, precision, output, max_seq, batch, force,
                                    threads, calibration, limits))


def _check_fp32_flags(calibration: Path | None, limits: dict[str, float | None]) -> None:
    """--calibration and the gate's limits apply to the quantize step; an fp32 convert has none
    (it is checked for parity with PyTorch instead), so they would be ignored."""
    from bundle.errors import ToolkitError

    given = (["--calibration"] if calibration is not None else []) + \
        [f"--{k.replace('_', '-')}" for k, v in limits.items() if v is not None]
    if given:
        raise ToolkitError(f"{', '.join(given)} apply to quantizing, and --precision fp32 (the default) "
                           "quantizes nothing", hint=f"drop {', '.join(given)}, or pass --precision "
                           "int8, int4, fp16 or fp8")
