"""toolkit convert MODEL --target T: export, compile, check parity, write the bundle."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model")
@click.option("--target", "-t", default="cpu", show_default=True,
              help="Deployment target (see `toolkit targets`).")
@click.option("--max-seq", type=int, default=None,
              help="Static KV cache capacity in tokens (prompt + generated). "
                   "Default: the target's default, capped at the model's limit.")
@click.option("--batch", type=int, default=1, show_default=True,
              help="KV cache slots: requests the device serves at once.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Bundle folder. Default: bundles/<model>-<target>-<precision>.")
@click.option("--force", is_flag=True, help="Replace an existing bundle at the output path.")
@click.option("--threads", type=int, default=None, help="CPU threads for parity runs.")
def convert(model: str, target: str, max_seq: int | None, batch: int, output: Path | None,
            force: bool, threads: int | None) -> None:
    """Convert MODEL into a bundle for a target.

    MODEL is a Hugging Face folder, a .gguf file, an .onnx file, or a packaged model name
    (smollm2-135m, all-minilm-l6-v2). Every convert checks the exported graph against PyTorch
    (logits and 32 greedy tokens) and writes nothing if it does not match.

    \b
    Examples:
      toolkit convert smollm2-135m --target cpu
      toolkit convert all-minilm-l6-v2
      toolkit convert ./my-llama --target jetson-orin-nano-8gb --max-seq 4096
    """
    from convert.pipeline import convert_model
    from toolkit.progress import Steps
    from toolkit.summary import convert_summary

    steps = Steps(total=5)
    result = convert_model(model, target, output, max_seq, batch, force, threads, steps)
    click.echo(convert_summary(result))
