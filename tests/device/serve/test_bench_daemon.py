"""`toolkit bench --socket`: the benchmark runs inside a real daemon and the report comes home;
a daemon that dies mid-run gives the partial report, marked so."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from daemon_fixtures import daemons, llama_bundle, start_daemon  # noqa: F401, F811 (fixtures)

from toolkit.cli import main

ARGS = ["--prompt-lens", "8,16", "--gen-len", "6", "--concurrency", "1,2", "--runs", "2",
        "--warmup", "1", "--no-html"]


def test_bench_inside_the_daemon(llama_bundle: Path, daemons, tmp_path: Path) -> None:  # noqa: F811
    d = start_daemon(llama_bundle)
    daemons.append(d)
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["bench", "--socket", str(d.socket_path), *ARGS, "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert report["complete"] and report["stopped_because"] is None
    assert len(report["cells"]) == 4
    assert all(c["decode_tokens_per_s"] > 0 for c in report["cells"])
    assert report["environment"]["bundle"]["name"]
    # the daemon serves again afterwards
    reply = d.client().post("/v1/completions", {"prompt": "hello", "max_tokens": 2})
    assert reply["usage"]["completion_tokens"] == 2


def test_bench_against_a_daemon_that_dies_reports_the_partial_result(  # noqa: F811
        llama_bundle: Path, daemons, tmp_path: Path) -> None:  # noqa: F811
    d = start_daemon(llama_bundle, slow_step_s=0.05)
    daemons.append(d)
    out = tmp_path / "partial.json"

    # every backend step takes 50 ms: the bench below needs ~30 s; the daemon dies after 4 s,
    # a few rounds in
    killer = threading.Timer(4.0, d.proc.kill)
    killer.start()
    res = CliRunner().invoke(main, ["bench", "--socket", str(d.socket_path), *ARGS, "--runs", "6",
                                    "--gen-len", "20", "-o", str(out)])
    killer.join(5)
    assert res.exit_code == 1, res.output
    assert "stopped early" in res.output and "partial" in res.output
    report = json.loads(out.read_text())
    assert report["complete"] is False
    assert any(why in report["stopped_because"] for why in ("ended before the final report",
                                                          "stopped answering"))
    assert report["rounds"], "the rounds that finished before the daemon died are kept"


def test_bench_settings_the_daemon_refuses_are_one_clear_error(  # noqa: F811
        llama_bundle: Path, daemons) -> None:  # noqa: F811
    d = start_daemon(llama_bundle)
    daemons.append(d)
    res = CliRunner().invoke(main, ["bench", "--socket", str(d.socket_path), "--prompt-lens", "100"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    # the daemon's message and its hint read as lines, not as a quoted string with a literal \n
    assert "answered 400: bad bench settings: prompt 100 + 128" in res.output, res.output
    assert "\n  hint: use shorter --prompt-lens" in res.output and "\\n" not in res.output


def test_bench_threads_with_a_daemon_is_refused_not_ignored(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["bench", "--socket", str(tmp_path / "d.sock"), "--threads", "1"])
    assert res.exit_code == 1 and "a daemon benches with its own" in res.output, res.output


def test_ctrl_c_during_a_daemon_bench_keeps_the_rounds_measured(  # noqa: F811
        llama_bundle: Path, daemons) -> None:  # noqa: F811
    from bundle.benchreport import BenchConfig
    from host.bench import bench_remote
    from host.client import Endpoint

    d = start_daemon(llama_bundle)
    daemons.append(d)
    seen: list[str] = []

    def progress(event: dict[str, Any]) -> None:  # Ctrl-C once two rounds came home
        seen.append(event["event"])
        if seen.count("round") == 2:
            raise KeyboardInterrupt

    config = BenchConfig(prompt_lens=(8,), gen_len=4, concurrency=(1,), runs=5, warmup=0, power=False)
    try:
        report = bench_remote(Endpoint.unix(d.socket_path), config, progress=progress)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C lost the rounds the daemon had measured")
    assert report["complete"] is False and "Ctrl-C" in report["stopped_because"]
    assert len(report["rounds"]) == 2
