"""Stop strings over a stream of text deltas.

A stop string can straddle tokens ("\\n\\nUser:" may arrive as "\\n", "\\nUs", "er:"), so text
that might be the start of a stop string is held back until the next delta decides it. When a
stop string appears, the output ends just before it: the stop string itself is never sent
(OpenAI's behaviour; vLLM's include_stop_str_in_output=False default).

    m = StopMatcher(["###"])
    m.push("Hello #")   -> StopUpdate(text="Hello ", stopped=None)   ("#" held back)
    m.push("## more")   -> StopUpdate(text="", stopped="###")
    m.flush()           -> whatever was held back, when generation ends for another reason
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopUpdate:
    text: str  # safe to send now
    stopped: str | None  # the stop string that ended the output, if one did


class StopMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""  # received, not yet sent: a possible stop-string prefix

    def push(self, delta: str) -> StopUpdate:
        if not self.stops:
            return StopUpdate(delta, None)
        text = self.pending + delta
        hit = self._first_stop(text)
        if hit is not None:
            at, stop = hit
            self.pending = ""
            return StopUpdate(text[:at], stop)
        keep = self._held_back(text)
        self.pending = text[len(text) - keep:] if keep else ""
        return StopUpdate(text[:len(text) - keep], None)

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in text (ties: the longest), as (index, stop)."""
        best: tuple[int, str] | None = None
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(stop) > len(best[1]))):
                best = (at, stop)
        return best

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for n in range(min(len(text), self.longest - 1), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0
