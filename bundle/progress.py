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
        self._open = False  # a step's title is printed and its line not ended yet

    def _print(self, text: str, end: str = "\n") -> None:
        if not self.quiet and self.out is not None:
            print(text, end=end, file=self.out, flush=True)

    def say(self, text: str) -> None:
        """A line of its own: inside a step, the step's title line is ended first."""
        if self._open:
            self._print("")
            self._open = False
        self._print(text)

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """`[n/total] title … 12.3s` on one line; where the step said something in between,
        the time comes on a line of its own: `  … 12.3s`."""
        self.n += 1
        count = f"[{self.n}/{self.total}] " if self.total else ""
        if self._open:  # a step inside a step: the outer title's line ends first
            self._print("")
        self._print(f"{count}{title} …", end="")
        self._open = True
        t0 = time.perf_counter()
        try:
            yield
        except KeyboardInterrupt:
            self._end("interrupted")
            raise
        except BaseException:
            self._end("failed")
            raise
        dt = time.perf_counter() - t0
        self.timings[title] = dt
        self._end(f"{dt:.1f}s")

    def _end(self, what: str) -> None:
        self._print(f" {what}" if self._open else f"  … {what}")
        self._open = False


QUIET = Steps(quiet=True)
