"""Benchmark reports: the records, the summary, the roofline beside the measurement, tables.

The device measures (device/bench.py); everything here is host-safe (no onnxruntime, no
numpy), so the host reads, compares and renders reports it pulled from a board:

    report = load_report("smol.json")          # ToolkitError for non-reports / newer schemas
    print(render_table(report))                # Markdown: one row per prompt length x concurrency
    print(compare_reports([("A", a), ("B", b)]))

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
            the first, the daemon's `predicted_per_token_ms` (device/scheduler.py Timings).
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ToolkitError

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
        for name in ("prompt_lens", "concurrency"):
            values = tuple(int(v) for v in getattr(self, name))
            object.__setattr__(self, name, values)
            if not values or min(values) < 1 or len(set(values)) != len(values):
                raise ToolkitError(f"{name.replace('_', '-')} must be distinct positive integers "
                                   f"(got {list(values)})", hint="e.g. --prompt-lens 128,512")
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


def roofline(bundle: Mapping[str, Any], prompt_len: int, concurrency: int) -> Prediction:
    """The plan's speed() for this bundle (environment.bundle: dims, target, precision, max_seq).

    Decode: speed(batch=concurrency) gives one step's time for all rows. Prefill: speed() prices
    a context-filling prefill in `chunk`-token steps, each attending over the static cache; with
    chunk = prompt_len one step is exactly one of our prompts (B=1), so the prompt's time is
    prompt_len / (the plan's prefill tokens per second). Raises ToolkitError when the target or
    dimensions are unknown here."""
    from models.dims import ModelDims
    from targets import load_target
    from targets.plan import speed

    try:
        dims = ModelDims(**bundle["dims"])
    except (KeyError, TypeError) as e:
        raise ToolkitError(f"the report's bundle has no usable model dimensions ({e})") from e
    target = load_target(str(bundle["target"]))
    precision, max_seq = str(bundle["precision"]), int(bundle["max_seq"])
    if precision not in target.peak_tflops:
        raise ToolkitError(f"target {target.name} has no peak for precision {precision}")
    decode = speed(dims, target, precision, max_seq, concurrency, None)
    prefill = speed(dims, target, precision, max_seq, 1, min(prompt_len, max_seq))
    prefill_rate = prefill.prefill_tokens / prefill.prefill_s
    return Prediction(
        target=target.name, precision=precision,
        memory_bandwidth_gbs=target.memory_bandwidth_gbs,
        peak_tflops=target.peak_tflops[precision], decode_bound=decode.decode_bound,
        decode_bytes_per_step=decode.decode_bytes_per_step,
        decode_tokens_per_s=decode.decode_tokens_s * concurrency,
        tpot_s=1.0 / decode.decode_tokens_s, prefill_s=prompt_len / prefill_rate,
        prefill_tokens_per_s=prefill_rate)


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
            "decode_ratio": _ratio(decode_rate, prediction.decode_tokens_per_s),
            "prefill_ratio": _ratio(prefill_rate, prediction.prefill_tokens_per_s)})
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


def _ratio(measured: float | None, predicted: float | None) -> float | None:
    return measured / predicted if measured and predicted else None


def summarize(config: Mapping[str, Any], bundle: Mapping[str, Any],
              rounds: Sequence[RoundResult],
              energy: Mapping[tuple[int, int], Energy] | None = None
              ) -> tuple[list[CellSummary], str]:
    """One summary per (prompt_len, concurrency) that has a finished round, in config order;
    and the note on predictions (why there are none, or what they assume)."""
    note = ("roofline from targets/plan.py speed() for the bundle's target, precision and "
            "max_seq: decode reads every matmul weight and the whole static KV capacity per "
            "step; prefill is FLOPs over dense peak. An upper bound on speed: ratio = measured "
            "/ predicted.")
    cells = []
    for p in config["prompt_lens"]:
        for c in config["concurrency"]:
            mine = [r for r in rounds if r.prompt_len == p and r.concurrency == c]
            if not mine:
                continue
            prediction = None
            try:
                prediction = roofline(bundle, p, c)
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


def save_report(data: Mapping[str, Any], path: Path) -> Path:
    """Write atomically (a temporary file renamed), so a crash never leaves half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


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


def report_from_events(events: Iterable[Mapping[str, Any]],
                       stopped_because: str = "the progress stream ended before the final report"
                       ) -> dict[str, Any]:
    """Rebuild a report from run_bench's progress events: the final "report" event when it
    came, else the PARTIAL report of every round that finished (complete: false). This is
    what the host does when a daemon-driven bench's stream dies (device/bench.py EVENTS)."""
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
    cells, note = summarize(config, env.get("bundle", {}), rounds)
    lost = "not measured: " + stopped_because
    report = BenchReport(config, env, rounds, cells, memory={"unavailable": lost},
                         power={"source": None, "reason": lost}, complete=False,
                         stopped_because=stopped_because, prediction_note=note,
                         created_at=str(start.get("created_at", "")))
    return report.to_json()


# --- rendering ---------------------------------------------------------------------------------
def fmt(x: float | None) -> str:
    """Three significant figures or so, never scientific: 1234 -> "1234", 12.34 -> "12.3",
    0.01234 -> "0.0123"; None -> "-"."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    digits = min(2 - math.floor(math.log10(a)), 6)
    return f"{x:.{digits}f}"


def _ms(stats: Mapping[str, Any] | None, key: str) -> str:
    return fmt(stats[key] * 1e3) if stats else "-"


def _mib(n: Any) -> str:
    return fmt(n / MIB) if isinstance(n, int | float) else "-"


CELL_HEADER = ("prompt", "conc", "reqs", "TTFT p50 ms", "TTFT p95 ms", "TPOT p50 ms",
               "TPOT p95 ms", "e2e p50 ms", "e2e p95 ms", "prefill tok/s", "decode tok/s",
               "req/s", "roofline decode tok/s", "decode meas/pred", "J/token")


def cell_row(cell: Mapping[str, Any]) -> list[str]:
    """One row of CELL_HEADER; the Markdown table and the HTML page both use it."""
    pred, energy = cell.get("prediction") or {}, cell.get("energy") or {}
    mark = "" if cell.get("complete", True) else " (partial)"
    return [str(cell["prompt_len"]), str(cell["concurrency"]) + mark, str(cell["requests"]),
            _ms(cell["ttft_s"], "p50"), _ms(cell["ttft_s"], "p95"),
            _ms(cell["tpot_s"], "p50"), _ms(cell["tpot_s"], "p95"),
            _ms(cell["e2e_s"], "p50"), _ms(cell["e2e_s"], "p95"),
            fmt(cell["prefill_tokens_per_s"]), fmt(cell["decode_tokens_per_s"]),
            fmt(cell["requests_per_s"]), fmt(pred.get("decode_tokens_per_s")),
            fmt(pred.get("decode_ratio")), fmt(energy.get("energy_per_token_j"))]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def headline(report: Mapping[str, Any]) -> list[str]:
    """Who ran what where, and whether the run finished."""
    env, cfg = report["environment"], report["config"]
    b, backend = env.get("bundle", {}), env.get("backend", {})
    lines = [f"{b.get('name', '?')} ({b.get('precision', '?')}, max_seq {b.get('max_seq', '?')}) "
             f"on {env.get('target', {}).get('name', '?')} / {backend.get('backend', '?')}, "
             f"threads {env.get('threads') or backend.get('threads') or '-'}, "
             f"{env.get('cpu', {}).get('model', '?')}",
             f"prompt lengths {cfg['prompt_lens']}, gen {cfg['gen_len']} tokens, concurrency "
             f"{cfg['concurrency']}, {cfg['runs']} rounds each (+{cfg.get('warmup', 0)} warm-up)"]
    if not report["complete"]:
        lines.insert(0, f"PARTIAL REPORT: stopped because {report['stopped_because']}")
    return lines


def memory_line(memory: Mapping[str, Any] | None) -> str:
    if not memory or "unavailable" in memory:
        return f"memory: {(memory or {}).get('unavailable', 'not measured')}"
    parts = [f"peak RSS {_mib(memory.get('rss_peak_bytes'))} MiB",
             f"KV cache {_mib(memory.get('kv_cache_bytes'))} MiB",
             f"MemAvailable drop during the run {_mib(memory.get('mem_available_drop_bytes'))} MiB"]
    if memory.get("load_drop_bytes") is not None:
        parts.append(f"drop at load {_mib(memory['load_drop_bytes'])} MiB")
    gpu = memory.get("gpu")
    parts.append(f"GPU used +{_mib(gpu['used_delta_bytes'])} MiB" if gpu
                 else f"GPU: {memory.get('gpu_reason') or 'none'}")
    return "memory: " + ", ".join(parts)


def power_line(power: Mapping[str, Any] | None) -> str:
    if not power or not power.get("source"):
        return f"power: {(power or {}).get('reason') or 'not measured'}"
    mode = (power.get("power_mode") or {}).get("name") or power.get("power_mode_reason") or "?"
    return (f"power ({power['source']}, {power.get('total_rail')}, mode {mode}): average "
            f"{fmt(power.get('avg_power_w'))} W, {fmt(power.get('energy_per_token_j'))} J per "
            f"decoded token over {power.get('samples')} samples")


def render_table(report: Mapping[str, Any]) -> str:
    """The terminal / Markdown view of a report."""
    rows = [cell_row(c) for c in report["cells"]]
    lines = [*headline(report), "", markdown_table(CELL_HEADER, rows) if rows
             else "(no finished round)", "", memory_line(report.get("memory")),
             power_line(report.get("power")),
             "TTFT/TPOT/e2e: per request; tok/s and req/s: all requests of a cell together; "
             "roofline: targets/plan.py (an upper bound)"]
    return "\n".join(lines)


# --- compare -------------------------------------------------------------------------------
# (label, getter) for each compared metric; lower is better for latencies and memory.
def _stat(key: str, q: str) -> Any:
    return lambda c: c[key][q] * 1e3 if c.get(key) else None


CELL_METRICS = (("TTFT p50 ms", _stat("ttft_s", "p50")), ("TPOT p50 ms", _stat("tpot_s", "p50")),
                ("e2e p50 ms", _stat("e2e_s", "p50")), ("e2e p95 ms", _stat("e2e_s", "p95")),
                ("prefill tok/s", lambda c: c["prefill_tokens_per_s"]),
                ("decode tok/s", lambda c: c["decode_tokens_per_s"]),
                ("req/s", lambda c: c["requests_per_s"]),
                ("J/token", lambda c: (c.get("energy") or {}).get("energy_per_token_j")))
RUN_METRICS = (("peak RSS MiB", "rss_peak_bytes"), ("KV cache MiB", "kv_cache_bytes"),
               ("MemAvailable drop MiB", "mem_available_drop_bytes"))


def compare_reports(reports: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Side by side: each report's value, and X/A for every report after the first."""
    if len(reports) < 2:
        raise ToolkitError("compare needs at least two reports")
    labels = [chr(ord("A") + i) for i in range(len(reports))]
    lines = []
    for label, (name, r) in zip(labels, reports):
        b = r["environment"].get("bundle", {})
        state = "complete" if r["complete"] else f"PARTIAL ({r['stopped_because']})"
        lines.append(f"{label}: {name}: {b.get('name')} {b.get('precision')} max_seq "
                     f"{b.get('max_seq')} on {r['environment'].get('target', {}).get('name')}, "
                     f"{state}")
    header = ["prompt", "conc", "metric"]
    for label in labels:
        header += [label] if label == "A" else [label, f"{label}/A"]
    rows = []
    keys: list[tuple[int, int]] = []  # every cell of any report, the first report's order first
    for _, r in reports:
        keys += [k for c in r["cells"] if (k := (c["prompt_len"], c["concurrency"])) not in keys]
    for p, c in keys:
        cells = [_find(r, p, c) for _, r in reports]
        for name, get in CELL_METRICS:
            values = [get(x) if x else None for x in cells]
            if all(v is None for v in values):
                continue
            rows.append([str(p), str(c), name, *_with_ratios(values)])
    for name, key in RUN_METRICS:
        values = [(r.get("memory") or {}).get(key) for _, r in reports]
        rows.append(["-", "-", name, *_with_ratios([v / MIB if v is not None else None
                                                    for v in values])])
    missing = [f"{lab} lacks prompt {p} x {c}" for lab, (_, r) in zip(labels, reports)
               for p, c in keys if _find(r, p, c) is None]
    return "\n".join([*lines, "", markdown_table(header, rows), *missing])


def _find(report: Mapping[str, Any], prompt_len: int, concurrency: int) -> Mapping[str, Any] | None:
    return next((c for c in report["cells"] if c["prompt_len"] == prompt_len
                 and c["concurrency"] == concurrency), None)


def _with_ratios(values: Sequence[float | None]) -> list[str]:
    out = [fmt(values[0])]
    for v in values[1:]:
        out += [fmt(v), fmt(_ratio(v, values[0]))]
    return out
