"""toolkit compile BUNDLE: build a Jetson bundle's TensorRT engine on this device."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Rebuild the engine even when it matches this device.")
def compile(bundle: Path, force: bool) -> None:
    """Build the TensorRT engine of BUNDLE for this device.

    Run it on the Jetson the bundle was converted for (or a machine with the same GPU and
    TensorRT); the engine is kept in BUNDLE/engines/ and the daemon uses it. Elsewhere nothing
    is built and the daemon builds the engine at first load. A CPU bundle has nothing to compile.

    \b
    Exit codes: 0 built, up to date or nothing to compile; 1 error;
                2 not built here (the daemon builds it on the device).
    """
    from bundle.progress import Steps
    from convert.compile import compile_bundle

    result = compile_bundle(bundle, force=force, progress=Steps())
    click.echo(result.message)
    if result.exit_code:
        sys.exit(result.exit_code)
