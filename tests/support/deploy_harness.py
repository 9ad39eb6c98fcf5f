"""Run a store daemon whose smoke test can be held: `python deploy_harness.py HOLD_DIR ARGS...`.

ARGS go to `toolkit serve` when they start with "serve" (the real daemon, --store), else to the
store-only daemon `python -m device.serve.deploy`. While HOLD_DIR/hold exists, a smoke test first writes
HOLD_DIR/smoke-started and then waits, so a test can SIGKILL the process in the middle of an
install (between the switch of `active` and the end of the smoke test) without racing a tiny
model that loads in 50 ms. Nothing else changes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from device.store import store  # noqa: E402

HOLD = Path(sys.argv[1])
_smoke = store.smoke_runner  # what both daemons run on a freshly loaded bundle


def held_smoke(runner, *args, **kwargs):  # type: ignore[no-untyped-def]
    if (HOLD / "hold").exists():
        (HOLD / "smoke-started").write_text(str(runner.path))
        deadline = time.monotonic() + 60
        while (HOLD / "hold").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return _smoke(runner, *args, **kwargs)


store.smoke_runner = held_smoke

if __name__ == "__main__":
    args = sys.argv[2:]
    if args and args[0] == "serve":
        from toolkit.cli import main

        main(args, prog_name="toolkit")
    else:
        from device.serve.deploy import main as transfer_main

        raise SystemExit(transfer_main(args))
