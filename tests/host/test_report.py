"""Bench reports on the host: percentiles, loading and refusing files, compare, host-safety."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from bundle.benchreport import BenchConfig, RequestRecord, Stats, load_report, percentile
from bundle.errors import ToolkitError
from host.report import fmt

# --- percentiles against hand-computed answers -------------------------------------------------
# 10..100 ms: h = 9q/100. p50: h=4.5 -> 50 + 0.5*10 = 55; p90: h=8.1 -> 90 + 0.1*10 = 91;
# p95: h=8.55 -> 95.5; p99: h=8.91 -> 99.1.
EVEN = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
EVEN_ANSWERS = {50: 55.0, 90: 91.0, 95: 95.5, 99: 99.1, 0: 10.0, 100: 100.0}
# A tail: 1, 2, 3, 4, 100 ms. h = 4q/100. p50: h=2 -> 3; p90: h=3.6 -> 4 + 0.6*96 = 61.6;
# p95: h=3.8 -> 4 + 0.8*96 = 80.8; p99: h=3.96 -> 4 + 0.96*96 = 96.16.
TAIL = [100, 3, 1, 4, 2]  # unsorted on purpose
TAIL_ANSWERS = {50: 3.0, 90: 61.6, 95: 80.8, 99: 96.16}


@pytest.mark.parametrize("values, answers", [(EVEN, EVEN_ANSWERS), (TAIL, TAIL_ANSWERS)])
def test_percentiles_match_hand_computed_values(values, answers):
    shuffled = random.Random(0).sample(values, len(values))
    for q, expected in answers.items():
        assert percentile(shuffled, q) == pytest.approx(expected, abs=1e-12), q


def test_percentile_is_numpys_default_method():
    xs = np.random.default_rng(1).lognormal(size=37).tolist()
    for q in (0, 1, 33.3, 50, 90, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)


def test_percentile_edges():
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_stats_of_a_latency_sequence():
    s = Stats.of([t / 1000 for t in TAIL])
    assert s is not None and s.n == 5
    assert (s.min, s.max, s.mean) == pytest.approx((0.001, 0.1, 0.022))
    assert (s.p50, s.p90, s.p95, s.p99) == pytest.approx((0.003, 0.0616, 0.0808, 0.09616))
    assert Stats.of([]) is None


def test_tpot_is_the_gap_after_the_first_token():
    r = RequestRecord(slot=0, prompt_tokens=8, output_tokens=5, queue_s=0.0, prefill_s=0.1,
                      ttft_s=0.1, e2e_s=0.5)
    assert r.tpot_s == pytest.approx(0.1)  # 4 gaps in 0.4 s
    assert RequestRecord(0, 8, 1, 0.0, 0.1, 0.1, 0.1).tpot_s is None


def test_fmt_is_readable():
    assert [fmt(x) for x in (1234.4, 12.34, 1.234, 0.01234, 0.0, None)] == \
        ["1234", "12.3", "1.23", "0.0123", "0", "-"]


# --- config --------------------------------------------------------------------------------------
def test_config_validates_and_round_trips():
    c = BenchConfig(prompt_lens=[8, 16], concurrency=[1, 2], gen_len=4, runs=2)
    assert BenchConfig.from_json(json.loads(json.dumps(c.to_json()))) == c
    for bad in (dict(prompt_lens=()), dict(concurrency=(1, 1)), dict(gen_len=0), dict(runs=0),
                dict(warmup=-1), dict(prompt_lens=(0,))):
        with pytest.raises(ToolkitError):
            BenchConfig(**bad)
    with pytest.raises(ToolkitError, match="unknown bench settings"):
        BenchConfig.from_json({"prompt_len": [8]})
    with pytest.raises(ToolkitError, match="KV slots"):
        BenchConfig(concurrency=(1, 4)).check_fits(slots=2, max_seq=4096)
    with pytest.raises(ToolkitError, match="holds 64"):
        BenchConfig(prompt_lens=(60,), gen_len=8).check_fits(slots=4, max_seq=64)


# --- files that are not (readable) reports -------------------------------------------------
@pytest.mark.parametrize("content, message", [
    ("not json {", "it is not JSON"),
    ("[1, 2]", "is not a bench report"),
    ('{"schema_version": 1, "kind": "decoder"}', "is not a bench report"),
    ('{"schema": "edge-toolkit/bench-report", "schema_version": 2}', "schema_version 2"),
    ('{"schema": "edge-toolkit/bench-report", "schema_version": 1}', "damaged"),
])
def test_load_report_refuses_what_is_not_a_v1_report(tmp_path, content, message):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(ToolkitError, match=message) as e:
        load_report(path)
    if "schema_version 2" in message:
        assert "upgrade" in (e.value.hint or "")


def test_host_side_modules_need_no_device_stack():
    """The host reads reports without onnxruntime (and without importing device/)."""
    code = ("import sys, host.report, host.report_html, toolkit.commands.report, "
            "toolkit.commands.bench; bad = [m for m in sys.modules if m.split('.')[0] in "
            "('onnxruntime', 'device', 'torch', 'matplotlib')]; print(bad); assert not bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
