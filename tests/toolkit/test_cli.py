"""The CLI layer itself: a command run without its pip extra says which one in one line, the
reports still come out without matplotlib, the shared option groups, and `toolkit --help`
importing nothing heavy. A device install (no extras) is simulated in a subprocess by setting
sys.modules[name] = None for every package an extra brings: `import torch` then raises
ModuleNotFoundError exactly as it does where torch is not installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from paths import REPO

from bundle.benchreport import BenchConfig
from bundle.errors import ToolkitError
from toolkit import cli
from toolkit.cli import main
from toolkit.extras import EXTRAS, missing_extra

ROOT = REPO
CONVERT = sorted(p for p, extra in EXTRAS.items() if extra == "convert")
REPORT = sorted(p for p, extra in EXTRAS.items() if extra == "report")
BENCH = ["--prompt-lens", "8", "--gen-len", "4", "--concurrency", "1", "--runs", "1",
         "--warmup", "0", "--no-power"]


def toolkit_without(packages: list[str], *args: str, cwd: Path | None = None
                    ) -> subprocess.CompletedProcess[str]:
    """`toolkit ARGS` in a fresh interpreter where `packages` cannot be imported."""
    code = ("import sys\n"
            f"for name in {packages!r}:\n"
            "    sys.modules[name] = None\n"
            "from toolkit.cli import main\n"
            "main(prog_name='toolkit')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code, *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=600)


def one_line_error(run: subprocess.CompletedProcess[str]) -> str:
    """The run failed with exit 1 and said one line on stderr, no traceback; that line."""
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    return lines[0]


# --- a missing extra ---------------------------------------------------------------------------
def test_missing_extra_knows_which_extra_brings_a_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModuleNotFoundError) as e:
        import gguf  # noqa: F401
    assert missing_extra(e.value) == ("convert", "gguf")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert missing_extra(ModuleNotFoundError("x", name="matplotlib.pyplot")) == ("report", "matplotlib")
    # not an extra's package, or a package that is installed (a missing submodule is a bug)
    assert missing_extra(ModuleNotFoundError("x", name="no_such_package_here")) is None
    assert missing_extra(ModuleNotFoundError("x", name="click.no_such_submodule")) is None
    assert missing_extra(ImportError("x", name="gguf")) is None  # a broken install, not a missing one


@pytest.mark.parametrize("args", [
    ["convert", "smollm2-135m", "--target", "cpu"],
    ["quantize", "bundles/no-such-bundle", "-p", "int8"],
    # the plan reads a model's config through transformers' AutoConfig (models/, targets/plan.py)
    ["plan", "smollm2-135m", "--target", "jetson-orin-nano-8gb"],
])
def test_a_host_command_without_the_convert_extra_says_so_in_one_line(tmp_path: Path,
                                                                      args: list[str]) -> None:
    line = one_line_error(toolkit_without(CONVERT, *args, cwd=tmp_path))
    assert re.fullmatch(rf"error: toolkit {args[0]} needs the \[convert\] extra \((\w+) is not "
                        r"installed\): pip install 'edge-toolkit\[convert\]'", line), line
    assert line.split("(")[1].split()[0] in CONVERT
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_commands_that_need_no_extra_run_without_them(tmp_path: Path) -> None:
    run = toolkit_without(CONVERT + REPORT, "targets", "show", "jetson-orin-nano-8gb")
    assert run.returncode == 0 and "TensorRT" in run.stdout, run.stderr
    run = toolkit_without(CONVERT + REPORT, "status", "--socket", str(tmp_path / "none.sock"))
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: no daemon is listening")


def _group_with(*commands: click.Command) -> click.Group:
    group = cli.ToolkitGroup("toolkit")
    for c in commands:
        group.add_command(c)
    return group


def test_a_command_module_that_cannot_be_imported_names_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError as e:
        err = e
    group = _group_with(cli._missing("convert", err))
    res = CliRunner().invoke(group, ["--help"])
    assert "needs the [convert] extra" in res.output
    res = CliRunner().invoke(group, ["convert", "smollm2-135m", "--target", "cpu", "-o", "x"])
    assert res.exit_code == 1, res.output
    assert res.output.strip() == ("error: toolkit convert needs the [convert] extra (torch is not "
                                  "installed): pip install 'edge-toolkit[convert]'")
    # a module that fails for another reason says so, with the reinstall hint
    res = CliRunner().invoke(_group_with(cli._missing("serve", ImportError("broken"))), ["serve"])
    assert res.exit_code == 1 and "could not be loaded: broken" in res.output
    assert "hint: reinstall" in res.output


def test_a_missing_module_that_no_extra_brings_keeps_its_traceback() -> None:
    @click.command()
    def broken() -> None:
        import no_such_package_here  # noqa: F401

    res = CliRunner().invoke(_group_with(broken), ["broken"])
    assert isinstance(res.exception, ModuleNotFoundError)  # a bug: not turned into a user error


# --- reports without matplotlib ----------------------------------------------------------------
def test_bench_on_a_device_install_writes_the_json_and_table_and_names_the_report_extra(
        tiny_bundle, tmp_path: Path) -> None:
    bundle = tiny_bundle("llama")
    run = toolkit_without(CONVERT + REPORT, "bench", str(bundle), *BENCH, "--threads", "1",
                          "-o", "r.json", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert "TTFT p50 ms" in run.stdout and "wrote r.json" in run.stdout  # the table, the JSON
    assert "r.html (self-contained, without plots)" in run.stdout
    extra = [line for line in run.stderr.splitlines() if "edge-toolkit[report]" in line]
    assert extra == ["the plots need the [report] extra (matplotlib is not installed): "
                     "pip install 'edge-toolkit[report]'"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] and report["cells"][0]["prediction"]  # the host added the roofline
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "r.json"]  # no PNGs
    page = (tmp_path / "r.html").read_text()
    assert "No plots: matplotlib was not installed" in page and "<img" not in page

    # `report html` re-renders it the same way, and with matplotlib draws the plots
    run = toolkit_without(REPORT, "report", "html", "r.json", cwd=tmp_path)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert run.stdout.strip() == "wrote r.html (without plots)"
    assert "edge-toolkit[report]" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["report", "html", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and "PNG plots beside it" in res.output, res.output
    assert "<img" in (tmp_path / "r.html").read_text()


# --- option groups -----------------------------------------------------------------------------
def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        out[prefix + name] = command
        if isinstance(command, click.Group):
            out.update(_commands(command, f"{prefix}{name} "))
    return out


def _option(command: click.Command, flag: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and flag in p.opts), None)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_threads_below_one_is_a_usage_error(value: str) -> None:
    # -3 once reached ONNX Runtime's session options as it was (serve and bench then ran)
    commands = _commands(main)
    for name in ("quickstart", "convert", "quantize", "serve", "bench"):
        res = CliRunner().invoke(commands[name], ["--threads", value, "x"])
        assert res.exit_code == 2 and "not in the range x>=1" in res.output, (name, res.output)


def test_shared_options_have_one_spelling_type_and_default() -> None:
    commands = _commands(main)
    seen: dict[str, list[str]] = {}
    for flag, dest, default in [("--threads", "threads", None), ("--max-seq", "max_seq", None),
                                ("--batch", "batch", 1), ("--json", "as_json", False),
                                ("--target", "target", "cpu")]:
        for name, command in commands.items():
            opt = _option(command, flag)
            if opt is None:
                continue
            seen.setdefault(flag, []).append(name)
            assert (opt.name, opt.default) == (dest, default), (name, flag)
    assert set(seen["--threads"]) == {"quickstart", "convert", "quantize", "serve", "bench"}
    assert set(seen["--max-seq"]) == set(seen["--batch"]) == {"convert", "plan"}
    assert {_option(commands[c], "--max-seq").help for c in ("convert", "plan")} == {
        _option(commands["convert"], "--max-seq").help}
    assert set(seen["--json"]) == {"targets", "targets show", "plan", "status", "devices list",
                                   "devices ping", "deploy", "rollback"}
    # the daemon a command talks to: --socket PATH / --device NAME (serve's --socket is where it
    # listens); deploy and rollback take a registered device only
    for name in ("status", "generate", "bench"):
        assert _option(commands[name], "--socket") and _option(commands[name], "--device")
    for name in ("deploy", "rollback"):
        opt = _option(commands[name], "--device")
        assert opt is not None and opt.required and opt.name == "device_name"
        assert _option(commands[name], "--socket") is None
    devices = [_option(commands[n], "--device") for n in ("status", "generate", "deploy", "rollback")]
    assert {(o.metavar, o.help) for o in devices if o} == {
        ("NAME", "A device name from `toolkit devices list`.")}


def test_daemon_options_refuse_both_and_resolve_names(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOOLKIT_CONFIG_DIR", str(tmp_path))
    res = CliRunner().invoke(main, ["status", "--socket", "/x.sock", "--device", "a"])
    assert res.exit_code == 1 and "give --socket or --device, not both" in res.output
    res = CliRunner().invoke(main, ["generate", "--device", "nano", "hi"])
    assert res.exit_code == 1 and "device 'nano' is unknown" in res.output
    res = CliRunner().invoke(main, ["bench", str(tmp_path), "--socket", str(tmp_path / "d.sock")])
    assert res.exit_code == 1 and "not both" in res.output and "Traceback" not in res.output


def test_comma_lists_are_checked_before_any_work() -> None:
    res = CliRunner().invoke(main, ["quickstart", "--prompt-lens", "128,x"])
    assert res.exit_code == 2 and "comma-separated list of integers" in res.output


@pytest.mark.parametrize("flag", ["--temperature", "--top-p"])
def test_generate_refuses_a_sampling_number_that_is_not_finite(flag: str) -> None:
    # nan reached the daemon as JSON NaN, and its answer named neither the option nor the value
    res = CliRunner().invoke(main, ["generate", "--socket", "/nonexistent.sock", flag, "nan", "hi"])
    assert res.exit_code == 2 and f"Invalid value for '{flag}'" in res.output, res.output


@pytest.mark.parametrize("option", ["-o", "--bundle"])
def test_quickstart_checks_its_paths_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     option: str) -> None:
    import host.quickstart

    def converted(*_: object) -> Path:  # minutes of convert, deploy and bench would follow
        raise AssertionError("quickstart started converting")

    monkeypatch.setattr(host.quickstart, "_converted", converted)
    (tmp_path / "file").write_text("")
    res = CliRunner().invoke(main, ["quickstart", option, str(tmp_path / "file" / "r")])
    assert res.exit_code == 1 and "is a file, not a folder" in res.output, res.output
    assert option in res.output.split("hint:")[1]  # the hint names quickstart's own option


def test_quickstart_never_replaces_a_bundle_of_another_model(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import convert.pipeline

    def convert_model(*_: object, **__: object) -> None:  # with force=True: the bundle is replaced
        raise AssertionError("quickstart converted over the bundle")

    monkeypatch.setattr(convert.pipeline, "convert_model", convert_model)
    mine = shutil.copytree(ROOT / "tests" / "data" / "bundle-v1-llama-cpu", tmp_path / "mine")
    res = CliRunner().invoke(main, ["quickstart", "--bundle", str(mine), "-o", str(tmp_path / "r.json")])
    assert res.exit_code == 1 and "holds a bundle of hf-llama for cpu" in res.output, res.output
    assert (mine / "manifest.json").exists()


# --- the commands are thin -----------------------------------------------------------------------
def test_the_library_functions_behind_the_commands_are_callable() -> None:
    from host.bench import BenchRun, bench, progress_line
    from host.report_html import ReportFiles
    from targets import list_targets
    from targets.show import TARGETS_FOOTER, targets_table

    with pytest.raises(ToolkitError, match="give the BUNDLE"):
        bench(None, None, BenchConfig(), threads=None)
    assert progress_line({"event": "cell", "cell": 0, "cells": 2, "prompt_len": 8,
                          "concurrency": 1}) == "[1/2] prompt 8, concurrency 1"
    partial = BenchRun({"complete": False, "stopped_because": "Ctrl-C"},
                       ReportFiles(Path("r.json"), None, ()), "table")
    assert partial.exit_code == 130 and "stopped early: Ctrl-C" in partial.stopped
    assert partial.summary == "table\n\nwrote r.json"
    res = CliRunner().invoke(main, ["targets"])
    assert res.output == targets_table(list_targets()) + "\n\n" + TARGETS_FOOTER + "\n"


def test_commands_never_import_each_other() -> None:
    for path in sorted((ROOT / "toolkit" / "commands").glob("*.py")):
        assert "toolkit.commands" not in path.read_text(), path


def test_help_imports_nothing_heavy() -> None:
    code = ("import sys\nfrom toolkit.cli import main\n"
            "for args in [['--help'], *[[c, '--help'] for c in main.commands]]:\n"
            "    main(args, prog_name='toolkit', standalone_mode=False)\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', "
            "'onnx', 'onnxruntime', 'numpy', 'matplotlib', 'optimum', 'gguf', 'tensorrt', 'host', "
            "'convert', 'models'})\nprint(heavy, file=sys.stderr)\nassert not heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr
