"""Concurrency over the fixed KV slots: admission, a bounded queue, continuous batching.

    engine = Scheduler(runner.backend, runner.tokenizer, queue_limit=16)
    engine.start()
    with engine.reserve() as ticket:               # 503 at once when slots + queue are full
        prompt = runner.tokenizer.encode("Hi")       # expensive work only after admission
        handle = engine.submit(ticket, GenerationRequest(prompt, max_tokens=32, params=...))
    for event in handle.events(): ...               # TextDelta ... then Finished | Failed

One engine thread owns the backend. Each loop iteration
  1. admits waiting requests into free slots, where they wait to be prefilled,
  2. prefills: while no slot decodes, the waiting prompts, each in one step (B=1), oldest
     first while they fit in BURST_TOKENS prompt tokens together (the first always), so
     requests that arrive together start decoding together, in full batches (a first token is
     streamed as soon as its own prompt is read); while others decode, at most ONE chunk of
     the oldest waiting prompt, paced by the decode time (device/serve/prefill.py), so a long
     prompt delays the others' tokens by bounded chunks instead of its whole prefill. A
     prompt's first step copies the longest prefix of it that the prefix cache holds
     (device/serve/prefix_cache.py) into its slot and reads only the rest; a prompt read in
     full stores its whole blocks in the prefix cache and samples its first token (prompt and
     answer are stored again when it finishes),
  3. runs ONE decode step for all active slots together,
  4. samples each row with its request's own seeded generator and streams the text. A row
     with a grammar (response_format, a required tool call) is masked first, and a row with
     presence/frequency penalties penalized first: both touch only that row's logits [V], so
     constrained, penalized and free requests share one batched step.
A request that finishes, fails or is cancelled frees its slot in the same iteration.
Greedy rows may draft (prompt lookup, `speculate="ngram"`): a row whose last tokens occurred
before in its prompt or output is stepped alone with its pending token plus the tokens that
followed there, and keeps the run of them the model agrees with (see _verify). With several
slots and a ragged graph (convert/ragged.py: the bundle's model.ragged.onnx, ONNX Runtime 1.32)
the engine steps jointly while some row may draft: every decode step runs every row of the
span at once, each with its pending token and up to T - 1 tokens of its draft, or a spare
where it has none (the graph's, at the attention nodes, where it gives one), padded to one T
the plan picks from the measured step times and each row's acceptance (_decode_joint,
draft_plan.joint_length); while none may (sampled rows only), the plain batched step runs.
Otherwise (an older runtime, TensorRT) a drafting row is stepped alone (B=1), since
GroupQueryAttention takes several tokens per step over a cache only for one row; with several
rows decoding, a row verifies its draft only where the measured step times and its acceptance
so far say that raises tokens per second (device/serve/draft_plan.py), and while some rows ride
the batched step the verify steps beside it may add at most two plain steps' time (their time
per output token stays within 3x); the batched step runs as before unless every row verified.

Why results do not depend on what else is running (checked, not assumed): ONNX Runtime's CPU
kernels give bit-identical logits for a row whether it is decoded alone or inside a batch of
2..slots rows, and whatever the other rows hold (measured on the tiny test Llama and on
SmolLM2-135M at 1 and 2 threads: max |diff| = 0.0). Other backends need not (TensorRT picks
kernels per optimization profile), so at start the engine runs `probe_batch_invariance`: the
same decode alone and in every batch size. Only if all rows match bit for bit does it decode in
batches; otherwise it steps each row on its own (B=1), which is what a request running alone
does. `decode_mode` forces either. Joint steps have their own probe (probe_ragged): rows of
2..5 real tokens in one ragged step against each row alone with its spare, which is what a
one-slot engine computes, so there a greedy row's output is the same with 1 or 8 slots (where
only steps of an even number of token rows pass, the engine runs only those: even_steps). (The
one exception to "whatever else runs": in a joint engine a sampled row steps in the spare form
while greedy rows share its steps and in the plain form otherwise; see __init__.)

The batched step covers the contiguous span of slots lo..hi that holds every active slot (free
slots are handed out lowest first, which keeps the span short). A contiguous span is a view of
the cache, so the backend neither gathers nor copies; rows of free slots inside the span are
padding (token 0 at position 0: they write position 0 of a free slot, which the next prefill of
that slot overwrites). A slot still prefilling is padding too, at the position its next chunk
writes (which that chunk then overwrites), never at a position it already holds. Token ids
and positions live in two [slots, 1] arrays allocated here once, so a decode step allocates
nothing beyond the backend's own preallocated buffers.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bundle.contract import SPARE_AT_ATTENTION, SPARE_WHOLE
from bundle.errors import ToolkitError
from device.runtime.backend import DecoderBackend
from device.runtime.draft import VERIFY_TOLERANCE, PromptLookup, verify_step_deviation
from device.runtime.generate import prefill
from device.runtime.grammar import LazyCompiler, TokenConstraint
from device.runtime.sampling import SamplingParams, TokenLogprob, penalize, sample, token_logprob
from device.runtime.stopping import StopMatcher
from device.runtime.tokenizer import BundleTokenizer, StreamDecoder
from device.serve.config import DECODE_MODES, DRAFT_TOKENS, SPECULATE_MODES, check_budget
from device.serve.draft_plan import Acceptance, Row, StepCosts, joint_length, plan
from device.serve.metrics import ServingMetrics
from device.serve.prefill import ChunkSizer, PrefillJob
from device.serve.prefix_cache import BLOCK_TOKENS, PrefixCache

log = logging.getLogger("toolkit.daemon")

EVENT_POLL_S = 0.5  # how often a waiting HTTP thread wakes to check that its client is still there
# An idle engine reads the prompts that arrived together before it decodes any of them, up to
# this many tokens (vLLM's scheduler batches waiting prefills the same way, to its
# max_num_batched_tokens, 2048 by default). Reading them one by one between decode steps, as
# when others already decode, staggered a burst: 8 requests of 128 tokens started 1..8 steps
# apart, so the batch was full only in the middle and the ragged ends ran 1..7 rows a step
# (8-slot int8 SmolLM2: 235 tok/s aggregate against 286 for 8-row steps). Bounded so a burst of
# long prompts still streams (each first token as soon as its prompt is read, the rest chunked).
BURST_TOKENS = 2048


class RequestRejected(Exception):
    """A request the daemon will not run: the HTTP layer turns it into a 4xx/503 error body."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.param, self.retry_after = param, retry_after


# --- records ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)
    # the request's grammar state (device/runtime/grammar.py), compiled on the HTTP thread; the
    # engine thread alone masks and advances it. The output ends when the grammar is complete.
    constraint: TokenConstraint | None = None
    logprobs: int | None = None  # None: off; k: each token's logprob and its k likeliest peers


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    drafted_tokens: int = 0  # prompt-lookup draft tokens verified (device/runtime/draft.py)
    accepted_tokens: int = 0  # ... of which the model's own choice equalled the draft

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens,
                               "completion_tokens": self.completion_tokens,
                               "total_tokens": self.prompt_tokens + self.completion_tokens}
        if self.drafted_tokens:  # OpenAI's names for predicted outputs
            out["completion_tokens_details"] = {
                "accepted_prediction_tokens": self.accepted_tokens,
                "rejected_prediction_tokens": self.drafted_tokens - self.accepted_tokens}
        return out


@dataclass(frozen=True)
class Timings:
    """Per-request latency, reported with llama-server's `timings` names (protocols.md §1a)."""

    queue_s: float
    prompt_s: float  # prefill
    ttft_s: float  # arrival -> first token
    decode_s: float  # first token -> last token
    prompt_n: int
    predicted_n: int
    draft_n: int = 0  # draft tokens verified; llama-server reports both only when it drafted
    draft_n_accepted: int = 0

    def to_json(self) -> dict[str, float]:
        per_tok = self.decode_s / (self.predicted_n - 1) if self.predicted_n > 1 else 0.0
        out = {"queue_ms": self.queue_s * 1e3, "ttft_ms": self.ttft_s * 1e3,
               "prompt_n": self.prompt_n, "prompt_ms": self.prompt_s * 1e3,
               "prompt_per_second": self.prompt_n / self.prompt_s if self.prompt_s else 0.0,
               "predicted_n": self.predicted_n, "predicted_ms": self.decode_s * 1e3,
               "predicted_per_token_ms": per_tok * 1e3,
               "predicted_per_second": 1.0 / per_tok if per_tok else 0.0}
        if self.draft_n:
            out.update(draft_n=self.draft_n, draft_n_accepted=self.draft_n_accepted)
        return out


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens behind this text and any held back before


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: str | int | None  # the stop string or stop token id, when finish_reason="stop"
    usage: Usage
    timings: Timings
    logprobs: tuple[TokenLogprob, ...] = ()  # tokens whose text had not been sent yet


@dataclass(frozen=True)
class Failed:
    status: int
    code: str
    message: str


@dataclass(frozen=True)
class Embedded:
    embeddings: np.ndarray  # [N, C] float32
    prompt_tokens: int


Event = TextDelta | Finished | Failed | Embedded


class RequestHandle:
    """The HTTP thread's side of one request: its event stream and a way to cancel it."""

    _ids = itertools.count(1)

    def __init__(self, request: Any, on_cancel: Any) -> None:
        self.id = next(self._ids)
        self.request = request
        self.arrival = time.monotonic()
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop this request (client gone): it leaves the queue or frees its slot."""
        if not self._cancelled.is_set():
            self._cancelled.set()
            self._on_cancel(self)

    def put(self, event: Event) -> None:
        self._events.put(event)

    def next_event(self, timeout: float = EVENT_POLL_S) -> Event | None:
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Every event up to and including the final one (for in-process callers and tests)."""
        while True:
            event = self._events.get(timeout=timeout)
            yield event
            if not isinstance(event, TextDelta):
                return


# --- admission -------------------------------------------------------------------------------

class Ticket:
    """A place reserved in the daemon (protocols.md §2.1: reserve before expensive work,
    release on every exit path). Usable as a context manager: leaving it unsubmitted releases."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.open = True

    def release(self) -> None:
        if self.open:
            self.open = False
            self.admission.release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.open:
            self.release()


class Admission:
    """in_flight (reserved + waiting + running) <= slots + queue_limit; 503 beyond, or when
    draining. One lock and one condition, shared with the engine that owns it."""

    def __init__(self, capacity: int, queue_limit: int) -> None:
        self.capacity, self.queue_limit = capacity, queue_limit
        self.limit = capacity + queue_limit
        self.in_flight = 0
        self.draining = False
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)

    def reserve(self) -> Ticket:
        with self.lock:
            if self.draining:
                raise RequestRejected(503, "draining", "the daemon is shutting down", retry_after=5)
            if self.in_flight >= self.limit:
                raise RequestRejected(
                    503, "overloaded", f"the daemon is at capacity ({self.capacity} running, "
                    f"{self.queue_limit} queued); retry later", retry_after=1)
            self.in_flight += 1
        return Ticket(self)

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self.changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self.lock:
            return self.changed.wait_for(lambda: self.in_flight == 0, timeout)

    def enqueue(self, ticket: Ticket, queue: deque[Any], item: Any) -> None:
        """The request takes its reserved place: it joins the engine's `queue` and the engine
        wakes. The place now belongs to the request; the engine releases it when it ends."""
        with self.lock:
            if not ticket.open:
                raise RuntimeError("a ticket was submitted twice")
            ticket.open = False
            queue.append(item)
            self.changed.notify_all()

    def begin_drain(self) -> None:
        with self.lock:
            self.draining = True


class QueuedEngine:
    """What the decoder and encoder engines share: an Admission, the queue of requests that
    hold a place, one engine thread (the subclass's `_run`), and how they start, drain and
    stop. Subclasses set up their own state, then call `_init_queue`."""

    admission: Admission

    def _init_queue(self, admission: Admission, thread_name: str) -> None:
        self.admission = admission
        self._waiting: deque[RequestHandle] = deque()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def reserve(self) -> Ticket:
        return self.admission.reserve()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def begin_drain(self) -> None:
        self.admission.begin_drain()

    def wait_idle(self, timeout: float) -> bool:
        return self.admission.wait_idle(timeout)

    def close(self, timeout: float = 10.0) -> None:
        with self.admission.lock:
            self._stop = True
            self.admission.changed.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)


# --- the decoder engine ----------------------------------------------------------------------

@dataclass
class _Slot:
    """Engine-thread state of one running request."""

    handle: RequestHandle
    slot: int
    rng: np.random.Generator
    decoder: StreamDecoder
    stops: StopMatcher
    budget: int  # tokens it may still produce in total: min(max_tokens, cache room)
    pos: int  # next cache position to write (= tokens in the cache)
    admitted: float
    prefilled: float = 0.0
    first_token: float = 0.0
    generated: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)
    constraint: TokenConstraint | None = None
    counts: np.ndarray | None = None  # [V] int32 times each token was generated (penalties only)
    logprobs: list[TokenLogprob] | None = None  # not yet sent with a TextDelta (logprobs only)
    lookup: PromptLookup | None = None  # prompt + output so far, for drafting (greedy rows only)
    draft_limit: int = 0  # the longest draft its next verify step may take (see _verify)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # ... and accepted
    acceptance: Acceptance = field(default_factory=Acceptance)  # its recent draft tokens' p
    offered: int | None = None  # the first draft token it was offered and did not verify
    # a decode step wrote some of its keys/values without the spare token (a sampled or
    # penalized row of a whole-form one-slot engine, or in a joint engine's plain steps) while
    # prompts are read with it: those rows are not what a prompt's prefill writes, so its
    # output is not stored in the prefix cache
    plain_kv: bool = False


def smoke_test(backend: DecoderBackend) -> None:
    """One prefill and one decode step on slot 0 before serving anything (protocols.md §2.4):
    a bundle that loads but cannot run fails the start, not the first request."""
    try:
        logits = prefill(backend, [0, 0], 0)
        backend.step(np.zeros((1, 1), np.int64), np.full((1, 1), 2, np.int64), [0])
    except Exception as e:  # noqa: BLE001 - runtimes raise their own untyped errors
        raise ToolkitError(f"the model loads but a 2-token test inference fails: {e}",
                           hint="the bundle does not match this runtime; convert it again with "
                                "this toolkit version") from e
    if logits.shape != (backend.vocab_size,) or not np.isfinite(logits).all():
        raise ToolkitError(f"the test inference returned logits of shape {logits.shape} "
                           f"(expected ({backend.vocab_size},)) or non-finite values")


def probe_sizes(slots: int) -> list[int]:
    """The batch sizes the probes step: every size up to 16 (where a kernel's row blocking
    differs most from size to size), then powers of two and `slots` (every size up to 256 would
    be O(slots^2) rows of steps)."""
    return sorted({*range(2, min(slots, 16) + 1), *(1 << k for k in range(5, slots.bit_length())), slots})


def probe_batch_invariance(backend: DecoderBackend) -> str | None:
    """How a lone row must step for every row of a batched decode step to equal, bit for bit,
    the same row stepped so, for batch sizes 2..slots (below), with rows at different positions:
    "alone" (a step of one row), "paired" (beside another slot's padding row), or None
    (neither: decode per row). "paired" is for graphs with a one-row kernel of their own:
    ONNX Runtime 1.32's 4-bit MatMulNBits sums one row in another order than two or more, so an
    int4 row alone differs from the same row batched while rows of any two batches agree. Writes
    only positions that no request holds yet (it runs before the engine starts)."""
    slots = backend.slots
    if slots == 1:
        return "alone"
    rng = np.random.default_rng(0)
    lengths = [min(2 + s, backend.max_seq - 2) for s in range(slots)]
    for s, n in enumerate(lengths):
        prefill(backend, rng.integers(0, backend.vocab_size, n).tolist(), s)
    ids = rng.integers(0, backend.vocab_size, (slots, 1)).astype(np.int64)
    pos = np.array([[n] for n in lengths], dtype=np.int64)
    batched = [backend.step(ids[:b], pos[:b], list(range(b)))[:, -1].copy() for b in probe_sizes(slots)]

    def lone(s: int, paired: bool) -> np.ndarray:
        lo = (s if s + 1 < slots else s - 1) if paired else s
        hi = lo + 2 if paired else s + 1
        return backend.step(ids[lo:hi], pos[lo:hi], list(range(lo, hi)))[s - lo, -1].copy()

    for how in ("alone", "paired"):
        ref = [lone(s, how == "paired") for s in range(slots)]
        if all(np.array_equal(out[r], ref[r]) for out in batched for r in range(len(out))):
            return how
    return None


def spare_form(backend: DecoderBackend, k: int = 4) -> int:
    """SPARE_AT_ATTENTION where, in that form, a one-token step's logits equal the same tokens'
    in a step of k + 1, bit for bit (convert/spare_token.py: every default CPU precision on ONNX
    Runtime 1.32, where it costs about nothing and the whole form int8 +26 %); SPARE_WHOLE
    otherwise, the form exact wherever multi-row kernels agree on their rows. k is short (a
    start-up probe, on a device whose steps may be slow): the drafting probe, at the draft
    length, follows in the form chosen here. A graph older than the attention form
    (backend.spare_forms) or without a spare gets SPARE_WHOLE unprobed."""
    if SPARE_AT_ATTENTION not in getattr(backend, "spare_forms", (SPARE_AT_ATTENTION,)):
        return SPARE_WHOLE  # (a wrapper without spare_forms: probed as it steps)
    backend.spare_token, backend.spare_form = True, SPARE_AT_ATTENTION
    exact = verify_step_deviation(backend, k) == 0.0
    backend.spare_form = SPARE_WHOLE
    return SPARE_AT_ATTENTION if exact else SPARE_WHOLE


def probe_ragged(backend: DecoderBackend, tokens: int = 4, least: int = 2, even: bool = False) -> bool:
    """Whether joint steps are exact here: rows of least..T real tokens in one ragged step
    (convert/ragged.py), for T = `tokens` and `tokens` + 1 and the batch sizes of probe_sizes,
    give bit for bit what each row gives stepped alone with its spare token (backend.spare_token
    must be on, in the form the engine's lone rows take), which is what the one-slot engine
    computes. least = 2: the rows carry their spare as a real token from the host; least = 1:
    rows of one real token take the graph's row spare (backend.row_spares, the attention form).
    Measured on ONNX Runtime 1.32 for SmolLM2-135M and the tiny test Llama at fp32, int8 and
    int4; checked, not assumed, because a kernel's blocking may depend on the rows (a row with
    one real token and no spare already differs: the kernel's one-query path). The last row of
    each batch is full, so its last token is the step's last token row: 4-bit MatMulNBits sums
    token rows in pairs and an unpaired last one in its own order (its one-row kernel), so a
    step of b rows of T tokens, b * T odd, differs there. even: probe only steps of an even
    number of token rows, the ones an engine with even_steps runs. Writes only positions no
    request holds (run before serving)."""
    slots = backend.slots
    if backend.max_seq < tokens + 5:  # no room for a prompt and the rows: not worth it there
        return False
    rng = np.random.default_rng(1)
    starts = [min(3 + s % 5, backend.max_seq - 2 - tokens) for s in range(slots)]
    for s, n in enumerate(starts):
        prefill(backend, rng.integers(0, backend.vocab_size, n).tolist(), s)
    for T in (tokens, tokens + 1):
        ids = rng.integers(0, backend.vocab_size, (slots, T)).astype(np.int64)
        short = [least + s % (T - least + 1) for s in range(slots)]
        alone: dict[tuple[int, int], np.ndarray] = {}  # (row, real tokens) -> its logits stepped alone
        for b in probe_sizes(slots):
            if even and b * T % 2:
                continue
            lens = np.array([*short[:b - 1], T], np.int32)
            rows = ids[:b].copy()
            pos = np.array([[p + min(i, n - 1) for i in range(T)] for p, n in zip(starts, lens)], np.int64)
            for r, n in enumerate(lens):
                rows[r, n:] = 0
                if (r, n) not in alone:
                    alone[r, n] = backend.step(rows[r:r + 1, :n], pos[r:r + 1, :n], [r])[0].copy()
            out = backend.step(rows, pos, list(range(b)), lengths=lens)
            if not all(np.array_equal(out[r, :n], alone[r, n]) for r, n in enumerate(lens)):
                return False
    return True


class Scheduler(QueuedEngine):
    """Continuous batching over a decoder backend's slots (see the module docstring)."""

    def __init__(self, backend: DecoderBackend, tokenizer: BundleTokenizer, queue_limit: int = 16,
                 metrics: ServingMetrics | None = None, decode_mode: str = "auto",
                 prefix_cache_bytes: int = 0, prefill_chunk: int | None = None,
                 prefix_block_tokens: int = BLOCK_TOKENS,
                 speculate: str = SPECULATE_MODES[-1], draft_tokens: int = DRAFT_TOKENS) -> None:
        """prefix_cache_bytes: the prefix cache's budget (0: off); prefill_chunk: tokens per
        interleaved prefill chunk (None: sized by time, 0: off), device/serve/prefill.py."""
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode {decode_mode!r} is not one of {DECODE_MODES}")
        if speculate not in SPECULATE_MODES:
            raise ValueError(f"speculate {speculate!r} is not one of {SPECULATE_MODES}")
        # prompt-lookup drafting: up to draft_tokens per step for greedy rows (see _verify)
        self.draft_tokens = draft_tokens if speculate == "ngram" else 0
        self.costs = StepCosts()  # the decode and verify steps' times, for _verify_drafts
        # (first slot, rows, tokens) of the steps run so far: the first run of a shape is not
        # timed (see _step)
        self._shapes: set[tuple[int, int, int]] = set()
        self.acceptance = Acceptance()  # every row's draft tokens: a new row's prior
        self.backend, self.tokenizer = backend, tokenizer
        self.slots, self.max_seq = backend.slots, backend.max_seq
        self.stop_ids = frozenset(tokenizer.stop_ids)
        # response_format / tool calls: the grammar engine's view of the vocabulary, built on the
        # first request that needs one (device/runtime/grammar.py)
        self.grammar = LazyCompiler(str(Path(tokenizer.folder) / "tokenizer.json"),
                                    backend.vocab_size, sorted(self.stop_ids))
        self.metrics = metrics or ServingMetrics()
        self._init_queue(Admission(self.slots, queue_limit), "engine")
        smoke_test(backend)
        # One slot: greedy rows and prompts step with the spare token (backend.spare_token,
        # convert/spare_token.py), so a drafted run verified in one step is exactly the single
        # steps it replaces at every precision, and a greedy row's keys are the same whether a
        # prompt (prefix cache) or a decode step wrote them, in the spare's cheaper form (at the
        # attention nodes only) where the probe finds it exact (spare_form). Sampled rows, which
        # never draft, keep the one-token step without it (the spare costs SmolLM2 about nothing
        # in that form, +26-28 % at int8/int4 through the whole graph; their step times stay out
        # of the drafting plan's costs). Several slots:
        # the same where the engine steps jointly (below); without joint steps, never (batched
        # steps of the plain graph cannot take it, and a row alone must equal it batched).
        # Several slots and a ragged graph (convert/ragged.py): joint steps. While some active
        # row may draft (greedy), every decode step runs every row of the span at once, each
        # with its pending token and its draft (or a spare where it has none), so drafts are
        # verified for all rows in the one step that reads the weights, and a greedy row's
        # logits are bit for bit those of the one-slot engine (probe_ragged), whatever else
        # runs. While no row may draft (sampled, penalized), the plain batched step runs,
        # without the spares it would cost them (SmolLM2 8 rows, spares from the host: +43 %
        # int8, +49 % int4, +16 % fp32, and 8 sampled streams at int8 0.77x the tokens/s in
        # joint steps; the graph's row spares, below: +5 %). So a
        # sampled row's logits are the plain step's alone or among sampled rows, and the joint
        # step's (the spare form) beside greedy ones: its seeded text may differ between the two
        # (by the last bits at fp32, up to ~0.6 in a logit at int8/int4), as sampling in vLLM
        # or llama.cpp depends on its batch. What a row without a draft pays beside drafting
        # rows is bounded as in the plan (draft_plan.joint_length). Its spare costs a joint
        # step about nothing where the ragged graph gives a row of one token its own at the
        # attention nodes (backend.row_spares, convert/ragged.py; `row_spares` here, where
        # probe_ragged finds it exact): a joint step of rows without drafts is then [W, 1],
        # where a spare from the host made it [W, 2].
        self.joint = self.row_spares = False
        # joint steps of an even number of token rows only (W x T): where a step's unpaired last
        # token row is summed in another order than in pairs (probe_ragged), T is moved by one
        self.even_steps = False
        may_join = (bool(self.draft_tokens) and self.slots > 1 and getattr(backend, "ragged_steps", False)
                    and decode_mode != "per-row")
        if self.slots == 1 or may_join:  # the spare's cheaper form where it is exact here
            backend.spare_form = spare_form(backend)
        if may_join:
            backend.spare_token = True
            self.joint = probe_ragged(backend)
            if not self.joint and backend.spare_form == SPARE_AT_ATTENTION:  # lone rows' whole form
                backend.spare_form = SPARE_WHOLE
                self.joint = probe_ragged(backend)
            if not self.joint:  # exact where a step's token rows pair up (int4's one-row kernel)
                self.even_steps = self.joint = probe_ragged(backend, even=True)
            if not self.joint:
                log.warning("joint draft steps are off: rows of a ragged step differ from the same "
                            "rows stepped alone on this machine; drafts are verified one row a step")
            self.row_spares = (self.joint and backend.row_spares and backend.spare_form == SPARE_AT_ATTENTION
                               and probe_ragged(backend, least=1))
        # lone rows that may draft (and prompts) step with the spare: one slot, or joint steps
        self.spare_rows = self.slots == 1 or self.joint
        self.spare = ("off" if not self.spare_rows else
                      "attention" if backend.spare_form == SPARE_AT_ATTENTION else "whole graph")
        if self.draft_tokens:
            backend.spare_token = self.spare_rows
            deviation = verify_step_deviation(backend, self.draft_tokens)
            if deviation > VERIFY_TOLERANCE:
                log.warning("prompt-lookup drafting is off: a %d-token step's logits differ from "
                            "single steps' by %.3g (> %g), so drafts could change greedy output",
                            1 + self.draft_tokens, deviation, VERIFY_TOLERANCE)
                self.draft_tokens = 0
                self.joint = False
        # the plain steps (rows that do not draft) are probed without the spare; _step sets it
        backend.spare_token = False
        lone = probe_batch_invariance(backend) if decode_mode == "auto" else None
        self.batched = decode_mode == "batched" or lone is not None
        self.pair_lone = lone == "paired"  # a lone row steps beside a neighbour's padding row
        self.decode_mode = "batched" if self.batched else "per-row"
        # /v1/status: how drafts are verified ("joint": every row's in the decode step itself)
        self.draft_steps = "off" if not self.draft_tokens else "joint" if self.joint else "one row a step"
        self._active: dict[int, _Slot] = {}
        self._free = list(range(self.slots))  # a heap: lowest slot first keeps the span short
        self._ids = np.zeros((self.slots, 1), dtype=np.int64)  # [slots, 1] next token per slot
        self._pos = np.zeros((self.slots, 1), dtype=np.int64)  # [slots, 1] its position
        self._abort = False
        # a budget, filled as prompts come: one the machine cannot hold is refused now
        check_budget(prefix_cache_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes, prefix_block_tokens)
        self.chunks = ChunkSizer(prefill_chunk)
        self._prefilling: dict[int, PrefillJob] = {}  # slot -> job, oldest first

    @property
    def joint_spare(self) -> str:
        """/v1/status: where a joint step's rows without a draft get their spare: at the
        attention nodes by the graph ("attention"), or as a token from the host ("host token")."""
        return "off" if self.draft_steps != "joint" else "attention" if self.row_spares else "host token"

    # -- called from HTTP threads --

    def check_prompt(self, prompt_len: int, param: str = "prompt") -> int:
        """Room left for new tokens after a prompt; RequestRejected when there is none."""
        if prompt_len == 0:
            raise RequestRejected(400, "empty_prompt", "the prompt is empty", param)
        if prompt_len >= self.max_seq:
            raise RequestRejected(
                400, "context_length_exceeded",
                f"the prompt has {prompt_len} tokens but this model's KV cache holds {self.max_seq} "
                f"(prompt + generated); shorten the prompt to at most {self.max_seq - 1} tokens",
                param)
        return self.max_seq - prompt_len

    def submit(self, ticket: Ticket, request: GenerationRequest) -> RequestHandle:
        self.check_prompt(len(request.prompt_ids))  # max_tokens beyond the room: cut in _admit
        if request.max_tokens < 1:
            raise RequestRejected(400, "invalid_value", "max_tokens must be at least 1", "max_tokens")
        handle = RequestHandle(request, self._cancel)
        self.admission.enqueue(ticket, self._waiting, handle)
        return handle

    @property
    def running(self) -> int:
        return len(self._active) + len(self._prefilling)

    def tokens_in_cache(self) -> int:
        return (sum(s.pos for s in list(self._active.values()))
                + sum(j.done for j in list(self._prefilling.values())))

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        if not self._thread.is_alive():  # the engine thread no longer copies from the blocks
            self.prefix_cache.clear()

    def abort_all(self) -> None:
        """End every request now: running ones finish with "abort", queued ones fail (503)."""
        with self.admission.lock:
            self._abort = True
            self.admission.changed.notify_all()

    def _cancel(self, handle: RequestHandle) -> None:
        with self.admission.lock:
            if handle in self._waiting:
                self._waiting.remove(handle)
                self.admission.in_flight -= 1
                self.metrics.failure.inc(reason="client_disconnect")
            self.admission.changed.notify_all()  # a running one is reaped by the engine

    # -- the engine thread --

    def _run(self) -> None:
        while True:
            with self.admission.lock:
                self.admission.changed.wait_for(
                    lambda: self._stop or self._abort or self._waiting or self._active
                    or self._prefilling)
                stop, abort = self._stop, self._abort or self._stop
                self._abort = False
                dropped = list(self._waiting) if abort else []
                if abort:
                    self._waiting.clear()
                admit = [] if abort else self._take_admissible()
            if abort:
                self._drop_prefills()
                self._abort_now(dropped, "the daemon stopped" if stop else "the daemon is shutting down")
                if stop:
                    return
                continue
            for handle in admit:
                self._admit(handle)
            self._reap_cancelled()
            self._prefill()
            if self._active:
                t0 = time.perf_counter()
                self._decode()
                self.chunks.observe_decode(time.perf_counter() - t0, len(self._prefilling))

    def _take_admissible(self) -> list[RequestHandle]:
        taken: list[RequestHandle] = []
        while self._waiting and len(self._free) > len(taken):
            taken.append(self._waiting.popleft())
        return taken

    def _admit_arrivals(self) -> None:
        """Step 1 again between the prefills of a burst, without waiting; a stop or an abort is
        left to the next iteration of _run."""
        with self.admission.lock:
            admit = [] if self._stop or self._abort else self._take_admissible()
        for handle in admit:
            self._admit(handle)

    def _admit(self, handle: RequestHandle) -> None:
        request: GenerationRequest = handle.request
        if handle.cancelled:  # gone between the queue and its slot
            self.admission.release()
            return
        slot = heapq.heappop(self._free)
        now = time.monotonic()
        self.metrics.queue.observe(now - handle.arrival)
        state = _Slot(handle, slot, np.random.default_rng(request.params.seed),
                      StreamDecoder(self.tokenizer), StopMatcher(request.stop),
                      budget=min(request.max_tokens, self.max_seq - len(request.prompt_ids)),
                      pos=len(request.prompt_ids), admitted=now, params=request.params,
                      constraint=request.constraint,
                      counts=(np.zeros(self.backend.vocab_size, np.int32)
                              if request.params.penalized else None),
                      logprobs=[] if request.logprobs is not None else None)
        # the prefix cache is looked up when its prefill starts (_prefill_step), not here: a
        # request admitted together with another of the same prompt (n > 1 choices, a burst)
        # then finds the blocks the first one stored
        self._prefilling[slot] = PrefillJob.of(state, request.prompt_ids, 0)
        self._ids[slot, 0], self._pos[slot, 0] = 0, 0  # padding where the next chunk writes

    def _reuse_prefix(self, slot: int, prompt: Sequence[int]) -> int:
        """Copy the longest cached prefix of prompt into slot; returns its tokens."""
        if not self.prefix_cache.enabled:
            return 0
        blocks = self.prefix_cache.lookup(prompt)
        B = self.prefix_cache.block_tokens
        for i, block in enumerate(blocks):
            self.backend.write_kv(slot, i * B, block)
        if blocks:
            self.metrics.prefix_hits.inc()
            self.metrics.prefix_tokens.inc(len(blocks) * B)
        else:
            self.metrics.prefix_misses.inc()
        return len(blocks) * B

    def _prefill(self) -> None:
        """Step 2 of the module docstring: while no slot decodes, the waiting prompts one step
        each, oldest first, as long as they fit in BURST_TOKENS together (the first always);
        else (or once such a burst is read: the rest waits for the next iteration) one chunk of
        the oldest."""
        idle, read = not self._active, 0
        while self._prefilling:
            job = next(iter(self._prefilling.values()))  # the oldest: a burst keeps its order
            if self._active and not (idle and read + job.remaining <= BURST_TOKENS):
                break
            read += job.remaining
            self._prefill_step(job, None)
            if idle:  # requests of the same burst that arrived during this prefill join it
                self._admit_arrivals()
        if not read and self._prefilling and self._active and self.chunks.ready():
            job = next(iter(self._prefilling.values()))
            self._prefill_step(job, self.chunks.size(job.remaining) if self.chunks.enabled else None)

    def _prefill_step(self, job: PrefillJob, n: int | None) -> None:
        """Run n prompt tokens of job (None: all that remain); the last one makes it active."""
        state = job.state
        t0 = time.perf_counter()
        try:
            if not job.started:
                job.started = True
                job.done = job.reused = self._reuse_prefix(state.slot, state.handle.request.prompt_ids)
                self._pos[state.slot, 0] = job.done
            ids, pos, last = job.chunk(job.remaining if n is None else n)
            if self.spare_rows:  # a decode step may have cleared it (see __init__)
                self.backend.spare_token = True
            logits = self.backend.step(ids, pos, [state.slot], last)[0, -1]
        except Exception:  # noqa: BLE001 - a runtime failure must fail this request, not the daemon
            log.exception("prefill failed (request %d, slot %d)", state.handle.id, state.slot)
            del self._prefilling[state.slot]
            self._active[state.slot] = state
            self._fail(state, 500, "internal_error", "the model failed while reading the prompt")
            return
        self.chunks.observe_prefill(ids.shape[1], time.perf_counter() - t0,
                                    chunked=ids.shape[1] < job.total - job.reused)
        job.done += ids.shape[1]
        self._pos[state.slot, 0] = job.done
        if n is not None:
            self.metrics.prefill_chunks.inc()
        if job.remaining:
            return
        del self._prefilling[state.slot]
        self._active[state.slot] = state
        state.prefilled = time.monotonic()
        self.metrics.prompt_tokens.inc(job.total)
        # the first token streams before the prompt is stored (SmolLM2, 128 tokens: ~3 ms of
        # copies, which the time to first token paid); storing reads only the slot's cache
        self._accept_row(state, logits)
        ended = self._active.get(state.slot) is not state
        if ended:
            return  # it ended on its first token: _finish stored its prompt (_store_output)
        try:
            self.prefix_cache.insert(job.prompt[0].tolist(),
                                     lambda lo, hi: self.backend.read_kv(state.slot, lo, hi))
        except Exception:  # noqa: BLE001 - a cache that cannot store leaves the request unharmed
            log.exception("storing the prompt of request %d in the prefix cache failed",
                          state.handle.id)

    def _store_output(self, state: _Slot) -> None:
        """Put the whole blocks of prompt + output into the prefix cache, so the next turn of a
        chat (this prompt, this answer, a new question) hits them too. The slot's cache holds
        positions < state.pos: the prompt and the generated tokens but the last (sampled, never
        stepped), which the stream decoder still lists (a stop token it never saw). A row whose
        decode steps went without the spare token (state.plain_kv) stores its prompt only: where
        prompts are read with the spare, its output's rows differ in the last bits from what a
        prompt continuing it computes (int8: a greedy next turn's text changed), and a hit must
        answer as a cold request does."""
        prompt = state.handle.request.prompt_ids
        written = 0 if state.plain_kv else state.pos - len(prompt)
        out = state.decoder.ids
        if (not self.prefix_cache.enabled or written < 0 or len(out) < written
                or len(out) not in (state.generated, state.generated - 1)):
            return  # not the bookkeeping described above: store nothing rather than guess
        try:
            self.prefix_cache.insert([*prompt, *out[:written]],
                                     lambda lo, hi: self.backend.read_kv(state.slot, lo, hi))
        except Exception:  # noqa: BLE001 - a cache that cannot store leaves the request unharmed
            log.exception("storing request %d in the prefix cache failed", state.handle.id)

    def _drop_prefills(self, cancelled_only: bool = False) -> None:
        """Free the slots of prefilling requests: the cancelled ones (client gone), or all of
        them (abort: they fail like queued requests, having produced nothing)."""
        for job in list(self._prefilling.values()):
            state = job.state
            if cancelled_only and not state.handle.cancelled:
                continue
            del self._prefilling[state.slot]
            self._active[state.slot] = state  # _free_slot's bookkeeping expects it there
            if state.handle.cancelled:
                log.info("request %d cancelled while prefilling; slot %d freed", state.handle.id,
                         state.slot)
                self.metrics.failure.inc(reason="client_disconnect")
                self._free_slot(state)
            else:
                self._fail(state, 503, "draining", "the daemon is shutting down")

    def _decode(self) -> None:
        try:
            if (self.joint and max(self._active) > min(self._active)
                    and any(self._drafts(state) for state in self._active.values())):
                self._decode_joint()
                return
            if self._verify_drafts():
                return  # every active row was stepped with its draft
            if self.batched:
                self._decode_batched()
            else:
                for slot in sorted(self._active):
                    state = self._active[slot]
                    logits = self._step(self._ids[slot:slot + 1], self._pos[slot:slot + 1], [slot])
                    self._accept_row(state, logits[0, -1])
        except Exception:  # noqa: BLE001 - fail the requests in this step; the daemon keeps serving
            log.exception("decode step failed for slots %s", sorted(self._active))
            for state in list(self._active.values()):
                self._fail(state, 500, "internal_error", "the model failed during generation")

    def _decode_batched(self) -> None:
        lo, hi = min(self._active), max(self._active)
        # a lone row steps beside a neighbour's padding row (not one that may draft in a joint
        # engine: it steps alone with its spare, as probe_ragged compared it):
        if lo == hi and self.pair_lone and not (self.joint and self._drafts(self._active[lo])):
            # the neighbour is not active, and its padding ids/positions write only where its
            # next prefill writes first (see _admit), like the gaps of any run (probe above)
            lo, hi = (lo, hi + 1) if hi + 1 < self.slots else (lo - 1, hi)
        logits = self._step(self._ids[lo:hi + 1], self._pos[lo:hi + 1], range(lo, hi + 1))
        for slot in range(lo, hi + 1):  # [B, 1, V]: row slot - lo belongs to slot
            state = self._active.get(slot)
            if state is not None:
                self._accept_row(state, logits[slot - lo, -1])

    def _step(self, ids: np.ndarray, pos: np.ndarray, slots: Sequence[int],
              lengths: np.ndarray | None = None) -> np.ndarray:
        """backend.step, its time kept by (rows, tokens per row) for the drafting plan."""
        if self.spare_rows:
            # a joint step always takes the spare; a lone row where it may draft, or where the
            # spare is the attention form, which costs a one-token step nothing measurable
            # (README, "The attention form of the spare"): then a sampled answer's keys/values
            # are what a prompt's read writes, and its next turn reuses them (_store_output)
            self.backend.spare_token = lengths is not None or all(
                self._drafts(self._active[s]) for s in slots if s in self._active) or (
                len(slots) == 1 and self.backend.spare_form == SPARE_AT_ATTENTION)
            if not self.backend.spare_token:
                for s in slots:
                    if s in self._active:
                        self._active[s].plain_kv = True
        t0 = time.perf_counter()
        logits = self.backend.step(ids, pos, slots, lengths=lengths) if lengths is not None \
            else self.backend.step(ids, pos, slots)
        seconds = time.perf_counter() - t0
        # The first run of a shape pays what later ones do not (ONNX Runtime: the step's IO
        # binding, ~180 tensors, and its allocations for the shape): SmolLM2 int8's first
        # two-token step took 11.8-16.9 ms where later ones take ~9, and that one time stood in
        # the plan until the length ran again, which it then never did: after one wrong draft a
        # lone row's one-token drafts did not pay at that price, and 1 in ~7 runs of a copying
        # prompt drafted 16 tokens in 128 (226 -> 157 tok/s). So a shape is timed from its
        # second run on; until then the plan guesses its time from the others.
        shape = (int(slots[0]), ids.shape[0], ids.shape[1])
        first = shape not in self._shapes
        self._shapes.add(shape)
        # the plan costs the steps a drafting row takes: a sampled row's cheaper ones stay out
        if not first and (not self.spare_rows or self.backend.spare_token or lengths is not None):
            self.costs.observe(ids.shape[0], ids.shape[1], seconds)
        return logits

    # -- prompt-lookup drafting --------------------------------------------------------------
    #
    # A greedy row with a draft d1..dk (device/runtime/draft.py) runs its pending token x0 and
    # the draft as one step of T = 1+k tokens at positions p..p+k, with logits for each. Row i
    # of those logits is what a plain step would have given after x0 d1..di, as long as d1..di
    # were the model's own choices: so each row goes through _accept in turn (stop ids, stop
    # strings, grammar, logprobs, budget exactly as one token at a time), and the walk ends at
    # the first row whose choice differs from the draft, that token becoming the pending one.
    # The rejected draft tokens wrote keys/values beyond the row's position; nothing reads a
    # position beyond a row's own, and the next steps overwrite them. A drafting row is stepped
    # alone (B=1): the batched T=1 step keeps its bound fast path for the others, and a row is
    # not padded to another's draft length (ONNX Runtime's GroupQueryAttention refuses B>1 with
    # T>1 over a cache anyway).

    def _decode_joint(self) -> None:
        """One [W, T] step of the span lo..hi (W > 1): every active row its pending token and
        the first T - 1 tokens of its draft, or where it has none a spare: the graph's, at the
        attention nodes (row_spares: the row is one token), else one from the host (token 0 at
        the next position); rows of free or prefilling slots are padding at their own positions, as
        in _decode_batched. Each row's tokens past its own are right padding (ids 0, positions
        repeating its last real one: the graph's seqlens_k is that position). T is the plan's
        (draft_plan.joint_length), one more or less where even_steps wants W * T even; then
        each row walks its logits as _verify does."""
        lo, hi = min(self._active), max(self._active)
        W = hi - lo + 1
        offered = {slot: d for slot, state in self._active.items() if (d := self._draft(state))}
        rows = [Row(slot, self._active[slot].acceptance.p, len(d)) for slot, d in offered.items()]
        base = 1 if self.row_spares else 2  # the step with no draft: [W, 1] or [W, 2]
        # every row's past plus T must fit in the cache (GroupQueryAttention refuses the step
        # otherwise): a row near the cache's end cuts every row's draft. Its pending position is
        # at most max_seq - 2 (the last token is sampled, never stepped), padding rows' lower.
        room = int(self.max_seq - self._pos[lo:hi + 1, 0].max())
        T = min(room, joint_length(rows, len(self._active), self.costs.joint_curve(W, base), base))
        if self.even_steps and W * T % 2 and T > base:  # its last token row would be unpaired
            T = T + 1 if T < room else T - 1  # one draft token more where there is room, else less
        drafts = {slot: d[:T - 1] for slot, d in offered.items()}  # what this step verifies
        ids = np.zeros((W, T), np.int64)
        pos = np.empty((W, T), np.int64)
        lens = np.empty(W, np.int32)
        for b, slot in enumerate(range(lo, hi + 1)):
            draft = drafts.get(slot, [])
            n = 1 + max(base - 1, len(draft))  # pending + draft, or + the host's spare
            p0 = int(self._pos[slot, 0])
            ids[b, 0] = self._ids[slot, 0]
            ids[b, 1:1 + len(draft)] = draft
            pos[b, :n] = p0 + np.arange(n)
            pos[b, n:] = p0 + n - 1
            lens[b] = n
        logits = self._step(ids, pos, range(lo, hi + 1), lens)  # [W, T, V]
        for b, slot in enumerate(range(lo, hi + 1)):
            state = self._active.get(slot)
            if state is not None:
                state.offered = None  # every draft on offer was verified
                self._walk(state, logits[b], drafts.get(slot, []))

    def _verify_drafts(self) -> bool:
        """Step the rows whose drafts are worth a step of their own; True when every active row
        was stepped so (no plain step left to run).

        In batched mode a verify step takes one row (GroupQueryAttention runs T > 1 over a cache
        for one row only), so with c rows drafting turns one batched step, which reads the
        weights once for all of them, into c steps that each read them: drafting every row took
        SmolLM2-135M fp32's aggregate decode from 155 tok/s at c=1 down to 104 tok/s at c=8
        (bench/serve.py, 2 threads). So the rows that verify, and how many draft tokens each,
        are what the measured step times and each row's acceptance say raises tokens per second
        (device/serve/draft_plan.py): a lone row nearly always, rows of text that copies yes,
        even eight, eight rows of text that does not no. Per-row mode steps rows alone anyway,
        so there each row plans as a lone row.
        """
        if not self.draft_tokens:
            return False
        drafts = {slot: d for slot, state in self._active.items() if (d := self._draft(state))}
        if not drafts:
            return False
        rows = [Row(slot, state.acceptance.p, len(drafts[slot]), state.drafted > 0)
                for slot, state in self._active.items() if slot in drafts]
        active = sorted(self._active)
        if self.batched and len(active) > 1:
            width = active[-1] - active[0] + 1  # the plain step runs the rows lo..hi
            lengths = plan(rows, len(active), self.costs.get(width, 1), self.costs.curve())
        else:  # each row steps alone anyway: each plans as a lone row
            lengths = plan(rows, 1, None, self.costs.curve())
        for slot, draft in drafts.items():  # a draft not verified is checked against the plain step
            self._active[slot].offered = None if slot in lengths else draft[0]
        for slot, k in sorted(lengths.items()):
            self._verify(self._active[slot], drafts[slot][:k])
        return len(lengths) == len(active)

    def _draft(self, state: _Slot) -> list[int]:
        """The draft on offer: what prompt lookup finds, up to the row's ramp (see _verify), its
        budget and the cache's end. How much of it is verified is the plan's choice."""
        if state.lookup is None:
            return []
        pos = int(self._pos[state.slot, 0])  # where the pending token goes
        return state.lookup.draft(min(state.draft_limit, state.budget - state.generated - 1,
                                      self.max_seq - 1 - pos))

    def _verify(self, state: _Slot, draft: list[int]) -> None:
        slot, k = state.slot, len(draft)
        ids = np.array([[self._ids[slot, 0], *draft]], dtype=np.int64)  # [1, 1+k]
        pos = self._pos[slot, 0] + np.arange(1 + k, dtype=np.int64)[None]  # [1, 1+k]
        self._walk(state, self._step(ids, pos, [slot])[0], draft)  # [1+k, V]

    def _walk(self, state: _Slot, logits: np.ndarray, draft: list[int]) -> None:
        """A row's step results: logits [>= 1+k, V] for its pending token and draft d1..dk."""
        k = len(draft)
        if not k:
            self._accept_row(state, logits[0])
            return
        state.drafted += k
        self.metrics.draft_tokens.inc(k)
        before = state.accepted
        for i in range(1 + k):
            expected = draft[i] if i < k else None
            token = self._accept_row(state, logits[i], expected)
            if token is None or token != expected:
                break  # finished, or the model chose otherwise: that token is now pending
        # A wrong draft costs a wider step (1+k tokens instead of 1) for nothing, so the next
        # draft offered may be one token longer than this one's accepted run, and doubles (up to
        # draft_tokens) while drafts are accepted whole: text that copies ramps up in a few
        # steps, text that stopped copying offers short drafts at once (its acceptance, over
        # ~32 tokens, follows more slowly). A whole draft the plan cut short keeps the offer.
        accepted = state.accepted - before
        state.draft_limit = min(self.draft_tokens, max(state.draft_limit, 2 * k) if accepted == k
                                else accepted + 1)

    def _accept_row(self, state: _Slot, logits: np.ndarray, expected: int | None = None) -> int | None:
        """_accept, where a failure (a bug in sampling or detokenizing) fails only this request."""
        try:
            return self._accept(state, logits, expected)
        except Exception:  # noqa: BLE001 - logged with its traceback; the other rows go on
            log.exception("request %d failed after its decode step", state.handle.id)
            self._fail(state, 500, "internal_error", "generation failed")
            return None

    def _accept(self, state: _Slot, logits: np.ndarray, expected: int | None = None) -> int | None:
        """Sample the next token from logits [V]; stream it, finish, or queue its decode.
        Returns the token when the request goes on, None when it finished. expected: the draft
        token these logits verify (counted as accepted when the choice equals it)."""
        raw = logits  # logprobs are the model's own, before penalties and mask
        if state.counts is not None:  # OpenAI's penalties, over the tokens generated so far
            logits = penalize(logits, state.counts, state.params)
        if state.constraint is not None:
            logits = state.constraint.mask(logits)
        token = sample(logits, state.params, state.rng)
        state.generated += 1
        if token == expected:
            state.accepted += 1
            self.metrics.accepted_tokens.inc()
        # the row's acceptance: a draft token it verified, or a plain step's token against the
        # first token of the draft it was offered (would that draft have held?)
        judged = expected if expected is not None else state.offered
        if judged is not None:
            state.acceptance.observe(token == judged)
            self.acceptance.observe(token == judged)
        state.offered = None
        if state.generated == 1 and self.draft_tokens and self._drafts(state):
            state.lookup = PromptLookup(state.handle.request.prompt_ids)
            state.draft_limit = self.draft_tokens
            state.acceptance = Acceptance(prior=self.acceptance.p)  # draft_plan.Acceptance
        now = time.monotonic()
        if state.generated == 1:
            state.first_token = now
            self.metrics.ttft.observe(now - state.handle.arrival)
        self.metrics.generation_tokens.inc()
        if token in self.stop_ids and not state.handle.request.ignore_eos:
            self._finish(state, "stop", token)
            return None
        if state.logprobs is not None:
            state.logprobs.append(token_logprob(raw, token, state.handle.request.logprobs or 0))
        if state.constraint is not None:
            state.constraint.advance(token)
        if state.counts is not None:
            state.counts[token] += 1
        update = state.stops.push(state.decoder.push(token))
        if update.text:
            state.handle.put(TextDelta(update.text, self._take_logprobs(state)))
        if update.stopped is not None:
            self._finish(state, "stop", update.stopped)
            return None
        if state.constraint is not None and state.constraint.finished:
            self._finish(state, "stop", None)  # the JSON is whole: nothing may follow
            return None
        if state.generated >= state.budget:
            self._finish(state, "length", None)
            return None
        self._ids[state.slot, 0] = token
        self._pos[state.slot, 0] = state.pos
        state.pos += 1
        if state.lookup is not None:
            state.lookup.push(token)
        return token

    @staticmethod
    def _drafts(state: _Slot) -> bool:
        """Drafting cannot change a greedy row's output (each verified row is the step it
        replaces). Sampled rows never draft; penalized ones do not either (penalties work
        against repeating, so drafts would mostly be rejected)."""
        return state.params.greedy and not state.params.penalized

    def _finish(self, state: _Slot, reason: str, stop_reason: str | int | None) -> None:
        if reason != "stop" or not isinstance(stop_reason, str):
            # the rest of the text: bytes the stream decoder held back, then any held-back
            # prefix of a stop string (which may now complete one)
            update = state.stops.push(state.decoder.flush())
            tail = update.text if update.stopped else update.text + state.stops.flush()
            if update.stopped:
                reason, stop_reason = "stop", update.stopped
            if tail:
                state.handle.put(TextDelta(tail, self._take_logprobs(state)))
        now = time.monotonic()
        prompt_n = len(state.handle.request.prompt_ids)
        timings = Timings(queue_s=state.admitted - state.handle.arrival,
                          prompt_s=state.prefilled - state.admitted,
                          ttft_s=state.first_token - state.handle.arrival,
                          decode_s=now - state.first_token, prompt_n=prompt_n,
                          predicted_n=state.generated, draft_n=state.drafted,
                          draft_n_accepted=state.accepted)
        self.metrics.e2e.observe(now - state.handle.arrival)
        if state.generated > 1:
            self.metrics.tpot.observe(timings.decode_s / (state.generated - 1))
        self.metrics.success.inc(finished_reason=reason)
        usage = Usage(prompt_n, state.generated, state.drafted, state.accepted)
        state.handle.put(Finished(reason, stop_reason, usage, timings, self._take_logprobs(state)))
        self._store_output(state)
        self._free_slot(state)

    @staticmethod
    def _take_logprobs(state: _Slot) -> tuple[TokenLogprob, ...]:
        if not state.logprobs:
            return ()
        out = tuple(state.logprobs)
        state.logprobs.clear()
        return out

    def _fail(self, state: _Slot, status: int, code: str, message: str) -> None:
        self.metrics.failure.inc(reason=code)
        state.handle.put(Failed(status, code, message))
        self._free_slot(state)

    def _free_slot(self, state: _Slot) -> None:
        del self._active[state.slot]
        self._ids[state.slot, 0] = 0  # padding values for this row while it is free
        self._pos[state.slot, 0] = 0
        heapq.heappush(self._free, state.slot)
        self.admission.release()

    def _reap_cancelled(self) -> None:
        self._drop_prefills(cancelled_only=True)
        for state in [s for s in self._active.values() if s.handle.cancelled]:
            log.info("request %d cancelled (client gone); slot %d freed", state.handle.id, state.slot)
            self.metrics.failure.inc(reason="client_disconnect")
            self._free_slot(state)

    def _abort_now(self, dropped: list[RequestHandle], message: str) -> None:
        """Running requests finish with "abort" (their text so far stands); queued ones fail."""
        for handle in dropped:
            handle.put(Failed(503, "draining", message))
            self.metrics.failure.inc(reason="draining")
            self.admission.release()
        for state in list(self._active.values()):
            if state.handle.cancelled:
                self._free_slot(state)
            else:
                self._finish(state, "abort", None)
