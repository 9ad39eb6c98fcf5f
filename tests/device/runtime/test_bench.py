"""The on-device bench on a tiny bundle: the report, its files, partial runs, show and compare."""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from paths import REPO, TEST_DATA
from png_info import png_info

from bundle.benchreport import check_report, load_report, percentile, report_from_events, save_report
from bundle.errors import ToolkitError
from device.runtime.bench import BenchConfig, run_bench, run_round, synthetic_prompts
from device.runtime.runner import Runner, load_bundle
from host.report import CELL_HEADER, cell_row, render_table
from host.report_html import PNG_DATA_KEY
from toolkit.cli import main

DOCS = REPO / "docs"
SMALL = BenchConfig(prompt_lens=(8, 16), gen_len=8, concurrency=(1, 2), runs=2, warmup=1)
ARGS = ["--prompt-lens", "8,16", "--gen-len", "8", "--concurrency", "1,2", "--runs", "2"]


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> Path:
    return tiny_bundle("llama")


@pytest.fixture(scope="module")
def runner(bundle):
    r = load_bundle(bundle, slots=2, threads=1)
    yield r
    r.close()


@pytest.fixture(scope="module")
def bench(runner):
    """One small bench, run in-process, with every progress event kept."""
    events: list[dict] = []
    report = run_bench(runner, SMALL, progress=events.append, power_source=(None, "off in tests"))
    return report.to_json(), events


@pytest.fixture(scope="module")
def cli_run(bundle, tmp_path_factory):
    """`toolkit bench` through the CLI: the JSON, HTML and PNG files it writes."""
    out = tmp_path_factory.mktemp("bench") / "a.json"
    res = CliRunner().invoke(main, ["bench", str(bundle), *ARGS, "--threads", "1", "--no-power",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    return out, res


@pytest.fixture(scope="module")
def other_bundle(tiny_dir, tmp_path_factory) -> Path:
    """The same tiny model converted for cpu with another max_seq: a second real bundle."""
    from convert.pipeline import convert_model

    out = tmp_path_factory.mktemp("bundles") / "llama-cpu-96"
    convert_model(str(tiny_dir("llama")), "cpu", out, max_seq=96, batch=2)
    return out


def _schema() -> dict:
    return json.loads((DOCS / "bench-report.schema.json").read_text())


def _valid(report: dict) -> None:
    """check_report, and the JSON Schema where jsonschema is installed (it is not a toolkit
    dependency: test_report_is_complete_and_valid_against_the_schema skips visibly without it)."""
    check_report(report)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(report, _schema())


# --- the measurement -------------------------------------------------------------------------
def test_report_is_complete_and_valid_against_the_schema(bench):
    jsonschema = pytest.importorskip("jsonschema")
    report, _ = bench
    jsonschema.validate(json.loads(json.dumps(report)), _schema())
    check_report(report)
    assert report["complete"] is True and report["stopped_because"] is None
    assert [(c["prompt_len"], c["concurrency"]) for c in report["cells"]] == \
        [(8, 1), (8, 2), (16, 1), (16, 2)]


def test_every_schema_field_is_documented():
    schema = _schema()
    doc = (DOCS / "bench-report-schema.md").read_text()
    names: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            names.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    assert not sorted(n for n in names if f"`{n}`" not in doc and n not in doc)


def test_requests_are_exact_and_timings_consistent(bench):
    report, _ = bench
    assert len(report["rounds"]) == 8  # 4 cells x 2 runs
    for rnd in report["rounds"]:
        c = rnd["concurrency"]
        assert len(rnd["requests"]) == c and rnd["decode_steps"] == 7
        assert rnd["decode_tokens"] == 7 * c
        ttfts = [r["ttft_s"] for r in rnd["requests"]]
        assert ttfts == sorted(ttfts)  # prefilled in slot order: each waits for the earlier ones
        for r in rnd["requests"]:
            assert r["prompt_tokens"] == rnd["prompt_len"] and r["output_tokens"] == 8
            assert r["ttft_s"] == pytest.approx(r["queue_s"] + r["prefill_s"])
            assert r["e2e_s"] == pytest.approx(rnd["wall_s"])  # all finish at the last step
            assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / 7)
    for cell in report["cells"]:
        assert cell["runs"] == 2 and cell["requests"] == 2 * cell["concurrency"]


def test_cell_statistics_are_computed_from_the_rounds(bench):
    report, _ = bench
    for cell in report["cells"]:
        rounds = [r for r in report["rounds"] if r["prompt_len"] == cell["prompt_len"]
                  and r["concurrency"] == cell["concurrency"]]
        reqs = [q for r in rounds for q in r["requests"]]
        for key in ("ttft_s", "tpot_s", "e2e_s", "prefill_s"):
            for q in (50, 90, 95, 99):
                assert cell[key][f"p{q}"] == pytest.approx(percentile([x[key] for x in reqs], q))
        decode = sum(r["decode_tokens"] for r in rounds) / sum(r["decode_s"] for r in rounds)
        assert cell["decode_tokens_per_s"] == pytest.approx(decode)
        assert cell["requests_per_s"] == pytest.approx(len(reqs) / sum(r["wall_s"] for r in rounds))
        prompt = sum(x["prompt_tokens"] for x in reqs) / sum(x["prefill_s"] for x in reqs)
        assert cell["prefill_tokens_per_s"] == pytest.approx(prompt)


def test_prediction_is_the_plans_roofline(bench):
    from host.report import with_predictions
    from models.dims import ModelDims
    from targets import load_target
    from targets.plan import speed

    measured, _ = bench
    assert all(c["prediction"] is None for c in measured["cells"])  # the device predicts nothing
    report = with_predictions(measured)  # the host adds the roofline of the bundle's target
    assert report["prediction_note"].startswith("roofline")
    b = report["environment"]["bundle"]
    for cell in report["cells"]:
        want = speed(ModelDims(**b["dims"]), load_target("cpu"), "fp32", 64, cell["concurrency"], None)
        pred = cell["prediction"]
        assert pred["decode_tokens_per_s"] == pytest.approx(want.decode_tokens_s * cell["concurrency"])
        assert pred["tpot_s"] == pytest.approx(1 / want.decode_tokens_s)
        assert pred["decode_ratio"] == pytest.approx(cell["decode_tokens_per_s"] /
                                                     pred["decode_tokens_per_s"])
        assert 0 < pred["prefill_s"] and pred["prefill_ratio"] > 0


def test_environment_and_memory(bench, bundle):
    report, _ = bench
    env = report["environment"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert env["bundle"]["source_sha256"] == manifest["source"]["sha256"]
    assert (env["bundle"]["precision"], env["bundle"]["max_seq"]) == ("fp32", 64)
    assert env["backend"]["backend"] == "onnxruntime" and env["threads"] == 1
    assert env["versions"]["onnxruntime"] and env["cpu"]["model"]
    mem = report["memory"]
    assert mem["kv_cache_bytes"] == 2 * 2 * 2 * 64 * 16 * 4 * 2  # K+V, layers, heads, seq, dim, fp32, slots
    assert mem["rss_peak_bytes"] >= mem["rss_start_bytes"] > 0
    assert mem["gpu"] is None and mem["gpu_reason"]
    assert report["power"] == {**report["power"], "source": None, "reason": "off in tests"}


def test_progress_events_cover_the_run(bench):
    report, events = bench
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "report"
    assert kinds.count("cell") == 4 and kinds.count("warmup") == 4 and kinds.count("round") == 8
    assert events[-1]["report"] == report
    json.dumps(events)  # every event is JSON-ready, for the daemon's stream


def test_prompts_are_deterministic_and_exact():
    a = synthetic_prompts(110, 16, 2, seed=0, round_index=1, first_id=4)
    assert a == synthetic_prompts(110, 16, 2, seed=0, round_index=1, first_id=4)
    assert a != synthetic_prompts(110, 16, 2, seed=0, round_index=2, first_id=4)
    assert all(len(p) == 16 and min(p) >= 4 and max(p) < 110 for p in a)


def test_config_that_does_not_fit_is_refused_before_running(runner):
    with pytest.raises(ToolkitError, match="KV slots"):
        run_bench(runner, BenchConfig(prompt_lens=(8,), gen_len=4, concurrency=(3,), runs=1))
    with pytest.raises(ToolkitError, match="holds 64"):
        run_bench(runner, BenchConfig(prompt_lens=(60,), gen_len=8, concurrency=(1,), runs=1))


# --- partial runs ------------------------------------------------------------------------------
class FailingBackend:
    """The real backend, until the Nth step: then `error` is raised (a runtime failure)."""

    def __init__(self, inner, after: int, error: BaseException) -> None:
        self.inner, self.after, self.error, self.steps = inner, after, error, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def step(self, *args, **kwargs):
        self.steps += 1
        if self.steps > self.after:
            raise self.error
        return self.inner.step(*args, **kwargs)


def _failing(runner, after: int, error: BaseException) -> Runner:
    return Runner(runner.path, runner.manifest, FailingBackend(runner.backend, after, error),
                  runner.tokenizer)


# Steps: cell (8, 1): warm-up 1 prefill + 3 decode, 2 rounds x (1 + 7) -> 20; cell (8, 2): warm-up
# 2 + 3 -> 25, round 1: 2 + 7 -> 34, round 2: steps 35..43. Failing after 38 stops round 2.
FAIL_AFTER = 38


def test_an_exception_mid_run_returns_the_partial_report(runner, tmp_path):
    report = run_bench(_failing(runner, FAIL_AFTER, RuntimeError("injected failure")), SMALL,
                       power_source=(None, "off")).to_json()
    assert report["complete"] is False
    assert report["stopped_because"] == "RuntimeError: injected failure"
    assert "Traceback" in report["error"] and "injected failure" in report["error"]
    assert [(r["prompt_len"], r["concurrency"]) for r in report["rounds"]] == [(8, 1), (8, 1), (8, 2)]
    (first, second) = report["cells"]
    assert first["complete"] is True and second["complete"] is False and second["runs"] == 1
    _valid(json.loads(json.dumps(report)))
    path = save_report(report, tmp_path / "partial.json")
    shown = CliRunner().invoke(main, ["report", "show", str(path)])
    assert shown.exit_code == 0
    assert "PARTIAL REPORT: stopped because RuntimeError: injected failure" in shown.output
    assert "2 (partial)" in shown.output


def test_ctrl_c_and_stop_requests_return_partial_reports(runner):
    report = run_bench(_failing(runner, 5, KeyboardInterrupt()), SMALL, power_source=(None, "off"))
    assert not report.complete and report.stopped_because == "interrupted (Ctrl-C)"
    assert report.error is None and report.rounds == []

    stop = threading.Event()

    def progress(event):
        if event["event"] == "round":
            stop.set()  # the daemon's client went away after the first round

    report = run_bench(runner, SMALL, progress=progress, stop=stop, power_source=(None, "off"))
    assert not report.complete and report.stopped_because == "asked to stop"
    assert len(report.rounds) == 1


def test_a_dead_progress_stream_stops_the_run_and_says_so(runner):
    seen = []

    def progress(event):
        seen.append(event["event"])
        if event["event"] == "round":
            raise BrokenPipeError("client gone")

    report = run_bench(runner, SMALL, progress=progress, power_source=(None, "off"))
    assert not report.complete
    assert report.stopped_because == "the progress consumer failed: BrokenPipeError: client gone"
    assert seen[-1] == "round"  # nothing more was sent to the dead consumer
    assert len(report.rounds) == 1


def test_host_rebuilds_a_partial_report_when_the_stream_dies(bench):
    report, events = bench
    cut = [i for i, e in enumerate(events) if e["event"] == "round"][2]  # 3 rounds arrived
    partial = report_from_events(events[:cut + 1])
    assert partial["complete"] is False
    assert partial["stopped_because"] == "the progress stream ended before the final report"
    assert len(partial["rounds"]) == 3 and len(partial["cells"]) == 2
    assert partial["cells"][0] == report["cells"][0]  # a finished cell: the same numbers
    assert partial["cells"][1]["complete"] is False
    _valid(partial)
    assert report_from_events(events) == report  # the final event wins when it came
    with pytest.raises(ToolkitError, match="before it started"):
        report_from_events([])


def test_gpu_memory_from_a_backend_that_reports_it(runner):
    """A TensorRT-like backend: memory() gives cuda.mem_get_info()'s view; the bench samples it
    at the start, after every round and at the end."""
    calls = []

    class WithMemory(FailingBackend):
        def memory(self):
            calls.append(1)
            free = 8 << 30 if len(calls) < 3 else (8 << 30) - (64 << 20)  # 64 MiB taken later
            return {"gpu_free_bytes": free, "gpu_total_bytes": 16 << 30}

    r = Runner(runner.path, runner.manifest, WithMemory(runner.backend, 10**9, RuntimeError()),
               runner.tokenizer)
    report = run_bench(r, SMALL, power_source=(None, "off")).to_json()
    assert len(calls) == 1 + 8 + 1  # start, 8 rounds, end
    assert report["memory"]["gpu"] == {"free_start_bytes": 8 << 30,
                                       "free_min_bytes": (8 << 30) - (64 << 20),
                                       "total_bytes": 16 << 30, "used_delta_bytes": 64 << 20}
    assert report["memory"]["gpu_reason"] is None
    assert "GPU used +64.0 MiB" in render_table(report)


def test_power_from_a_tegrastats_process_gives_energy_per_token(runner, tmp_path):
    """A stand-in `tegrastats` prints the real AGX Orin JetPack 7 line (13.907 W in all) every
    10 ms: the energy of each cell is 13.907 W x its decode time, whatever the sample timing."""
    from device.runtime.tegrastats import TegrastatsSampler

    line = (TEST_DATA / "tegrastats/agx-orin-jetpack7.txt").read_text().strip()
    exe = tmp_path / "tegrastats"
    exe.write_text(f"#!/bin/sh\nwhile true; do echo '{line}'; sleep 0.01; done\n")
    exe.chmod(0o755)
    report = run_bench(runner, SMALL, power_source=(TegrastatsSampler(str(exe)), "")).to_json()
    _valid(report)
    power = report["power"]
    assert (power["source"], power["total_rail"], power["reason"]) == \
        ("tegrastats", "sum of rails", None)
    assert power["samples"] >= 1 and power["avg_power_w"] == pytest.approx(13.907)
    assert power["tegrastats"]["ram_total_mb"] == 62817
    for cell in report["cells"]:
        rounds = [r for r in report["rounds"] if r["prompt_len"] == cell["prompt_len"]
                  and r["concurrency"] == cell["concurrency"]]
        seconds = sum(r["decode_s"] for r in rounds)
        tokens = sum(r["decode_tokens"] for r in rounds)
        assert cell["energy"]["decode_tokens"] == tokens
        assert cell["energy"]["energy_per_token_j"] == pytest.approx(13.907 * seconds / tokens)
    assert power["energy_per_token_j"] == pytest.approx(
        13.907 * sum(r["decode_s"] for r in report["rounds"])
        / sum(r["decode_tokens"] for r in report["rounds"]))


# --- the CLI and the files ---------------------------------------------------------------------


def test_cli_bench_writes_json_html_and_pngs_that_agree(cli_run):
    out, res = cli_run
    report = load_report(out)
    _valid(report)
    assert "[4/4] prompt 16, concurrency 2" in res.output  # progress streamed
    assert f"wrote {out}" in res.output and "a.html" in res.output
    pngs = {p.name: p.read_bytes() for p in out.parent.glob("a-*.png")}
    assert set(pngs) == {"a-latency-p8.png", "a-latency-p16.png", "a-throughput.png"}
    for name, data in pngs.items():
        width, height, text = png_info(data)
        assert (width, height) == (1000, 400), name
        plotted = json.loads(text[PNG_DATA_KEY])
        if name == "a-throughput.png":
            for cell in report["cells"]:
                p, c = str(cell["prompt_len"]), str(cell["concurrency"])
                assert plotted["decode_tokens_per_s"][p][c] == cell["decode_tokens_per_s"]
                assert plotted["requests_per_s"][p][c] == cell["requests_per_s"]
                assert plotted["roofline_decode_tokens_per_s"][p][c] == \
                    cell["prediction"]["decode_tokens_per_s"]
        else:
            p = int(name.removeprefix("a-latency-p").removesuffix(".png"))
            for c in (1, 2):
                reqs = [q for r in report["rounds"] if r["prompt_len"] == p
                        and r["concurrency"] == c for q in r["requests"]]
                assert plotted["e2e_ms"][str(c)] == sorted(q["e2e_s"] * 1e3 for q in reqs)
                assert plotted["tpot_ms"][str(c)] == sorted(q["tpot_s"] * 1e3 for q in reqs)
    page = out.with_suffix(".html").read_text()
    for cell in report["cells"]:  # every table value, formatted from the JSON
        row = "".join(f"<td>{v}</td>" for v in cell_row(cell))
        assert f"<tr>{row}</tr>" in page
    assert "".join(f"<th>{h}</th>" for h in CELL_HEADER) in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(pngs.values())
    data = re.search(r'<script type="application/json" id="bench-report">(.*)</script>', page, re.S)
    assert data and json.loads(data.group(1).replace("<\\/", "</")) == report


def test_report_show_prints_the_table(cli_run):
    out, bench_res = cli_run
    res = CliRunner().invoke(main, ["report", "show", str(out)])
    assert res.exit_code == 0
    report = load_report(out)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in res.output.splitlines()
            if line.startswith("| ")]
    assert rows[0] == list(CELL_HEADER)
    assert rows[2:] == [cell_row(cell) for cell in report["cells"]]
    assert "TTFT p50 ms" in res.output and "peak RSS" in res.output
    assert "power: not measured: power sampling was turned off" in res.output
    assert res.output.strip() in bench_res.output  # the bench printed the same table


def _scaled(report: dict, factor: float) -> dict:
    """The same report with every time x factor (every rate / factor)."""
    out = copy.deepcopy(report)
    for cell in out["cells"]:
        for key in ("ttft_s", "tpot_s", "e2e_s", "prefill_s"):
            cell[key] = {k: (v if k == "n" else v * factor) for k, v in cell[key].items()}
        for key in ("requests_per_s", "output_tokens_per_s", "prefill_tokens_per_s",
                    "decode_tokens_per_s"):
            cell[key] /= factor
    out["environment"]["bundle"]["precision"] = "int8"
    return out


def test_report_compare_gives_ratios(cli_run, tmp_path):
    out, _ = cli_run
    slower = save_report(_scaled(load_report(out), 2.0), tmp_path / "b.json")
    res = CliRunner().invoke(main, ["report", "compare", str(out), str(slower)])
    assert res.exit_code == 0, res.output
    assert "A: " in res.output and "B: " in res.output and "int8" in res.output
    rows = [line for line in res.output.splitlines() if line.startswith("| 8 ")]
    ttft = next(r for r in rows if "TTFT p50 ms" in r)
    assert ttft.split("|")[-2].strip() == "2.00"  # B/A
    decode = next(r for r in rows if "decode tok/s" in r)
    assert decode.split("|")[-2].strip() == "0.500"
    header = next(line for line in res.output.splitlines() if line.startswith("| prompt"))
    assert [c.strip() for c in header.split("|")[1:-1]] == ["prompt", "conc", "metric", "A", "B",
                                                            "B/A"]


def test_report_compare_two_bundles(cli_run, other_bundle, tmp_path):
    out, _ = cli_run
    second = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(other_bundle), *ARGS, "--threads", "1",
                                    "--no-power", "--no-html", "-o", str(second)])
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob("*.png")) and not second.with_suffix(".html").exists()
    res = CliRunner().invoke(main, ["report", "compare", str(out), str(second)])
    assert res.exit_code == 0, res.output
    assert "max_seq 64" in res.output and "max_seq 96" in res.output
    assert res.output.count("TTFT p50 ms") == 4 and "KV cache MiB" in res.output
    kv = next(line for line in res.output.splitlines() if "KV cache MiB" in line)
    assert kv.split("|")[-2].strip() == "1.50"  # 96 / 64 positions, 2 slots each


def test_report_commands_refuse_non_reports(cli_run, bundle, tmp_path):
    out, _ = cli_run
    res = CliRunner().invoke(main, ["report", "compare", str(out), str(bundle / "manifest.json")])
    assert res.exit_code == 1 and "is not a bench report" in res.output
    assert "Traceback" not in res.output
    newer = load_report(out) | {"schema_version": 2}
    (tmp_path / "new.json").write_text(json.dumps(newer))
    res = CliRunner().invoke(main, ["report", "show", str(tmp_path / "new.json")])
    assert res.exit_code == 1 and "schema_version 2" in res.output and "upgrade" in res.output
    res = CliRunner().invoke(main, ["report", "compare", str(out)])
    assert res.exit_code == 1 and "at least two" in res.output
    res = CliRunner().invoke(main, ["report", "show", str(tmp_path / "missing.json")])
    assert res.exit_code == 1 and "cannot read" in res.output


def test_report_html_rerenders_a_report(cli_run, tmp_path):
    out, _ = cli_run
    copy_ = tmp_path / "pulled.json"
    copy_.write_text(out.read_text())
    res = CliRunner().invoke(main, ["report", "html", str(copy_)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "pulled.html").is_file() and (tmp_path / "pulled-throughput.png").is_file()


def test_cli_bench_writes_the_partial_report_and_fails(bundle, tmp_path, monkeypatch):
    import device.runtime.runner

    real = device.runtime.runner.load_bundle

    def failing_load(*args, **kwargs):
        r = real(*args, **kwargs)
        return _failing(r, FAIL_AFTER, RuntimeError("injected failure"))

    monkeypatch.setattr(device.runtime.runner, "load_bundle", failing_load)
    out = tmp_path / "p.json"
    res = CliRunner().invoke(main, ["bench", str(bundle), *ARGS, "--threads", "1", "--no-power",
                                    "-o", str(out)])
    assert res.exit_code == 1
    assert "the bench stopped early: RuntimeError: injected failure" in res.output
    assert "PARTIAL REPORT" in res.output
    report = load_report(out)
    assert report["complete"] is False and len(report["rounds"]) == 3
    assert out.with_suffix(".html").is_file()
    assert "Partial report" in out.with_suffix(".html").read_text()


def test_cli_bench_usage_errors(bundle):
    res = CliRunner().invoke(main, ["bench", str(bundle), "--prompt-lens", "a,b"])
    assert res.exit_code == 2 and "comma-separated" in res.output
    res = CliRunner().invoke(main, ["bench"])
    assert res.exit_code == 1 and "give the BUNDLE" in res.output
    res = CliRunner().invoke(main, ["bench", str(bundle), "--concurrency", "1,1"])
    assert res.exit_code == 1 and "distinct positive integers" in res.output
    res = CliRunner().invoke(main, ["bench", str(bundle), "--prompt-lens", "60", "--no-power"])
    assert res.exit_code == 1 and "holds 64" in res.output and "Traceback" not in res.output


def test_run_round_matches_greedy_generate(runner):
    """The bench's batched loop makes the tokens device.runtime.generate makes for each request alone."""
    from device.runtime.generate import generate

    prompts = synthetic_prompts(runner.backend.vocab_size, 8, 2, seed=3, first_id=4)
    alone = [list(generate(runner.backend, p, 6)) for p in prompts]
    seen = []

    class Recording:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def step(self, ids, pos, slots, logits_index=None):
            if ids.shape[1] == 1:
                seen.append(ids[:, 0].tolist())
            return self.inner.step(ids, pos, slots, logits_index)

    rnd = run_round(Recording(runner.backend), prompts, 6, clock=lambda: 0.0)
    assert rnd.decode_steps == 5
    # inputs of the decode steps are the tokens generated so far, row by row
    assert [[row[i] for row in seen] for i in range(2)] == [a[:5] for a in alone]


def test_report_compare_plot_draws_every_report_of_a_fleet(cli_run, tmp_path):
    """`toolkit report compare --names ... --plot`: one bar per board and cell, the numbers the
    PNG carries equal to the reports' (a board that lacks a cell has no bar there)."""
    out, _ = cli_run
    report = load_report(out)
    second = copy.deepcopy(report)
    for cell in second["cells"]:
        cell["decode_tokens_per_s"] *= 2
    second["cells"] = second["cells"][1:]  # this board lacks the first cell
    files = [tmp_path / "orin-01.json", tmp_path / "thor-01.json"]
    save_report(report, files[0])
    save_report(second, files[1])
    png = tmp_path / "fleet.png"
    res = CliRunner().invoke(main, ["report", "compare", "--names", *map(str, files), "--plot", str(png)])
    assert res.exit_code == 0, res.output
    assert f"wrote {png}" in res.output and "| orin-01 | thor-01 | thor-01/orin-01 |" in res.output
    width, height, text = png_info(png.read_bytes())
    assert (width, height) == (1000, 400)
    plotted = json.loads(text[PNG_DATA_KEY])
    cells = report["cells"]
    assert plotted["cells"] == [f"p{c['prompt_len']} c{c['concurrency']}" for c in cells]
    assert plotted["decode_tokens_per_s"]["orin-01"] == [c["decode_tokens_per_s"] for c in cells]
    doubled = [2 * c["decode_tokens_per_s"] for c in cells[1:]]
    assert plotted["decode_tokens_per_s"]["thor-01"] == [None, *doubled]
    assert plotted["ttft_p50_ms"]["orin-01"][0] == pytest.approx(cells[0]["ttft_s"]["p50"] * 1e3)


def test_the_bench_measures_plain_steps_whatever_the_engine_left_set(runner) -> None:
    """A daemon's one-slot engine leaves backend.spare_token as its last step had it; the
    bench's report is of plain one-token steps either way."""
    seen: list[bool] = []
    inner = runner.backend.step

    def step(*args, **kwargs):
        seen.append(bool(runner.backend.spare_token))
        return inner(*args, **kwargs)

    runner.backend.spare_token = True
    runner.backend.step = step
    try:
        run_bench(runner, BenchConfig(prompt_lens=(8,), gen_len=4, concurrency=(1,), runs=1),
                  power_source=(None, "off in tests"))
    finally:
        del runner.backend.step
    assert seen and not any(seen)
