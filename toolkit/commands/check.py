"""toolkit check BUNDLE [--tensorrt V]: the offline TensorRT ONNX parser check of a bundle."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--tensorrt", "tensorrt", default=None, metavar="VERSION",
              help="TensorRT version to check against (major.minor, e.g. 10.3). Default: the one "
                   "the bundle's target names; every known version for a CPU bundle.")
@click.option("--all", "every", is_flag=True,
              help="One line per offending node (default: one line per kind of offence).")
def check(bundle: Path, tensorrt: str | None, every: bool) -> None:
    """Check BUNDLE's graph against TensorRT's ONNX parser rules, without TensorRT.

    Every node's operator, domain, opset, types and importer restrictions (zero points, block
    DequantizeLinear, inputs that must be initializers, profiles for dynamic inputs) against the
    rule table of the TensorRT version (convert/trt_rules/). Prints one line per kind of offence
    with its count and first nodes (--all: one line per offending node).

    \b
    Exit codes: 0 the parser would accept the graph; 1 it would not (or an error).
    """
    from bundle.manifest import read_manifest
    from convert.trt_check import check_bundle

    report = check_bundle(bundle, tensorrt)
    for line in report.lines() if every else report.grouped():
        click.echo(line)
    versions = ", ".join(report.results)
    if report.passed:
        click.echo(f"ok: TensorRT {versions}'s ONNX parser rules accept {report.model.name} "
                   f"({'; '.join(report.rules)})")
        return
    counts = ", ".join(f"{len(found)} for TensorRT {v}" for v, found in report.results.items())
    click.echo(f"failed: offending nodes: {counts}", err=True)
    target = read_manifest(bundle).target
    if not target.builds_on_device:
        click.echo(f"note: this bundle is for target {target.name}, which runs ONNX Runtime's fused "
                   "operators; TensorRT's parser is not meant to take it. Convert with a Jetson "
                   "--target (toolkit targets) for a bundle that builds into an engine.", err=True)
    sys.exit(1)
