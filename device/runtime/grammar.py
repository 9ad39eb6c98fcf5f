"""Constrained decoding: a JSON schema as a per-request token mask over the logits.

    compiler = GrammarCompiler(tokenizer_json, vocab_size=49152, stop_ids=[0, 2])  # once per model
    constraint = compiler.json_schema({"type": "object", ...})  # per request; GrammarError: 400
    logits = constraint.mask(logits)        # [V] -> [V] copy, forbidden tokens at -inf
    token = sample(logits, params, rng)
    constraint.advance(token)               # the grammar moves on; .finished once the JSON is whole

The scheduler applies the mask to each constrained row after the backend's step and before
sampling (device/serve/scheduler.py), so it is the same code for ONNX Runtime and TensorRT, and
constrained and free requests share a batched step: the mask touches only its own row.

Engine: llguidance (guidance-ai; the engine behind llama.cpp's %llguidance grammars and one of
vLLM's and SGLang's structured-output backends), chosen over the two others the issue names:
- install on the boards: one cp39-abi3 manylinux aarch64 wheel serves Python 3.10 (JetPack 6)
  and 3.12/3.13 (JetPack 7) alike, and it has no Python dependencies. xgrammar 0.2.9 declares
  torch and transformers as requirements (Requires-Dist), which the device install must never
  pull (no torch on the daemon; JetPack's torch is NVIDIA's own build), and ships per-CPython
  wheels. outlines-core has wheels too, but turns a schema into one regular expression (no
  recursive schemas) and builds its index (automaton x vocabulary) per schema up front.
- per-token cost: llguidance computes the mask lazily at each step with an Earley parser over a
  token trie (tens of microseconds for JSON on a 50k vocabulary; bench/structured.py measures
  the end-to-end cost here), with no per-schema precompilation; outlines-core's index costs
  seconds for a nested schema before the first token.
- maintenance: llguidance releases monthly, MIT, and supports the JSON-schema keywords a tool
  or response_format needs (nested objects, arrays with bounds, enums, numeric bounds, anyOf).
It is optional (the `structured` extra): without it a request that needs a grammar is refused
with a 400 naming the extra (`available()` / INSTALL_HINT).

The bitmask llguidance writes is [ceil(V/32)] int32 words, token t allowed when bit t%32 of
word t//32 is set; np.unpackbits(..., bitorder="little") turns it into a [V] boolean row.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np

EXTRA = "structured"
INSTALL_HINT = f"pip install 'edge-toolkit[{EXTRA}]'"
MAX_SCHEMA_BYTES = 64 << 10  # a schema's JSON text; tool definitions of real APIs are a few kB


class GrammarError(ValueError):
    """A schema the engine refuses (unsupported keyword, contradiction, too large)."""


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class TokenConstraint:
    """One request's grammar state: the mask for its next token and the tokens it took."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)  # [ceil(V/32)] bitmask

    def allowed(self) -> np.ndarray:
        """[V] bool: the tokens the grammar accepts next (stop tokens once the JSON is whole)."""
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        bits = np.unpackbits(self._words.view(np.uint8), bitorder="little")
        return bits[:self.vocab_size].view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [V] -> a copy with every token the grammar forbids at -inf (the backend's own
        buffer is left alone: it may be a view of the next step's output)."""
        return np.where(self.allowed(), logits, np.float32(-np.inf))

    def advance(self, token: int) -> None:
        """Feed the sampled token; a token outside the mask (never, when mask() ran) raises."""
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: no token but a stop token may follow."""
        return bool(self.matcher.is_stopped())


class GrammarCompiler:
    """llguidance's view of one model's vocabulary, built once (about a second for a 50k
    vocabulary) and shared by every request's matcher. Thread-safe: matchers are created on
    the HTTP threads (schema compilation releases the GIL), consumed on the engine thread."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int]) -> None:
        import llguidance

        self.vocab_size = vocab_size
        self._ll = llguidance
        # n_vocab: the logits' width, which may exceed the tokenizer's (padded embeddings)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=list(stop_ids) or None)

    def json_schema(self, schema: dict[str, Any]) -> TokenConstraint:
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_BYTES:
            raise GrammarError(f"the schema has {len(text)} bytes of JSON; at most {MAX_SCHEMA_BYTES}")
        try:
            # compact separators, no whitespace between tokens: shorter outputs, and a small
            # model cannot wander into endless blank lines inside an object
            grammar = self._ll.LLMatcher.grammar_from_json_schema(
                text, defaults={"whitespace_flexible": False})
            matcher = self._ll.LLMatcher(self.tokenizer, grammar, log_level=0)
        except Exception as e:  # noqa: BLE001 - the engine's own errors on a schema it refuses
            raise GrammarError(_one_line(str(e))) from e
        if matcher.is_error():
            raise GrammarError(_one_line(matcher.get_error()))
        return TokenConstraint(matcher, self.vocab_size)


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."


class LazyCompiler:
    """The compiler built on first use (most requests need none: the daemon does not pay the
    vocabulary's second and memory until one does)."""

    def __init__(self, tokenizer_json_path: str, vocab_size: int, stop_ids: list[int]) -> None:
        self.path, self.vocab_size, self.stop_ids = tokenizer_json_path, vocab_size, stop_ids
        self._compiler: GrammarCompiler | None = None
        # why the build failed, kept as text: a bundle's tokenizer.json does not change while it
        # is served, so every later request gets the same answer without reading it again (a
        # new exception each time: re-raising one object grows its traceback by every request)
        self._failure: str | None = None
        self._lock = threading.Lock()

    def get(self) -> GrammarCompiler:
        with self._lock:
            if self._failure is not None:
                raise RuntimeError(self._failure)
            if self._compiler is None:
                try:
                    with open(self.path, encoding="utf-8") as f:
                        self._compiler = GrammarCompiler(f.read(), self.vocab_size, self.stop_ids)
                except Exception as e:  # noqa: BLE001 - the engine's own errors, or the file's
                    self._failure = str(e) or type(e).__name__
                    raise
            return self._compiler
