"""bench/serve.py's pure parts: percentiles, same-round ratios, aggregates, flag detection and the
table, and the chunked-prefill row over fake daemons (the measurements themselves belong to the
bench, not the suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.serve import (
    CONCURRENCY,
    VARIANTS,
    Cells,
    Concurrent,
    Extra,
    Report,
    Settings,
    Stream,
    aggregate,
    has_flag,
    median_ratio,
    pad,
    percentile,
    render,
)


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 95) == pytest.approx(4.0 + 0.8 * 6.0)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) == 0.0


def test_median_ratio_pairs_rounds_and_skips_missing_ones() -> None:
    assert median_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 2.0]) == 2.0  # ratios 2, 1, 5
    assert median_ratio([2.0, None, 4.0], [1.0, 1.0, None]) == 2.0
    assert median_ratio([None], [1.0]) is None


def test_aggregate_counts_tokens_once_every_stream_decodes_and_pools_gaps() -> None:
    a = Stream(0.0, (1.0, 1.1, 1.2, 1.3, 1.4, 1.5), 6, "")
    b = Stream(0.0, (1.15, 1.25, 1.35, 1.45, 1.9), 5, "")
    agg = aggregate([a, b])  # after 1.15 (b's first): a's 1.2..1.5, b's 1.25..1.9; up to 1.9
    assert agg.agg_tok_s == pytest.approx(8 / 0.75)
    assert agg.p50_tpot == pytest.approx(0.1)
    assert agg.p95_tpot > 0.3  # b's 0.45 s stall shows at p95
    assert a.ttft == 1.0 and a.tok_s == pytest.approx(5 / 0.5)


def test_aggregate_of_streams_arriving_in_runs_is_not_a_window_between_runs() -> None:
    # drafting streams: tokens in runs. The window in which both decode, (0.6, 1.4], holds
    # none of a's runs and b's last two tokens: 2.5 tok/s; up to the last token: 6 / 0.9
    a = Stream(0.0, (0.0, 0.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5), 9, "")
    b = Stream(0.0, (0.6, 0.6, 0.6, 1.4, 1.4), 5, "")
    assert aggregate([a, b]).agg_tok_s == pytest.approx(6 / 0.9)
    a, b = Stream(0.0, (1.0, 1.5), 2, ""), Stream(0.0, (2.0, 2.5), 2, "")  # no overlap at all
    assert aggregate([a, b]).agg_tok_s == pytest.approx(2 / 1.5)


def test_flag_detection_reads_options_not_substrings() -> None:
    text = ("  --prefix-cache-mb INTEGER  Memory for cached prompt prefixes.\n"
            "  --speculate [off|ngram]     Prompt-lookup drafting.\n"
            "  --slots INTEGER             see also --prefill-chunk-size\n")
    assert has_flag(text, "--prefix-cache-mb")
    assert has_flag(text, "--speculate")
    assert not has_flag(text, "--prefill-chunk")


def test_render_shows_ratios_notes_and_na_rows() -> None:
    tables = {}
    for p, speed in (("fp32", 1.0), ("int4", 2.0)):
        t = {v: Cells() for v in VARIANTS}
        for r in range(2):
            t["daemon"].tok_s.append(50.0 * speed)
            t["in-process"].tok_s.append(50.0 * speed / (0.95 if r else 1.05))
            t["daemon"].ttft.append(0.1)
            for c in CONCURRENCY:
                t["daemon"].conc.setdefault(c, []).append(Concurrent(40.0 * speed * c ** 0.5, 0.02, 0.03))
        t["llama-server"].note = "llama.cpp is not built yet"
        for v in VARIANTS:
            pad(t[v], 2)
        tables[p] = t
    rep = Report(Settings(2, 2, 128, 48), tables, {"fp32": {"ours": 9.5, "llama.cpp": "n/a"}},
                 [Extra("prefix cache: TTFT hit / cold", note="n/a (daemon has no --prefix-cache-mb)")],
                 {"fp32": "F32 gguf", "int4": "Q4_1 gguf"}, {"fp32": 2.06, "int4": 1.26})
    text = render(rep)
    assert "daemon / in-process" in text and "1.00x" in text  # median of 0.95 and 1.05... per round
    assert "2.83x" in text  # c=8 / c=1 = sqrt(8)
    ratio = next(line for line in text.splitlines() if line.startswith("  in-process [8,16] / [1,16]"))
    assert ratio.split()[-2:] == ["2.06x", "1.26x"]  # under the daemon's c=8 / c=1, per precision
    assert "9.50 / n/a" in text
    assert "n/a (daemon has no --prefix-cache-mb)" in text
    assert "note: fp32 llama-server: llama.cpp is not built yet" in text
    # the open questions: a concurrency row of their own, no single-stream rows
    assert "daemon, open questions (answers that copy nothing)" in text and "  daemon-open" not in text


def test_chunk_row_pairs_each_case_with_its_own_baseline(monkeypatch) -> None:
    """The chunked-prefill row: with the defaults and with drafting off, each case's chunked and
    whole p95 over that same case's streams with nothing arriving (fake daemons, fixed gaps)."""
    import bench.serve as serve

    # the 3 streams' gap (s) by (drafting off?, chunk flag, long prompt arriving?)
    gap = {(False, "auto", False): 0.100, (False, "auto", True): 0.100, (False, "off", True): 0.080,
           (True, "auto", False): 0.025, (True, "auto", True): 0.060, (True, "off", True): 0.030}

    class FakeDaemon:
        def __init__(self, bundle, threads, slots=None, flags=()) -> None:
            self.plain = serve.SPEC_FLAG in flags
            self.chunk = flags[list(flags).index(serve.CHUNK_FLAG) + 1]

        def close(self) -> None:
            pass

    def fake_run(daemon, prompts, n, starts=None):
        g = gap[daemon.plain, daemon.chunk, len(prompts) == 4]
        return [Stream(0.0, tuple(0.1 + g * i for i in range(n)), n, "") for _ in prompts]

    monkeypatch.setattr(serve, "Daemon", FakeDaemon)
    monkeypatch.setattr(serve, "run_concurrent", fake_run)
    monkeypatch.setattr(serve, "default_bundle", lambda precision: precision)
    monkeypatch.setattr(serve, "prompt_ids", lambda tok, n, variant=0: [variant] * 4)
    row = serve.chunk_row(None, Settings(threads=2, rounds=2, new_tokens=8, conc_tokens=8),
                          f"  {serve.CHUNK_FLAG} [auto|off|N]")
    assert row.figure == pytest.approx(1.0)  # defaults: 100 ms with and without the long prompt
    assert "drafting off (--speculate off): chunked 2.40x" in row.detail  # 60 / 25 ms
    assert "p95 none/chunked/whole 100/100/80 ms" in row.detail
    assert "p95 none/chunked/whole 25/60/30 ms" in row.detail


def test_the_step_ratio_is_eight_one_row_steps_over_one_step_of_eight_rows(tiny_bundle: Any,
                                                                          monkeypatch: Any) -> None:
    """The step-ratio row: 8 x t([1, 16]) / t([8, 16]) from bench/verify_batch.py's own measure, on
    the bundle the bench serves (the tiny Llama here, standing in for the default bundle)."""
    import bench.serve as serve
    import bench.verify_batch as verify_batch

    bundle = Path(tiny_bundle("llama", "cpu"))
    seen = {}
    real = verify_batch.measure

    def spy(path, args):
        seen["args"] = args
        result = real(path, args)
        seen["times"] = result.times
        return result

    monkeypatch.setattr(serve, "default_bundle", lambda precision: bundle)
    monkeypatch.setattr(verify_batch, "measure", spy)
    ratio = serve.joint_step_ratio("fp32", threads=1, quick=True, position=8)  # the tiny cache: 64
    assert (seen["args"].rows, seen["args"].tokens) == (8, [16])
    (t, one_step, rows), = seen["times"]
    assert t == 16 and ratio == rows / one_step > 0
