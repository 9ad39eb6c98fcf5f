"""Benchmark reports on the host: the roofline beside the measurement, tables, comparisons.

The records live in bundle/benchreport.py (the device fills them); this adds what needs the
target catalogue and the model dimensions, which a board does not carry:

    report = with_predictions(load_report("smol.json"))   # roofline per cell, ratios
    print(render_table(report))                # Markdown: one row per prompt length x concurrency
    print(compare_reports([("A", a), ("B", b)]))
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from bundle.benchreport import (
    MIB,
    Energy,
    Prediction,
    RoundResult,
    ratio,
    summarize,
)
from bundle.errors import ToolkitError

ROOFLINE_NOTE = ("roofline from targets/plan.py speed() for the bundle's target, precision and "
                 "max_seq: decode reads every matmul weight and the whole static KV capacity per "
                 "step; prefill is FLOPs over dense peak. An upper bound on speed: ratio = measured "
                 "/ predicted.")


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


def with_predictions(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report with every cell's roofline prediction and measured/predicted ratios, made
    again from its raw rounds (the device sends none: it has no target catalogue)."""
    out = dict(report)
    bundle = dict(report.get("environment", {}).get("bundle", {}))
    rounds = [RoundResult.from_json(r) for r in report.get("rounds", [])]
    energy = {(c["prompt_len"], c["concurrency"]): Energy(**c["energy"])
              for c in report.get("cells", []) if c.get("energy")}
    cells, note = summarize(report["config"], rounds, energy,
                            predict=lambda p, c: roofline(bundle, p, c), note=ROOFLINE_NOTE)
    out["cells"] = [c.to_json() for c in cells]
    out["prediction_note"] = note
    return out


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


def compare_reports(reports: Sequence[tuple[str, Mapping[str, Any]]],
                    labels: Sequence[str] | None = None) -> str:
    """Side by side: each report's value, and X/A for every report after the first. The columns
    are A, B, C... unless `labels` names them (a fleet's board names, `report compare --names`)."""
    if len(reports) < 2:
        raise ToolkitError("compare needs at least two reports")
    if labels is None:
        labels = column_labels(len(reports))
    elif len(labels) != len(reports) or len(set(labels)) != len(labels):
        raise ToolkitError(f"compare needs one distinct label per report (got {list(labels)})",
                           hint="name each report file after its board: orin-01.json, orin-02.json")
    first = labels[0]
    lines = []
    for label, (name, r) in zip(labels, reports):
        b = r["environment"].get("bundle", {})
        state = "complete" if r["complete"] else f"PARTIAL ({r['stopped_because']})"
        lines.append(f"{label}: {name}: {b.get('name')} {b.get('precision')} max_seq "
                     f"{b.get('max_seq')} on {r['environment'].get('target', {}).get('name')}, "
                     f"{state}")
    header = ["prompt", "conc", "metric"]
    for label in labels:
        header += [label] if label == first else [label, f"{label}/{first}"]
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


def column_labels(n: int) -> list[str]:
    """The default names of n reports' columns: A, B, C..."""
    return [_letters(i) for i in range(n)]


def _letters(i: int) -> str:
    """A..Z, then AA, AB, ... (a fleet can hold more than 26 reports)."""
    return _letters(i // 26 - 1) + chr(ord("A") + i % 26) if i >= 26 else chr(ord("A") + i)


def _find(report: Mapping[str, Any], prompt_len: int, concurrency: int) -> Mapping[str, Any] | None:
    return next((c for c in report["cells"] if c["prompt_len"] == prompt_len
                 and c["concurrency"] == concurrency), None)


def _with_ratios(values: Sequence[float | None]) -> list[str]:
    out = [fmt(values[0])]
    for v in values[1:]:
        out += [fmt(v), fmt(ratio(v, values[0]))]
    return out
