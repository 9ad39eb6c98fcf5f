"""The encoder engine: embeddings for encoder bundles, with the decoder's admission rules.

    engine = EmbeddingEngine(runner.backend, runner.manifest.pooling, queue_limit=16)
    engine.start()
    with engine.reserve() as ticket:
        handle = engine.submit(ticket, EmbeddingRequest([tokenizer.encode("hi")]))
    handle.next_event(...)   # Embedded([N, C] float32) | Failed
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bundle.errors import ToolkitError
from bundle.manifest import Pooling
from device.runtime.backend import EncoderBackend
from device.runtime.pooling import pool
from device.serve.metrics import ServingMetrics
from device.serve.scheduler import Admission, Embedded, Failed, QueuedEngine, RequestHandle, Ticket

log = logging.getLogger("toolkit.daemon")


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: Sequence[Sequence[int]]  # token ids per text, special tokens included


class EmbeddingEngine(QueuedEngine):
    """Encoder bundles: each request's texts are encoded as one padded batch (in chunks of
    max_batch rows), requests one after another on one engine thread.

    Requests are never mixed in a batch: padding a text to another request's length changes the
    GEMM shapes and so the last bits of its embedding, and a result should not depend on what
    else is running. Admission is the decoder's: one running, queue_limit waiting, 503 beyond."""

    slots = 1

    def __init__(self, backend: EncoderBackend, pooling: Pooling | None, queue_limit: int = 16,
                 metrics: ServingMetrics | None = None, max_batch: int = 32) -> None:
        self.backend, self.pooling = backend, pooling
        self.metrics = metrics or ServingMetrics()
        self._init_queue(Admission(1, queue_limit), "encoder")
        self.max_batch = max_batch
        self.decode_mode = "n/a"
        self.draft_tokens = 0  # no drafting: an encoder has no decode steps
        try:  # a bundle that loads but cannot run fails the start (as smoke_test for decoders)
            self.embed([[1, 1]])
        except Exception as e:  # noqa: BLE001 - runtimes raise their own untyped errors
            raise ToolkitError(f"the model loads but a test encoding fails: {e}",
                               hint="the bundle does not match this runtime; convert it again") from e
        self._busy = False

    def submit(self, ticket: Ticket, request: EmbeddingRequest) -> RequestHandle:
        handle = RequestHandle(request, self._cancel)
        self.admission.enqueue(ticket, self._waiting, handle)
        return handle

    @property
    def running(self) -> int:
        return int(self._busy)

    def abort_all(self) -> None:
        with self.admission.lock:
            dropped = list(self._waiting)
            self._waiting.clear()
        for handle in dropped:
            handle.put(Failed(503, "draining", "the daemon is shutting down"))
            self.admission.release()

    def _cancel(self, handle: RequestHandle) -> None:
        with self.admission.lock:
            if handle in self._waiting:
                self._waiting.remove(handle)
                self.admission.in_flight -= 1
                self.admission.changed.notify_all()

    def _run(self) -> None:
        while True:
            with self.admission.lock:
                self.admission.changed.wait_for(lambda: self._stop or self._waiting)
                if self._stop:
                    return
                handle = self._waiting.popleft()
                self._busy = True
            try:
                self._serve(handle)
            finally:
                self._busy = False
                self.admission.release()

    def _serve(self, handle: RequestHandle) -> None:
        request: EmbeddingRequest = handle.request
        self.metrics.queue.observe(time.monotonic() - handle.arrival)
        try:
            parts = [self.embed(request.inputs[i:i + self.max_batch])
                     for i in range(0, len(request.inputs), self.max_batch)]
        except Exception:  # noqa: BLE001 - a runtime failure fails this request, not the daemon
            log.exception("encoder failed (request %d)", handle.id)
            self.metrics.failure.inc(reason="internal_error")
            handle.put(Failed(500, "internal_error", "the model failed while encoding"))
            return
        tokens = sum(len(ids) for ids in request.inputs)
        self.metrics.prompt_tokens.inc(tokens)
        self.metrics.e2e.observe(time.monotonic() - handle.arrival)
        self.metrics.success.inc(finished_reason="stop")
        handle.put(Embedded(np.concatenate(parts), tokens))

    def embed(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
        """Token ids per text -> pooled embeddings [N, C] float32 (one padded batch)."""
        width = max(len(ids) for ids in inputs)
        input_ids = np.zeros((len(inputs), width), dtype=np.int64)  # [N, T], padded with 0
        mask = np.zeros_like(input_ids)  # [N, T], 1 on real tokens
        for row, ids in enumerate(inputs):
            input_ids[row, :len(ids)] = ids
            mask[row, :len(ids)] = 1
        hidden = self.backend.encode({"input_ids": input_ids, "attention_mask": mask,
                                      "token_type_ids": np.zeros_like(input_ids)})  # [N, T, C]
        return pool(hidden, mask, self.pooling)
