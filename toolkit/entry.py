"""The `toolkit` console script and `python -m toolkit`: toolkit.cli's group, behind a guard for
the import itself.

Importing toolkit.cli registers every subcommand (click, the command modules: ~0.1 s), and a
Ctrl-C in that window is raised before ToolkitGroup.invoke can turn it into one `interrupted`
line: Python printed a traceback of whichever import it hit and exited 1. Here it is the same
line and exit status 130 as anywhere else in the CLI. Only the toolkit and bundle packages'
__init__ and bundle.errors (~1 ms) load before the guard is up; what comes before them is the
interpreter's own start (site-packages), where Python itself reports a Ctrl-C.
"""

from __future__ import annotations

import sys
from typing import Any

from bundle.errors import INTERRUPTED_EXIT


def load_cli() -> Any:
    from toolkit.cli import main

    return main


def main(prog_name: str | None = None) -> None:
    try:
        cli = load_cli()
    except KeyboardInterrupt:
        interrupted()
    except Exception as e:
        # Python <= 3.11 wraps an exception raised while a class body's descriptors are set up
        # (a dataclass field's __set_name__) in RuntimeError: the Ctrl-C is its cause
        if not isinstance(e.__cause__, KeyboardInterrupt):
            raise
        interrupted()
    cli(prog_name=prog_name)


def interrupted() -> None:
    sys.stderr.write(("\n" if sys.stderr.isatty() else "") + "interrupted\n")
    sys.exit(INTERRUPTED_EXIT)
