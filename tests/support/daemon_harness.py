"""Run the real daemon on a slow device: `python daemon_harness.py SECONDS toolkit-serve-args...`.

Every decoder step sleeps SECONDS before it runs (fault injection by wrapping, as vLLM's tests
monkeypatch `forward`), so a test can hold a slot, fill the queue or send SIGTERM mid-stream
without racing a model that finishes in a millisecond. Nothing else changes: same CLI, same
server, same engine.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from device.runtime import ort_backend  # noqa: E402

DELAY_S = float(sys.argv[1])
_step = ort_backend.OrtDecoderBackend.step


def slow_step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    time.sleep(DELAY_S)
    return _step(self, *args, **kwargs)


ort_backend.OrtDecoderBackend.step = slow_step  # type: ignore[method-assign]

if __name__ == "__main__":
    from toolkit.cli import main

    main(["serve", *sys.argv[2:]], prog_name="toolkit")
