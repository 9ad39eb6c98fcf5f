"""Helpers for tests that drive the engine (device/serve/scheduler.py) in-process: prompts, a run
to the end, a slowed backend, a grammar in miniature."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from device.serve.scheduler import Finished, GenerationRequest, Scheduler, TextDelta


def prompt(runner: Any, word: str) -> list[int]:
    return runner.tokenizer.encode_chat([{"role": "user", "content": f"hello world {word}"}])


def run(engine: Scheduler, request: GenerationRequest) -> tuple[str, Finished]:
    with engine.reserve() as ticket:
        handle = engine.submit(ticket, request)
    text, final = [], None
    for event in handle.events(timeout=30):
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            final = event
    assert isinstance(final, Finished), final
    return "".join(text), final


class SlowBackend:
    """Delegates to a real backend, sleeping before every step (a slow device)."""

    def __init__(self, backend: Any, delay: float) -> None:
        self.inner, self.delay = backend, delay
        self.slots, self.max_seq, self.vocab_size = backend.slots, backend.max_seq, backend.vocab_size
        self.calls: list[tuple[Any, Any, list[int]]] = []

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
        time.sleep(self.delay)
        self.calls.append((ids, pos, list(slots)))
        return self.inner.step(ids, pos, slots, *rest)


class Watching:
    """Delegates to a real backend, recording every step: (ids shape, spare_token then, lengths)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: list[tuple[tuple[int, ...], bool, Any]] = []
        for name in ("kind", "slots", "max_seq", "vocab_size"):
            setattr(self, name, getattr(inner, name))
        self.ragged_steps = getattr(inner, "ragged_steps", False)
        self.row_spares = getattr(inner, "row_spares", False)

    @property
    def spare_token(self) -> bool:
        return bool(self.inner.spare_token)

    @spare_token.setter
    def spare_token(self, on: bool) -> None:
        self.inner.spare_token = on

    @property
    def spare_form(self) -> int:
        return int(self.inner.spare_form)

    @spare_form.setter
    def spare_form(self, form: int) -> None:
        self.inner.spare_form = form

    @property
    def spare_forms(self) -> tuple[int, ...]:
        return tuple(self.inner.spare_forms)

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any, **kw: Any) -> np.ndarray:
        self.seen.append((ids.shape, bool(self.inner.spare_token), kw.get("lengths")))
        return self.inner.step(ids, pos, slots, *rest, **kw)


class OnlyTokens:
    """A grammar in miniature (duck-typed as grammar.TokenConstraint): the output must be exactly
    `tokens`, then it is complete. Lets the engine's per-slot masking be checked without the
    optional engine installed."""

    def __init__(self, tokens: list[int], vocab: int) -> None:
        self.tokens, self.vocab, self.at = tokens, vocab, 0

    def mask(self, logits: np.ndarray) -> np.ndarray:
        out = np.full(self.vocab, -np.inf, np.float32)
        out[self.tokens[self.at]] = logits[self.tokens[self.at]]
        return out

    def advance(self, token: int) -> None:
        assert token == self.tokens[self.at]
        self.at += 1

    @property
    def finished(self) -> bool:
        return self.at == len(self.tokens)
