"""Progress for long steps: `with steps.step("exporting to ONNX"):` prints the step, then its time.

Library functions take a `Steps` (or None for silence) so tests can run them quietly and the
CLI can show what is happening during a minutes-long convert.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Steps:
    def __init__(self, total: int = 0, out: TextIO | None = sys.stderr, quiet: bool = False) -> None:
        self.total, self.n, self.out, self.quiet = total, 0, out, quiet
        self.timings: dict[str, float] = {}

    def say(self, text: str) -> None:
        if not self.quiet and self.out is not None:
            print(text, file=self.out, flush=True)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.n += 1
        count = f"[{self.n}/{self.total}] " if self.total else ""
        if not self.quiet and self.out is not None:
            print(f"{count}{title} …", end="", file=self.out, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.say(" failed")
            raise
        dt = time.perf_counter() - t0
        self.timings[title] = dt
        self.say(f" {dt:.1f}s")


QUIET = Steps(quiet=True)
