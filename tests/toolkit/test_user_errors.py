"""Bad input through the `toolkit` commands (found by an audit of the CLI): each case used to end
in a traceback or a silent success; now it is one line with a hint and a non-zero exit.
(The daemon's HTTP layer: tests/device/serve/test_httpd_bad_input.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bundle.errors import ToolkitError
from toolkit.cli import main


def run(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert not isinstance(result.exception, (AssertionError, AttributeError, TypeError, ValueError,
                                             OSError)), result.output
    return result


# --- toolkit check on a damaged bundle ---------------------------------------------------------

@pytest.mark.parametrize("damage", ["missing", "truncated", "one byte"])
def test_check_names_a_missing_or_corrupt_model_file(tiny_bundle: Any, tmp_path: Path, damage: str) -> None:
    """The files are verified before the graph is read, as compile and deploy do: a flipped
    byte that still parses must not pass `check` while they refuse the bundle."""
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle(), bundle)
    model = bundle / "model.onnx"
    data = model.read_bytes()
    if damage == "missing":
        model.unlink()
    elif damage == "truncated":
        model.write_bytes(data[:1000])
    else:  # the last byte of the last initializer: the graph still loads
        model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = run("check", str(bundle))
    assert result.exit_code == 1
    assert "failed verification" in result.output and "model.onnx" in result.output, result.output
    assert "hint:" in result.output


@pytest.mark.parametrize("command", [["check"], ["quantize", "-p", "int8"], ["compile"]])
def test_a_bundle_path_that_does_not_exist_says_so(tmp_path: Path, command: list[str]) -> None:
    result = run(*command[:1], str(tmp_path / "nope"), *command[1:])
    assert result.exit_code == 1 and "does not exist" in result.output, result.output


@pytest.mark.parametrize("model", ["", "  "])
def test_an_empty_model_argument_is_named_as_empty(tmp_path: Path, model: str) -> None:
    result = run("convert", model, "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "MODEL is empty" in result.output, result.output
    assert not (tmp_path / "out").exists()


# --- model folders: config.json and tokenizer ----------------------------------------------------

def hf_folder(tmp_path: Path, tiny_dir: Any, **config: Any) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(tiny_dir("llama"), folder)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def test_a_config_json_that_is_not_an_object_is_refused(tmp_path: Path, tiny_dir: Any) -> None:
    from models.sources import resolve

    folder = hf_folder(tmp_path, tiny_dir)
    (folder / "config.json").write_text("[1]")
    with pytest.raises(ToolkitError, match="is not a JSON object"):
        resolve(str(folder))


@pytest.mark.parametrize("field,value", [("hidden_size", "x"), ("num_hidden_layers", -1),
                                         ("num_attention_heads", 0), ("vocab_size", 64.5),
                                         ("rms_norm_eps", "abc")])
def test_config_dimensions_that_are_not_counts_are_refused(tmp_path: Path, tiny_dir: Any, field: str,
                                                           value: Any) -> None:
    folder = hf_folder(tmp_path, tiny_dir, **{field: value})
    result = run("plan", str(folder))
    assert result.exit_code == 1, result.output  # plan used to print a negative tokens/s
    assert f"{field} is {value!r}" in result.output and "hint:" in result.output


def test_a_model_folder_without_tokenizer_files_is_one_line(tmp_path: Path, tiny_dir: Any) -> None:
    from models.sources import resolve

    folder = hf_folder(tmp_path, tiny_dir)
    for p in folder.glob("tokenizer*"):
        p.unlink()
    with pytest.raises(ToolkitError, match="cannot load a tokenizer"):
        resolve(str(folder)).load_tokenizer()


# --- output paths ----------------------------------------------------------------------------------

def test_an_output_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    from bundle.staging import check_output

    (tmp_path / "f").write_text("x")
    with pytest.raises(ToolkitError, match="is a file, not a folder"):
        check_output(tmp_path / "f" / "a" / "bundle", force=False)
    check_output(tmp_path / "new" / "bundle", force=False)  # a folder still to be made is fine


def test_service_unit_output_under_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    result = run("service", "unit", "-o", str(tmp_path / "f" / "toolkit.service"))
    assert result.exit_code == 1 and "cannot write" in result.output


# --- bench reports -------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("cells", "x"), ("cells", [1]), ("config", None),
                                       ("environment", []), ("rounds", {}), ("power", 5)])
def test_a_report_with_wrong_types_is_damaged_not_a_traceback(key: str, value: Any) -> None:
    from bundle.benchreport import REQUIRED_KEYS, SCHEMA, SCHEMA_VERSION, check_report

    report: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION,
                              **{k: None for k in REQUIRED_KEYS},
                              "config": {}, "environment": {}, "cells": [], "rounds": []}
    check_report(report)
    with pytest.raises(ToolkitError, match=f"damaged bench report: {key}"):
        check_report({**report, key: value})


# --- daemon and unit settings --------------------------------------------------------------------

@pytest.mark.parametrize("args,error", [(["--tcp", "nope"], "is not HOST:PORT"),
                                        (["--tcp", "0.0.0.0:99999"], "port 99999 is out of range"),
                                        (["--drain-timeout", "nan"], "--drain-timeout must be"),
                                        (["--drain-timeout", "-1"], "--drain-timeout must be"),
                                        (["--drain-timeout", "inf"], "--drain-timeout must be")])
def test_service_unit_refuses_what_the_daemon_would_refuse(args: list[str], error: str) -> None:
    result = run("service", "unit", *args)
    assert result.exit_code == 1 and error in result.output


def test_serve_refuses_a_token_file_that_would_guard_nothing(tmp_path: Path) -> None:
    """Without --tcp or --serial it was silently ignored: the Unix socket takes no token."""
    result = run("serve", str(tmp_path), "--socket", str(tmp_path / "d.sock"),
                 "--token-file", str(tmp_path / "token"))
    assert result.exit_code == 1 and "--token-file guards the --tcp and --serial" in result.output
    assert not (tmp_path / "d.sock").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_serve_refuses_a_drain_timeout_that_is_not_a_number_of_seconds(value: float) -> None:
    from device.serve.config import ServeConfig

    with pytest.raises(ToolkitError, match="--drain-timeout"):
        ServeConfig(bundle=Path("b"), drain_timeout=value)


# --- toolkit quantize: the gate's limits and the calibration file ------------------------------

@pytest.mark.parametrize("option,value", [("--min-top1", "5"), ("--min-top1", "-0.1"),
                                          ("--min-greedy", "nan"), ("--min-cosine", "nan"),
                                          ("--min-cosine", "1.5"), ("--max-ppl-increase", "-5"),
                                          ("--max-ppl-increase", "nan"), ("--max-ppl-increase", "inf")])
def test_quantize_refuses_gate_limits_out_of_range_before_any_work(tiny_bundle: Any, tmp_path: Path,
                                                                  option: str, value: str) -> None:
    out = tmp_path / "q"
    result = run("quantize", str(tiny_bundle()), "-p", "int8", "-o", str(out), option, value)
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--min-top1", "1"), ("--min-greedy", "0"),
                                          ("--min-cosine", "0.995"), ("--max-ppl-increase", "0"),
                                          ("--max-ppl-increase", "1000")])
def test_quantize_takes_gate_limits_in_range(tmp_path: Path, option: str, value: str) -> None:
    result = run("quantize", str(tmp_path / "none"), "-p", "int8", option, value)
    assert result.exit_code == 1 and "does not exist" in result.output  # past the option


def test_the_gate_refuses_a_nan_limit() -> None:
    from quantize.gate import thresholds_for

    with pytest.raises(ToolkitError, match="min_top1 is NaN"):
        thresholds_for("int8", min_top1=float("nan"))
    assert thresholds_for("int8", min_top1=0.5).min_top1 == 0.5


def test_quantize_calibration_folder_says_it_is_a_folder(tiny_bundle: Any, tmp_path: Path) -> None:
    out = tmp_path / "q"
    result = run("quantize", str(tiny_bundle()), "-p", "int8", "-o", str(out), "--calibration",
                 str(tmp_path))
    assert result.exit_code == 1 and "is a folder" in result.output
    assert "a file of UTF-8 text" in result.output and "does not exist" not in result.output
    assert not out.exists()


# --- found by a sweep of every command's flags with bad values (2026-12-05) ---------------------

@pytest.mark.parametrize("content", [b"", b"\xff\xfe not utf-8"])
def test_a_bad_calibration_file_is_refused_before_the_export(tmp_path: Path, tiny_dir: Any, content: bytes,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to be read after the fp32 export and parity (a minute on SmolLM2)."""
    import convert.pipeline

    def export(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("exported before reading the calibration file")

    monkeypatch.setattr(convert.pipeline, "convert_model", export)
    calibration = tmp_path / "calibration.txt"
    calibration.write_bytes(content)
    result = run("convert", str(tiny_dir("llama")), "--precision", "int8", "--calibration", str(calibration),
                 "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "calibration file" in result.output and "hint:" in result.output
    assert not (tmp_path / "out").exists()


def test_threads_beyond_the_cores_are_refused_before_the_export(tmp_path: Path, tiny_dir: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import convert.pipeline

    def resolve(*args: Any) -> Any:
        raise AssertionError("read the model before checking --threads")

    monkeypatch.setattr(convert.pipeline, "resolve", resolve)
    result = run("convert", str(tiny_dir("llama")), "--threads", str((os.cpu_count() or 1) + 1),
                 "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and "--threads must be 1 to" in result.output


def test_bench_without_a_daemon_gives_its_hint_once(tmp_path: Path) -> None:
    result = run("bench", "--socket", str(tmp_path / "none.sock"))
    assert result.exit_code == 1 and "no daemon is listening" in result.output
    assert result.output.count("hint:") == 1, result.output


def test_deploy_retries_below_zero_are_refused(tiny_bundle: Any) -> None:
    result = run("deploy", str(tiny_bundle()), "--device", "nowhere", "--retries", "-1")
    assert result.exit_code == 2 and "--retries" in result.output


# --- found by a bad-input sweep of the host commands --------------------------------------------

@pytest.mark.parametrize("command", ["plan", "convert"])
def test_a_gguf_cut_off_after_its_header_is_one_line(tmp_path: Path, command: str) -> None:
    """The gguf reader raises IndexError on a file that ends inside its key/value table (most
    truncated downloads); that was a traceback."""
    import struct

    model = tmp_path / "cut.gguf"  # magic, version 3, 5 tensors, 3 keys, then half a key
    model.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 3) + struct.pack("<Q", 5) + b"gen")
    result = run(command, str(model), *(["-o", str(tmp_path / "out")] if command == "convert" else []))
    assert result.exit_code == 1 and "cannot read the model config" in result.output, result.output
    assert "hint:" in result.output and not (tmp_path / "out").exists()


def test_an_output_folder_that_cannot_be_made_is_one_line(tiny_bundle: Any) -> None:
    """/proc takes no new folders, even from root (where a chmod'ed folder would not stop us)."""
    result = run("quantize", str(tiny_bundle()), "-p", "int8", "-o", "/proc/toolkit-test-out")
    assert result.exit_code == 1 and "cannot write the bundle" in result.output, result.output
    assert "hint:" in result.output


def test_an_output_under_a_folder_we_may_not_write_is_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from bundle.staging import check_output

    # as root a chmod 555 folder is still writable; say it is not, as it is for a user
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ToolkitError, match="cannot write"):
        check_output(tmp_path / "new" / "bundle", force=False)


def test_an_interrupted_convert_leaves_no_folders_it_made(tmp_path: Path) -> None:
    """Ctrl-C during the export removed the staging folder but left the parents made for -o."""
    from bundle.staging import staged_bundle

    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "sub" / "out"
    with pytest.raises(KeyboardInterrupt), staged_bundle(out) as staging:
        (staging / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.rglob("*")] == ["kept"]


BENCH = ["--prompt-lens", "8", "--gen-len", "2", "--concurrency", "1", "--runs", "1", "--warmup", "0",
         "--no-power", "--threads", "1", "--no-html"]


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_bench_refuses_an_output_it_cannot_write_before_measuring(tiny_bundle: Any, tmp_path: Path,
                                                                  where: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """-o naming a folder was an IsADirectoryError traceback after the whole bench."""
    import host.bench

    def bench_local(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("measured before checking -o")

    monkeypatch.setattr(host.bench, "bench_local", bench_local)
    (tmp_path / "f").write_text("x")
    out = tmp_path if where == "folder" else tmp_path / "f" / "r.json"
    result = run("bench", str(tiny_bundle()), *BENCH, "-o", str(out))
    assert result.exit_code == 1 and "hint: choose another -o" in result.output, result.output
    assert (tmp_path / "f").read_text() == "x"


def test_bench_output_that_cannot_be_written_is_one_line(tiny_bundle: Any) -> None:
    result = run("bench", str(tiny_bundle()), *BENCH, "-o", "/proc/toolkit-test-r.json")
    assert result.exit_code == 1 and "cannot write" in result.output, result.output


def test_a_bad_concurrency_list_gets_a_hint_for_concurrency() -> None:
    result = run("bench", "b", "--concurrency", "0")  # the hint used to show --prompt-lens
    assert result.exit_code == 1 and "hint: e.g. --concurrency 1,4" in result.output, result.output


def test_report_outputs_that_cannot_be_written_are_one_line(tiny_bundle: Any, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert run("bench", str(tiny_bundle()), *BENCH, "-o", str(report)).exit_code == 0
    (tmp_path / "r.html").mkdir()  # where `report html` writes the page
    for args in (["html", str(report)],
                 ["compare", str(report), str(report), "-o", "/proc/toolkit-test.txt"],
                 ["compare", str(report), str(report), "--plot", "/proc/toolkit-test.png"]):
        result = run("report", *args)
        assert result.exit_code == 1 and "cannot write" in result.output, (args, result.output)
        assert "hint:" in result.output


# --- empty option values ---------------------------------------------------------------------

@pytest.mark.parametrize("args, error", [
    (["status", "--socket", ""], "--socket is empty"),
    (["generate", "--socket", "", "hi"], "--socket is empty"),
    (["bench", "--socket", ""], "--socket is empty"),
    (["status", "--device", ""], "--device is empty"),
    (["generate", "--device", " ", "hi"], "--device is empty"),
])
def test_an_empty_socket_or_device_is_named_as_empty(args: list[str], error: str) -> None:
    """--socket "" was the path ".": "no daemon is listening at unix://."; --device "" was taken
    as not given, so the command went to the default socket instead of the board meant."""
    result = run(*args)
    assert result.exit_code == 1 and f"error: {error}" in result.output, result.output
    assert "unix://." not in result.output


def test_serve_names_an_empty_token_file_as_empty(tmp_path: Path) -> None:
    """It was the path ".", read as a token file: "Is a directory"."""
    result = run("serve", str(tmp_path), "--tcp", "127.0.0.1:0", "--token-file", "")
    assert result.exit_code == 1 and "error: --token-file is empty" in result.output, result.output
