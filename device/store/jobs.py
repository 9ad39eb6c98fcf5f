"""The one install (commit or rollback) a store runs at a time, and how far it has got.

An install verifies the staged files, switches the records, then has the daemon load the bundle
(on a Jetson: build its TensorRT engine, minutes) and smoke-test it. The load runs outside the
store's lock, so status and chunk requests keep answering; this record is what they report, and
what the host polls after its commit was accepted (202):

    phase    verify | build | smoke | switch   (build: loading the bundle, engine included)
    state    running | done | failed
    result   the InstallResult once done; error {status, code, message, hint} once failed

A second commit or rollback while one runs is refused (409 "busy"); the flag is this record's
state, so it cannot outlive the install (released in a finally).
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

PHASES = ("verify", "build", "smoke", "switch")


@dataclass(frozen=True)
class PhaseTime:
    phase: str
    seconds: float


@dataclass(frozen=True)
class JobError:
    status: int
    code: str
    message: str
    hint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class InstallJob:
    op: str  # "commit" | "rollback"
    upload_id: str | None
    # random, not a counter: a poller must not mistake a restarted daemon's install for its own
    job: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    phase: str = "verify"
    state: str = "running"
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    phases: list[PhaseTime] = field(default_factory=list)  # the phases finished, in order
    result: Any = None  # InstallResult
    error: JobError | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def enter(self, phase: str) -> None:
        with self._lock:
            if phase == self.phase or self.state != "running":
                return
            now = time.monotonic()
            self.phases.append(PhaseTime(self.phase, round(now - self.phase_started, 3)))
            self.phase, self.phase_started = phase, now

    def finish(self, result: Any = None, error: JobError | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            self.phases.append(PhaseTime(self.phase, round(now - self.phase_started, 3)))
            self.result, self.error = result, error
            self.state = "failed" if error is not None else "done"

    def to_json(self) -> dict[str, Any]:
        # the result is an InstallResult, a plain record (asdict is store.to_json's answer for
        # it; importing store here would close an import cycle: store imports this module)
        with self._lock:
            now = time.monotonic()
            return {"job": self.job, "op": self.op, "upload_id": self.upload_id, "phase": self.phase,
                    "state": self.state, "elapsed_s": round(now - self.started, 3),
                    "phase_s": round(now - self.phase_started, 3),
                    "phases": [{"phase": p.phase, "seconds": p.seconds} for p in self.phases],
                    "result": asdict(self.result) if self.result is not None else None,
                    "error": ({"status": self.error.status, "code": self.error.code,
                               "message": self.error.message, "hint": self.error.hint,
                               **self.error.extra} if self.error else None)}
