"""A bench report as a self-contained HTML page, with its plots also written as PNG files.

    files = write_report_files(report, Path("out/smol.json"))
    # out/smol.json, out/smol.html, out/smol-latency-p128.png ..., out/smol-throughput.png

Plots (matplotlib, Agg backend: no display needed):
  <stem>-latency-p<L>.png   per prompt length L: the CDF of request latency (e2e) and of TPOT,
                            one line per concurrency
  <stem>-throughput.png     decode tokens/s (measured, and the roofline dashed) and requests/s
                            against concurrency, one line per prompt length
Each PNG carries the numbers it plots as JSON in a tEXt chunk (key "edge-toolkit-data"), so a
test - or a reader - can check a picture against the report without reading pixels. The HTML
embeds the same PNG bytes (base64) and the report JSON itself (<script id="bench-report">).

matplotlib is the [report] extra: where it is not installed the page is written without plots
and ReportFiles.plots_missing names it (the CLI says which extra to install).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.atomic import write_output as atomic_output
from bundle.benchreport import save_report
from host.report import CELL_HEADER, cell_row, fmt, headline, memory_line, power_line

PNG_DATA_KEY = "edge-toolkit-data"
FIGSIZE = (10.0, 4.0)  # inches
DPI = 100  # -> 1000 x 400 pixels


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    html: Path | None
    pngs: tuple[Path, ...]
    plots_missing: str | None = None  # the package the plots need that is not installed


def write_report_files(report: Mapping[str, Any], json_path: Path,
                       html_page: bool = True) -> ReportFiles:
    """The JSON, and beside it (same stem) the HTML page and its PNG plots."""
    json_path = save_report(report, Path(json_path))
    if not html_page:
        return ReportFiles(json_path, None, ())
    return write_html_files(report, json_path)


def write_output(path: Path, data: bytes) -> Path:
    """One output file (page, plot, table) the user named, written atomically; an OSError is one
    line saying to choose another path."""
    return atomic_output(path, data, "choose another path, in a folder you can write")


def write_html_files(report: Mapping[str, Any], json_path: Path) -> ReportFiles:
    """<stem>.html and <stem>-<plot>.png beside json_path (which is not touched); without
    matplotlib the page alone, and plots_missing says so."""
    missing = None
    try:
        plots = render_plots(report)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "matplotlib":
            raise
        plots, missing = {}, "matplotlib"
    pngs = []
    for suffix, png in plots.items():
        pngs.append(write_output(json_path.with_name(f"{json_path.stem}-{suffix}.png"), png))
    page = write_output(json_path.with_suffix(".html"),
                        render_html(report, plots, plots_missing=missing).encode("utf-8"))
    return ReportFiles(json_path, page, tuple(pngs), missing)


# --- plots -------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib  # the [report] extra: ModuleNotFoundError without it (see write_html_files)

    matplotlib.use("Agg")  # files only: never a display
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, data: Mapping[str, Any]) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI,
                metadata={PNG_DATA_KEY: json.dumps(data, sort_keys=True)})
    return buf.getvalue()


def _requests(report: Mapping[str, Any], prompt_len: int, concurrency: int) -> list[dict[str, Any]]:
    return [r for rnd in report["rounds"] if rnd["prompt_len"] == prompt_len
            and rnd["concurrency"] == concurrency for r in rnd["requests"]]


def render_plots(report: Mapping[str, Any]) -> dict[str, bytes]:
    """{"latency-p128": png bytes, ..., "throughput": png bytes}; empty without a finished round."""
    plt = _pyplot()
    cells = report["cells"]
    out: dict[str, bytes] = {}
    for p in sorted({c["prompt_len"] for c in cells}):
        fig, data = latency_figure(plt, report, p)
        out[f"latency-p{p}"] = _png(fig, data)
        plt.close(fig)
    if cells:
        fig, data = throughput_figure(plt, report)
        out["throughput"] = _png(fig, data)
        plt.close(fig)
    return out


def latency_figure(plt: Any, report: Mapping[str, Any], prompt_len: int
                   ) -> tuple[Any, dict[str, Any]]:
    """Empirical CDFs (step: fraction of requests at or below x) of e2e latency and TPOT, ms;
    returns the figure and the numbers it plots."""
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    data: dict[str, Any] = {"prompt_len": prompt_len, "e2e_ms": {}, "tpot_ms": {}}
    concurrencies = sorted({c["concurrency"] for c in report["cells"]
                            if c["prompt_len"] == prompt_len})
    for c in concurrencies:
        reqs = _requests(report, prompt_len, c)
        for ax, key, name in ((axes[0], "e2e_s", "e2e_ms"), (axes[1], "tpot_s", "tpot_ms")):
            xs = sorted(r[key] * 1e3 for r in reqs if r[key] is not None)
            if not xs:
                continue
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            # from 0 at the fastest request, up by 1/n at each one
            ax.step([xs[0], *xs], [0.0, *ys], where="post", label=f"concurrency {c}")
            ax.plot(xs, ys, "o", markersize=3, color=ax.get_lines()[-1].get_color())
            data[name][str(c)] = xs
    gen = report["config"]["gen_len"]
    for ax, title in ((axes[0], "request latency (arrival -> last token)"),
                      (axes[1], "time per output token (after the first)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{_name(report)}: prompt {prompt_len} tokens, {gen} generated", fontsize=11)
    fig.tight_layout()
    return fig, data


def throughput_figure(plt: Any, report: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Decode tokens/s (all requests together) and requests/s against concurrency; returns the
    figure and the numbers it plots."""
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    data: dict[str, Any] = {"decode_tokens_per_s": {}, "roofline_decode_tokens_per_s": {},
                            "requests_per_s": {}}
    spread: list[float] = []
    drawn: list[list[Any]] = []  # roofline series already drawn (decode's does not depend on
    for p in sorted({c["prompt_len"] for c in report["cells"]}):  # the prompt: one line)
        cells = sorted((c for c in report["cells"] if c["prompt_len"] == p),
                       key=lambda c: c["concurrency"])
        xs = [c["concurrency"] for c in cells]
        decode = [c["decode_tokens_per_s"] for c in cells]
        roof = [(c.get("prediction") or {}).get("decode_tokens_per_s") for c in cells]
        line = axes[0].plot(xs, decode, "o-", label=f"prompt {p}")[0]
        if all(r is not None for r in roof) and [xs, roof] not in drawn:
            label = f"prompt {p} roofline" if drawn else "roofline (targets/plan.py)"
            axes[0].plot(xs, roof, "--", color="gray" if not drawn else line.get_color(),
                         label=label)
            drawn.append([xs, roof])
            spread += [r / d for r, d in zip(roof, decode) if d]
        axes[1].plot(xs, [c["requests_per_s"] for c in cells], "o-", label=f"prompt {p}")
        data["decode_tokens_per_s"][str(p)] = dict(zip(map(str, xs), decode))
        data["roofline_decode_tokens_per_s"][str(p)] = dict(zip(map(str, xs), roof))
        data["requests_per_s"][str(p)] = {str(c["concurrency"]): c["requests_per_s"] for c in cells}
    if spread and max(spread) > 10:  # the roof far above the measurement: log keeps both visible
        axes[0].set_yscale("log")
    else:
        axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    for ax, title, unit in ((axes[0], "decode throughput (all requests)", "tokens/s"),
                            (axes[1], "request throughput", "requests/s")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(unit)
        ax.set_xticks(sorted({c["concurrency"] for c in report["cells"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{_name(report)}: throughput against concurrency", fontsize=11)
    fig.tight_layout()
    return fig, data


def compare_figure(plt: Any, reports: Sequence[Mapping[str, Any]], labels: Sequence[str]
                   ) -> tuple[Any, dict[str, Any]]:
    """Several reports (a fleet's boards) at a glance: for every prompt x concurrency cell of
    any of them, each report's decode tokens/s and TTFT p50 as grouped bars (a cell a report
    lacks has no bar). Returns the figure and the numbers it plots."""
    keys: list[tuple[int, int]] = []
    for r in reports:
        keys += [k for c in r["cells"] if (k := (c["prompt_len"], c["concurrency"])) not in keys]
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    names = [f"p{p} c{c}" for p, c in keys]
    data: dict[str, Any] = {"cells": names, "decode_tokens_per_s": {}, "ttft_p50_ms": {}}
    width = 0.8 / len(reports)
    for i, (label, r) in enumerate(zip(labels, reports)):
        cells = {(c["prompt_len"], c["concurrency"]): c for c in r["cells"]}
        decode = [cells[k]["decode_tokens_per_s"] if k in cells else None for k in keys]
        ttft = [cells[k]["ttft_s"]["p50"] * 1e3 if k in cells and cells[k].get("ttft_s") else None
                for k in keys]
        xs = [j + (i - (len(reports) - 1) / 2) * width for j in range(len(keys))]
        for ax, values in ((axes[0], decode), (axes[1], ttft)):
            shown = [(x, v) for x, v in zip(xs, values) if v is not None]
            ax.bar([x for x, _ in shown], [v for _, v in shown], width, label=label)
        data["decode_tokens_per_s"][label], data["ttft_p50_ms"][label] = decode, ttft
    for ax, title, unit in ((axes[0], "decode throughput (higher is better)", "tokens/s"),
                            (axes[1], "time to first token, p50 (lower is better)", "ms")):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_xlabel("prompt tokens (p) x concurrency (c)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(reports)} reports: {', '.join(labels)}", fontsize=11)
    fig.tight_layout()
    return fig, data


def write_compare_plot(reports: Sequence[Mapping[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """compare_figure as a PNG at `path` (the numbers it plots ride in its metadata)."""
    plt = _pyplot()
    fig, data = compare_figure(plt, reports, labels)
    try:
        write_output(path, _png(fig, data))
    finally:
        plt.close(fig)
    return path


def _name(report: Mapping[str, Any]) -> str:
    b = report["environment"].get("bundle", {})
    return f"{b.get('name', '?')} {b.get('precision', '')} on {b.get('target', '?')}"


# --- the page ----------------------------------------------------------------------------------
_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}
.partial{background:#fde2e2;border:1px solid #e99;padding:0.6em}img{max-width:100%}
pre{background:#f6f6f6;padding:0.6em;overflow-x:auto;font-size:0.85em}"""


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 0) -> str:
    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{html.escape(str(h))}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{html.escape(str(v))}</td>"
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _pairs(data: Mapping[str, Any] | None) -> str:
    rows = [(k, v if not isinstance(v, dict | list) else json.dumps(v))
            for k, v in (data or {}).items()]
    return _table(("field", "value"), [(k, "-" if v is None else v) for k, v in rows], left=2)


def render_html(report: Mapping[str, Any], plots: Mapping[str, bytes],
                plots_missing: str | None = None) -> str:
    env = report["environment"]
    head = headline(report)
    parts = [f"<h1>Bench report: {html.escape(_name(report))}</h1>"]
    if not report["complete"]:
        parts.append(f'<p class="partial"><b>Partial report</b>: stopped because '
                     f"{html.escape(str(report['stopped_because']))}. Only the rounds that "
                     "finished are counted.</p>")
    parts += [f"<p>{html.escape(line)}</p>" for line in head if not line.startswith("PARTIAL")]
    parts += ["<h2>Results</h2>",
              _table(CELL_HEADER, [cell_row(c) for c in report["cells"]]),
              f"<p>{html.escape(memory_line(report.get('memory')))}<br>"
              f"{html.escape(power_line(report.get('power')))}</p>",
              f"<p><small>{html.escape(report.get('prediction_note', ''))}</small></p>",
              "<h2>Plots</h2>"]
    if plots_missing:
        parts.append(f"<p>No plots: {html.escape(plots_missing)} was not installed where this page "
                     "was written.</p>")
    for name, png in plots.items():
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f'<p><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}"></p>')
    parts += ["<h2>Latency percentiles (ms)</h2>", _percentile_table(report),
              "<h2>Memory</h2>", _pairs(report.get("memory")),
              "<h2>Power</h2>", _pairs(report.get("power")),
              "<h2>Environment</h2>", _pairs(_flat_env(env)),
              "<h2>Configuration</h2>", _pairs(report["config"])]
    if report.get("error"):
        parts += ["<h2>Error</h2>", f"<pre>{html.escape(report['error'])}</pre>"]
    data = json.dumps(report).replace("</", "<\\/")  # no "</script>" inside the script element
    parts.append(f'<script type="application/json" id="bench-report">{data}</script>')
    title = html.escape(f"bench {_name(report)}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _percentile_table(report: Mapping[str, Any]) -> str:
    header = ("prompt", "conc", "metric", "n", "mean", "min", "p50", "p90", "p95", "p99", "max")
    rows = []
    for c in report["cells"]:
        for key in ("ttft_s", "tpot_s", "e2e_s", "prefill_s"):
            s = c.get(key)
            if s:
                rows.append([c["prompt_len"], c["concurrency"], key[:-2], s["n"],
                             *(fmt(s[k] * 1e3) for k in
                               ("mean", "min", "p50", "p90", "p95", "p99", "max"))])
    return _table(header, rows, left=3)


def _flat_env(env: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if isinstance(value, dict) and key != "backend":
            out.update({f"{key}.{k}": v for k, v in value.items() if k != "dims"})
        else:
            out[key] = value
    return out
