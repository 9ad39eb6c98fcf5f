"""The on-device benchmark's report: the records a device measures and the host reads.

The device fills them (device/runtime/bench.py); the host adds the roofline prediction of the
bundle's target and renders tables and plots (host/report.py, host/report_html.py). Standard
library only (no onnxruntime, no numpy), so both sides import it:

    report = load_report("smol.json")          # ToolkitError for non-reports / newer schemas

Report JSON, `schema: "edge-toolkit/bench-report"`, `schema_version: 1`. Every field is
documented in docs/bench-report-schema.md and machine-checkable with docs/bench-report.schema.json.
Top level: complete, stopped_because, error, created_at, duration_s, config, environment,
prediction_note, cells (one summary per prompt length x concurrency), rounds (the raw data: every
request's timings), memory, power. Times are seconds, sizes bytes, power watts, energy joules
(Prometheus base units, protocols.md §1d); tables show ms and MiB.

Definitions (one round = `concurrency` requests arriving together, one per KV slot; each is
prefilled in turn (B=1) and then all decode together in batched steps):
  TTFT      arrival -> first output token (the argmax of its prefill logits); includes waiting
            behind the earlier prefills of the round, as a request does in the daemon.
  TPOT      (e2e - TTFT) / (output tokens - 1): the mean gap between a request's tokens after
            the first, the daemon's `predicted_per_token_ms` (device/serve/scheduler.py Timings).
  e2e       arrival -> last output token (request latency).
  prefill tokens/s   prompt tokens / time inside prefill steps.
  decode tokens/s    tokens made by batched decode steps / time inside them (all rows together).
  output tokens/s    every output token / wall time; requests/s = requests / wall time.
Percentiles: linear interpolation between closest ranks (Hyndman & Fan type 7, numpy's default
"linear"): sort x[0..n-1], h = (n-1) q/100, p = x[floor h] + (h - floor h)(x[floor h + 1] - x[floor h]).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundle.atomic import check_parent, write_output
from bundle.errors import ToolkitError

SCHEMA = "edge-toolkit/bench-report"
SCHEMA_VERSION = 1
PERCENTILES = (50, 90, 95, 99)
REQUIRED_KEYS = ("complete", "stopped_because", "config", "environment", "cells", "rounds",
                 "memory", "power")
MIB = 1 << 20


# --- what to run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """What a bench runs: every prompt length x every concurrency, `runs` measured rounds each
    (one round = `concurrency` requests at once), after `warmup` unmeasured rounds of the same
    shapes. Host-safe on purpose: the host builds it and (later) sends it to a daemon as JSON."""

    prompt_lens: tuple[int, ...] = (128, 512)
    gen_len: int = 128  # output tokens per request, exactly (EOS ignored)
    concurrency: tuple[int, ...] = (1, 4)
    runs: int = 3
    warmup: int = 1
    seed: int = 0  # the synthetic prompts' token ids
    power: bool = True  # sample tegrastats / INA3221 when the device has them
    sample_interval_s: float = 0.05  # memory sampling

    def __post_init__(self) -> None:
        for name, example in (("prompt_lens", "128,512"), ("concurrency", "1,4")):
            values = tuple(int(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            flag = name.replace('_', '-')
            if not values or min(values) < 1 or len(set(values)) != len(values):
                raise ToolkitError(f"{flag} must be distinct positive integers (got {list(values)})",
                                   hint=f"e.g. --{flag} {example}")
        for name in ("gen_len", "runs"):
            if getattr(self, name) < 1:
                raise ToolkitError(f"{name.replace('_', '-')} must be at least 1 "
                                   f"(got {getattr(self, name)})")
        if self.warmup < 0:
            raise ToolkitError(f"warmup must be 0 or more (got {self.warmup})")

    def check_fits(self, slots: int, max_seq: int) -> None:
        """Every request needs a slot and prompt_len + gen_len cache positions."""
        if max(self.concurrency) > slots:
            raise ToolkitError(
                f"concurrency {max(self.concurrency)} needs {max(self.concurrency)} KV slots; the "
                f"backend has {slots}", hint="lower --concurrency, or load the bundle with more "
                                             "slots (a TensorRT engine: convert with a larger --batch)")
        longest = max(self.prompt_lens) + self.gen_len
        if longest > max_seq:
            raise ToolkitError(
                f"prompt {max(self.prompt_lens)} + {self.gen_len} generated tokens = {longest} "
                f"positions; the KV cache holds {max_seq}",
                hint="use shorter --prompt-lens / --gen-len, or convert with a larger --max-seq")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchConfig:
        """From a request body: unknown keys are an error, not silently dropped."""
        if unknown := sorted(set(data) - set(cls.__dataclass_fields__)):
            raise ToolkitError(f"unknown bench settings {unknown}")
        return cls(**data)


# --- percentiles -------------------------------------------------------------------------------
def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (type 7)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100] (got {q})")
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


@dataclass(frozen=True)
class Stats:
    """Summary of one latency sample, in seconds."""

    n: int
    mean: float
    min: float
    max: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        """None for an empty sample (an interrupted cell may have no finished request)."""
        if not values:
            return None
        p = {f"p{q}": percentile(values, q) for q in PERCENTILES}
        return cls(n=len(values), mean=sum(values) / len(values), min=min(values),
                   max=max(values), **p)


# --- raw records (what the device measures) ----------------------------------------------------
@dataclass(frozen=True)
class RequestRecord:
    """One request of a round. Offsets are seconds from the round's arrival instant."""

    slot: int
    prompt_tokens: int
    output_tokens: int
    queue_s: float  # arrival -> its prefill starts (behind the earlier prefills of the round)
    prefill_s: float  # its own prefill step
    ttft_s: float  # arrival -> first token
    e2e_s: float  # arrival -> last token

    @property
    def tpot_s(self) -> float | None:
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tpot_s": self.tpot_s}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestRecord:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class RoundResult:
    """`concurrency` requests that arrived together; times are seconds from the bench start
    (the clock power samples use)."""

    prompt_len: int
    concurrency: int
    run: int  # 0-based within its cell
    start_s: float  # arrival of the round's requests
    wall_s: float  # arrival -> last token of the round
    decode_start_s: float  # the batched decode phase (from the bench start) ...
    decode_s: float  # ... and its length
    decode_steps: int
    requests: tuple[RequestRecord, ...]

    @property
    def decode_tokens(self) -> int:
        return self.decode_steps * self.concurrency

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "requests"}
        return {**data, "decode_tokens": self.decode_tokens,
                "requests": [r.to_json() for r in self.requests]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundResult:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k != "requests"}
        return cls(**fields, requests=tuple(RequestRecord.from_json(r) for r in data["requests"]))


# --- the roofline beside the measurement -------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    """targets/plan.py's roofline for one cell: decode from bytes per step / bandwidth (or FLOPs
    / peak, whichever is slower), prefill from FLOPs / dense peak. Ratios are measured /
    predicted: below 1 is slower than the roof (the roof is an upper bound on speed)."""

    target: str
    precision: str
    memory_bandwidth_gbs: float
    peak_tflops: float
    decode_bound: str  # "memory" | "compute"
    decode_bytes_per_step: int
    decode_tokens_per_s: float  # all `concurrency` rows together
    tpot_s: float  # per request: one decode step
    prefill_s: float  # one prompt of prompt_len tokens, B=1
    prefill_tokens_per_s: float
    decode_ratio: float | None = None
    prefill_ratio: float | None = None


# --- the summary of one cell -------------------------------------------------------------------
@dataclass(frozen=True)
class Energy:
    """Energy while decoding: the integral of total input power over the cell's decode phases."""

    avg_power_w: float  # mean total power over the cell's rounds (wall time)
    decode_energy_j: float
    decode_tokens: int
    energy_per_token_j: float  # decode_energy_j / decode_tokens


@dataclass(frozen=True)
class CellSummary:
    prompt_len: int
    concurrency: int
    runs: int  # rounds finished
    requests: int  # requests finished
    complete: bool  # every planned round finished
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None  # None when gen_len is 1 (no decode step)
    ttft_s: Stats | None
    tpot_s: Stats | None
    e2e_s: Stats | None
    prefill_s: Stats | None
    prediction: Prediction | None = None
    energy: Energy | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize_cell(prompt_len: int, concurrency: int, rounds: Sequence[RoundResult],
                   planned_runs: int, prediction: Prediction | None = None,
                   energy: Energy | None = None) -> CellSummary:
    reqs = [r for rnd in rounds for r in rnd.requests]
    wall = sum(r.wall_s for r in rounds)
    decode_s = sum(r.decode_s for r in rounds)
    decode_tokens = sum(r.decode_tokens for r in rounds)
    prefill_s = sum(r.prefill_s for r in reqs)
    decode_rate = decode_tokens / decode_s if decode_s > 0 else None
    prefill_rate = sum(r.prompt_tokens for r in reqs) / prefill_s if prefill_s > 0 else 0.0
    if prediction is not None:
        prediction = Prediction(**{
            **asdict(prediction),
            "decode_ratio": ratio(decode_rate, prediction.decode_tokens_per_s),
            "prefill_ratio": ratio(prefill_rate, prediction.prefill_tokens_per_s)})
    return CellSummary(
        prompt_len=prompt_len, concurrency=concurrency, runs=len(rounds), requests=len(reqs),
        complete=len(rounds) >= planned_runs, wall_s=wall,
        requests_per_s=len(reqs) / wall if wall > 0 else 0.0,
        output_tokens_per_s=sum(r.output_tokens for r in reqs) / wall if wall > 0 else 0.0,
        prefill_tokens_per_s=prefill_rate, decode_tokens_per_s=decode_rate,
        ttft_s=Stats.of([r.ttft_s for r in reqs]),
        tpot_s=Stats.of([t for r in reqs if (t := r.tpot_s) is not None]),
        e2e_s=Stats.of([r.e2e_s for r in reqs]), prefill_s=Stats.of([r.prefill_s for r in reqs]),
        prediction=prediction, energy=energy)


def ratio(measured: float | None, predicted: float | None) -> float | None:
    return measured / predicted if measured and predicted else None


Predict = Callable[[int, int], Prediction]  # (prompt_len, concurrency) -> the roofline
NO_PREDICTION = ("no prediction yet: the device measures, the host adds the roofline of the "
                 "bundle's target when it reads the report (host/report.py with_predictions)")


def summarize(config: Mapping[str, Any], rounds: Sequence[RoundResult],
              energy: Mapping[tuple[int, int], Energy] | None = None,
              predict: Predict | None = None, note: str = NO_PREDICTION
              ) -> tuple[list[CellSummary], str]:
    """One summary per (prompt_len, concurrency) that has a finished round, in config order;
    and the note on predictions (why there are none, or what they assume). `predict` is the
    host's roofline (the device has no target catalogue): a ToolkitError from it leaves the
    cell without a prediction and says why in the note."""
    cells = []
    for p in config["prompt_lens"]:
        for c in config["concurrency"]:
            mine = [r for r in rounds if r.prompt_len == p and r.concurrency == c]
            if not mine:
                continue
            prediction = None
            try:
                prediction = predict(p, c) if predict is not None else None
            except ToolkitError as e:  # an unknown target here: the measurement still stands
                note = f"no prediction: {e.message}"
            cells.append(summarize_cell(p, c, mine, int(config["runs"]), prediction,
                                        (energy or {}).get((p, c))))
    return cells, note


# --- the report ------------------------------------------------------------------------------
@dataclass
class BenchReport:
    config: dict[str, Any]
    environment: dict[str, Any]
    rounds: list[RoundResult] = field(default_factory=list)
    cells: list[CellSummary] = field(default_factory=list)
    memory: dict[str, Any] | None = None
    power: dict[str, Any] | None = None
    complete: bool = False
    stopped_because: str | None = None  # None exactly when complete
    error: str | None = None  # the traceback when an exception stopped the run
    prediction_note: str = ""
    created_at: str = ""
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "complete": self.complete,
            "stopped_because": self.stopped_because, "error": self.error,
            "created_at": self.created_at, "duration_s": self.duration_s,
            "config": self.config, "environment": self.environment,
            "prediction_note": self.prediction_note,
            "cells": [c.to_json() for c in self.cells],
            "rounds": [r.to_json() for r in self.rounds],
            "memory": self.memory, "power": self.power,
        }

    def save(self, path: Path) -> Path:
        return save_report(self.to_json(), path)


def check_report_path(path: Path) -> None:
    """Refuse a report path that cannot be written, before the bench spends minutes measuring."""
    path = Path(path)
    if path.is_dir():
        raise ToolkitError(f"output {path} is a folder; the report is a .json file",
                           hint=f"choose another -o, e.g. {path / 'report.json'}")
    check_parent(path)


def save_report(data: Mapping[str, Any], path: Path) -> Path:
    """Write atomically (a temporary file renamed), so a crash never leaves half a report."""
    # an OSError here is what check_report_path cannot see: a read-only mount, a full disk
    return write_output(Path(path), (json.dumps(data, indent=2, allow_nan=False) + "\n").encode("utf-8"),
                        "choose another -o, in a folder you can write", what="the report", folder_mode=0o777)


def load_report(path: Path) -> dict[str, Any]:
    """Read and check a report: a ToolkitError for a file that is not JSON, not a bench
    report, or written with a newer schema than this toolkit reads."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ToolkitError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"{path} is not a bench report: it is not JSON ({e})",
                           hint="pass a .json file written by `toolkit bench`") from e
    check_report(data, str(path))
    return dict(data)


def check_report(data: Any, where: str = "report") -> None:
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ToolkitError(f"{where} is not a bench report (schema {found!r}, expected {SCHEMA!r})",
                           hint="pass a .json file written by `toolkit bench`")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ToolkitError(f"{where} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise ToolkitError(
            f"{where} is a bench report of schema_version {version}; this toolkit reads up to "
            f"{SCHEMA_VERSION}", hint="upgrade the toolkit on this machine to read it")
    if missing := [k for k in REQUIRED_KEYS if k not in data]:
        raise ToolkitError(f"{where} is a damaged bench report: it lacks {', '.join(missing)}")
    wrong = [k for k in ("config", "environment") if not isinstance(data[k], dict)]
    wrong += [k for k in ("memory", "power") if not isinstance(data[k], (dict, type(None)))]
    wrong += [k for k in ("cells", "rounds")
              if not isinstance(data[k], list) or not all(isinstance(c, dict) for c in data[k])]
    if wrong:
        raise ToolkitError(f"{where} is a damaged bench report: {', '.join(wrong)} "
                           f"{'is' if len(wrong) == 1 else 'are'} not what `toolkit bench` writes",
                           hint="run the bench again, or restore the file")


def report_from_events(events: Iterable[Mapping[str, Any]],
                       stopped_because: str = "the progress stream ended before the final report"
                       ) -> dict[str, Any]:
    """Rebuild a report from run_bench's progress events: the final "report" event when it
    came, else the PARTIAL report of every round that finished (complete: false). This is
    what the host does when a daemon-driven bench's stream dies (device/runtime/bench.py EVENTS)."""
    start: Mapping[str, Any] | None = None
    rounds: list[RoundResult] = []
    for event in events:
        kind = event.get("event")
        if kind == "report":
            check_report(event["report"])
            return dict(event["report"])
        if kind == "start":
            start = event
        elif kind == "round":
            rounds.append(RoundResult.from_json(event["round"]))
        elif kind == "stopped":
            stopped_because = str(event["stopped_because"])
    if start is None:
        raise ToolkitError("the bench stream ended before it started: no report to make",
                           hint="check the device's log, then run the bench again")
    config, env = dict(start["config"]), dict(start["environment"])
    cells, note = summarize(config, rounds)
    lost = "not measured: " + stopped_because
    report = BenchReport(config, env, rounds, cells, memory={"unavailable": lost},
                         power={"source": None, "reason": lost}, complete=False,
                         stopped_because=stopped_because, prediction_note=note,
                         created_at=str(start.get("created_at", "")))
    return report.to_json()
