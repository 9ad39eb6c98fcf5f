"""Ctrl-C (SIGINT, KeyboardInterrupt) through the `toolkit` commands: one `interrupted` line on
stderr (with what was kept, where something was), no traceback, exit status 130 (128 + SIGINT);
click's default was "Aborted!" and 1. A convert or quantize interrupted while it writes leaves no
staging folder and an existing bundle it was replacing (--force) intact. `toolkit serve` is not
here: SIGINT there drains and stops the daemon (tests/device/serve)."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bundle.errors import Interrupted
from toolkit.cli import main


def interrupted(*args: str) -> str:
    """Run `toolkit ARGS`, which is interrupted: exit 130, no traceback, no "Aborted!"; stderr's
    last line, which says so."""
    result = CliRunner().invoke(main, list(args))
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "Aborted!" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted"), result.stderr
    return last


def ctrl_c(*args: Any, **kwargs: Any) -> Any:
    raise KeyboardInterrupt


@pytest.mark.parametrize("args, function", [
    (["generate", "--socket", "/nonexistent/toolkit.sock", "hello"], "host.daemon.generate"),
    (["plan", "smollm2-135m", "--target", "cpu"], "targets.plan.plan_from_model"),
    (["report", "show", "bench.json"], "bundle.benchreport.load_report"),
    (["bench", "--socket", "/nonexistent/toolkit.sock"], "host.bench.bench_remote"),
    (["rollback", "--device", "orin-01"], "host.deploy.rollback"),
    (["convert", "smollm2-135m", "--target", "cpu"], "convert.pipeline.convert_model"),
])
def test_an_interrupted_command_says_so_in_one_line_and_exits_130(args: list[str], function: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(function, ctrl_c)
    assert interrupted(*args) == "interrupted"


def test_an_interrupted_answer_ends_its_line_before_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout gets the partial answer and its newline (a redirected answer ends whole), stderr
    the `interrupted` line; the answer's line used to run on into the shell's prompt."""
    def answer(*args: Any, **kwargs: Any) -> Any:
        yield "The capital", None
        yield " of France", None
        raise KeyboardInterrupt

    monkeypatch.setattr("host.daemon.generate", answer)
    result = CliRunner().invoke(main, ["generate", "--socket", "/nonexistent/toolkit.sock", "hi"])
    assert result.exit_code == 130
    assert result.stdout == "The capital of France\n" and result.stderr.strip() == "interrupted"


# --- deploy: what the device keeps ------------------------------------------------------------

@pytest.mark.parametrize("got_to, kept", [
    ("verifying", "interrupted: no bundle file was sent to orin-01"),
    ("uploading", "interrupted: orin-01 keeps what it received (at least 4.0 of 10.0 MB); the same "
                  "`toolkit deploy` again resumes from there"),
    ("uploaded", "interrupted: orin-01 holds the whole bundle; the same `toolkit deploy` again "
                 "installs it without sending it again"),
    ("installing", "interrupted: orin-01 goes on with the install; `toolkit status --device orin-01` "
                   "shows what it serves"),
])
@pytest.mark.parametrize("as_json", [False, True])
def test_an_interrupted_deploy_says_what_the_device_keeps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          got_to: str, kept: str, as_json: bool) -> None:
    from host.transfer import InstallPhase

    def deploy(bundle: Path, name: str, progress: Any = None, on_phase: Any = None, **_: Any) -> Any:
        if got_to != "verifying":
            progress(0, 10_000_000)
            progress(4_000_000 if got_to == "uploading" else 10_000_000, 10_000_000)
        if got_to == "installing":
            on_phase(InstallPhase.from_json({"state": "running", "phase": "verify", "elapsed_s": 0.1}))
        raise KeyboardInterrupt

    monkeypatch.setattr("host.deploy.deploy", deploy)
    monkeypatch.setattr("host.deploy.ping", ctrl_c if got_to == "verifying" and as_json else
                        lambda name: type("Ping", (), {"hello": type("Hello", (), {"active": None})})())
    if got_to == "verifying" and as_json:  # --json asks the device what it serves first
        kept = "interrupted"
    json_flag = ["--json"] if as_json else []
    assert interrupted("deploy", str(tmp_path), "--device", "orin-01", *json_flag) == kept


# --- convert and quantize: nothing half-written ------------------------------------------------

def staging_then_ctrl_c(staging: Path, manifest: Any) -> Any:
    """finalize() of the writing stage: the staging folder holds the graph; Ctrl-C there."""
    assert staging.is_dir() and (staging / "model.onnx").is_file()
    raise KeyboardInterrupt


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["convert", "quantize"])
@pytest.mark.parametrize("replacing", [False, True])
def test_an_interrupted_convert_or_quantize_leaves_nothing_half_written(
        command: str, replacing: bool, tmp_path: Path, tiny_dir: Any, tiny_bundle: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    before: dict[str, bytes] = {}
    if replacing:  # an existing bundle, replaced with --force
        shutil.copytree(tiny_bundle("llama", "cpu"), out)
        before = tree(out)
    monkeypatch.setattr(f"{command}.pipeline.finalize", staging_then_ctrl_c)
    if command == "convert":
        args = ["convert", str(tiny_dir("llama")), "--target", "cpu", "--max-seq", "64"]
    else:  # --force: written even where the tiny model's gate fails
        args = ["quantize", str(tiny_bundle("llama", "cpu")), "-p", "int8"]
    force = ["--force"] if replacing or command == "quantize" else []
    result = CliRunner().invoke(main, [*args, "-o", str(out), *force])
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output and "Aborted!" not in result.output
    assert result.stderr.strip().splitlines()[-1] == "interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if replacing else [])  # no .out.tmp-*
    if replacing:
        assert tree(out) == before


def test_an_interrupted_step_says_interrupted_not_failed() -> None:
    import io

    from bundle.progress import Steps

    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Steps(total=2, out=out).step("writing the bundle"):
        raise KeyboardInterrupt
    assert out.getvalue() == "[1/2] writing the bundle … interrupted\n"


# --- the swap-in and the cleanup finish through a Ctrl-C ---------------------------------------

@pytest.fixture
def python_sigint() -> Any:
    """Python's own SIGINT handler for the test, whatever the run inherited: a suite started in
    the background of a non-interactive shell (nohup ... &, as CI may be) inherits SIGINT
    ignored, and then no KeyboardInterrupt comes."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def sigint() -> None:
    """A real SIGINT to this process: where Python's handler is on, KeyboardInterrupt at the next
    bytecode."""
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_right_after_the_new_bundle_is_renamed_in_finishes_the_swap(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python_sigint: None) -> None:
    """It used to raise in _swap_in's undo, which then failed (the new bundle already in place):
    an OSError traceback, and the old bundle left in .out.old-*."""
    from bundle.staging import staged_bundle

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    rename = os.rename

    def rename_then_sigint(src: Any, dst: Any) -> None:
        rename(src, dst)
        if Path(src).name.startswith(".out.tmp-"):
            sigint()

    monkeypatch.setattr(os, "rename", rename_then_sigint)
    with pytest.raises(Interrupted, match="the bundle .*out was complete and is in place"):
        with staged_bundle(out, force=True) as staging:
            (staging / "manifest.json").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "manifest.json").read_text() == "new"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_ctrl_c_during_the_cleanup_still_removes_the_staging_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, python_sigint: None) -> None:
    import bundle.staging

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    rmtree = shutil.rmtree

    def sigint_then_rmtree(path: Any, **kwargs: Any) -> None:
        sigint()
        rmtree(path, **kwargs)

    monkeypatch.setattr(bundle.staging.shutil, "rmtree", sigint_then_rmtree)
    with pytest.raises(KeyboardInterrupt):
        with bundle.staging.staged_bundle(tmp_path / "out") as staging:
            (staging / "model.onnx").write_bytes(b"half")
            raise KeyboardInterrupt
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def set_name_wraps_ctrl_c(*args: Any, **kwargs: Any) -> Any:
    """What Python <= 3.11 raises for a Ctrl-C inside a dataclass field's __set_name__."""
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        raise RuntimeError("Error calling __set_name__ on 'Field' instance") from e


@pytest.mark.parametrize("load", [ctrl_c, set_name_wraps_ctrl_c])
def test_ctrl_c_while_the_cli_imports_is_one_line_and_130_not_a_traceback(
        load: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The console script's first ~0.1 s import toolkit.cli (every command module): a Ctrl-C
    there was a traceback of whichever import it hit, exit 1 (toolkit/entry.py)."""
    from toolkit import entry

    monkeypatch.setattr(entry, "load_cli", load)
    with pytest.raises(SystemExit) as exit_:
        entry.main()
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_an_import_that_fails_for_another_reason_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit import entry

    def broken() -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(entry, "load_cli", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        entry.main()


def test_the_console_script_and_python_m_toolkit_go_through_the_guard() -> None:
    from targets import tomllib  # tomli on Python 3.10

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["toolkit"] == "toolkit.entry:main"
    main_py = (Path(__file__).parents[2] / "toolkit" / "__main__.py").read_text()
    assert "from toolkit.entry import main" in main_py
