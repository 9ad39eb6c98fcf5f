"""The whole main job on this machine, end to end, on the cpu target (`toolkit quickstart`).

  1. convert SmolLM2-135M for the cpu target (reused when an intact bundle is already there)
  2. start a daemon with an empty bundle store on a temporary Unix socket
  3. deploy the bundle to it (verified, atomic install, smoke test)
  4. stream one chat answer
  5. benchmark inside the daemon and write the report (JSON + HTML + PNG)
  6. stop the daemon (SIGTERM: drain, remove the socket)

Each step is the same library call the individual commands make; nothing here is special.
The device registry used for step 3 lives in the temporary folder, so the user's own
~/.config/toolkit/devices.json is left alone. What each step says goes to the callbacks of a
QuickstartOutput (the CLI prints them; the defaults say nothing).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle.atomic import check_parent
from bundle.benchreport import BenchConfig, check_report_path
from bundle.errors import ToolkitError
from host.bench import BenchRun, bench_remote, write_report

MODEL = "smollm2-135m"
QUESTION = "What is the capital of France? Answer in one sentence."


def _quiet(_: Any) -> None:
    pass


@dataclass(frozen=True)
class QuickstartOutput:
    step: Callable[[str], None] = _quiet  # a step's heading, "[1/6] converting …"
    log: Callable[[str], None] = _quiet  # a line about what happens within a step
    answer: Callable[[str], None] = _quiet  # the streamed answer, piece by piece, then "\n"
    progress: Callable[[dict[str, Any]], None] = _quiet  # the bench's progress events
    report: Callable[[BenchRun], None] = _quiet  # the written report, before the daemon stops


def quickstart(bundle_dir: Path, output: Path, prompt_lens: tuple[int, ...], gen_len: int,
               concurrency: tuple[int, ...], threads: int | None,
               out: QuickstartOutput = QuickstartOutput()) -> BenchRun:
    """Convert (or reuse) the bundle at bundle_dir, serve it from a temporary daemon, deploy,
    ask, bench inside the daemon (report at `output`), stop the daemon; the bench's result."""
    config = BenchConfig(prompt_lens=prompt_lens, gen_len=gen_len, concurrency=concurrency,
                         runs=2, warmup=1)  # checked before a minutes-long convert
    check_report_path(output)  # so is the report's path: a bad -o would lose the whole run
    try:  # and the bundle's folder, named by --bundle here (the shared check's hint says -o)
        check_parent(bundle_dir)
    except ToolkitError as e:
        raise ToolkitError(e.message, hint="pass --bundle with a folder you can write") from e
    bundle = _converted(bundle_dir, out)
    with tempfile.TemporaryDirectory(prefix="toolkit-quickstart-") as tmp, \
            _private_registry(Path(tmp) / "config"):
        work = Path(tmp)
        sock = work / "d.sock"
        daemon = _start_daemon(work, sock, max(concurrency), threads, out)
        try:
            _deploy(bundle, sock, out)
            _ask(sock, out)
            out.step("\n[5/6] benchmarking inside the daemon")
            from host.client import Endpoint

            report = bench_remote(Endpoint.unix(sock), config, progress=out.progress, log=out.log)
            run = write_report(report, output, html_page=True)
            out.report(run)
            return run
        finally:
            out.step("\n[6/6] stopping the daemon (SIGTERM)")
            _stop(daemon)


@contextmanager
def _private_registry(folder: Path) -> Iterator[None]:
    """TOOLKIT_CONFIG_DIR points at `folder` (a private device registry) while inside."""
    before = os.environ.get("TOOLKIT_CONFIG_DIR")
    os.environ["TOOLKIT_CONFIG_DIR"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOOLKIT_CONFIG_DIR", None)
        else:
            os.environ["TOOLKIT_CONFIG_DIR"] = before


def _converted(bundle_dir: Path, out: QuickstartOutput) -> Path:
    from bundle.manifest import load_verified
    from bundle.progress import Steps
    from convert.pipeline import convert_model
    from convert.summary import convert_summary

    out.step(f"[1/6] converting {MODEL} for the cpu target")
    if (bundle_dir / "manifest.json").exists():
        _refuse_another_bundle(bundle_dir)
        try:
            load_verified(bundle_dir)
            out.log(f"reusing the intact bundle {bundle_dir}")
            return bundle_dir
        except ToolkitError as e:
            out.log(f"{bundle_dir} is not usable ({e.message}); converting again")
    result = convert_model(MODEL, "cpu", bundle_dir, batch=2, force=True, steps=Steps(total=5))
    out.log(convert_summary(result))
    return bundle_dir


def _refuse_another_bundle(bundle_dir: Path) -> None:
    """The convert below replaces bundle_dir (force): only a quickstart bundle of its own may go,
    never a bundle of another model or target that --bundle happened to name."""
    from bundle.manifest import read_manifest

    try:
        m = read_manifest(bundle_dir)
    except ToolkitError:
        return  # a manifest that cannot be read names no model: converted again, as before
    if m.source.name != MODEL or m.target.name != "cpu":
        raise ToolkitError(f"{bundle_dir} holds a bundle of {m.source.name} for {m.target.name}, which "
                           f"quickstart would replace with {MODEL} for cpu",
                           hint=f"pass --bundle with another folder, e.g. bundles/{MODEL}-cpu-fp32")


def _start_daemon(work: Path, sock: Path, slots: int, threads: int | None,
                  out: QuickstartOutput) -> subprocess.Popen[bytes]:
    out.step(f"\n[2/6] starting a daemon with an empty store on {sock}")
    cmd = [sys.executable, "-c", "from toolkit.cli import main; main()", "serve", "--store",
           str(work / "store"),
           "--socket", str(sock), "--slots", str(slots)]
    cmd += ["--threads", str(threads)] if threads else []
    log = open(work / "daemon.log", "wb")  # noqa: SIM115 - lives as long as the daemon
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ToolkitError(f"the daemon did not start:\n{(work / 'daemon.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return proc


def _deploy(bundle: Path, sock: Path, out: QuickstartOutput) -> None:
    from host.deploy import add_device, deploy

    out.step(f"\n[3/6] deploying {bundle} to it")
    add_device("quickstart", f"unix://{sock}", replace=True)
    result = deploy(bundle, "quickstart")
    smoke = result.install.smoke
    out.log(f"installed {result.total_bytes / 1e6:.0f} MB at {result.mb_per_s:.0f} MB/s: "
            f"{result.install.message}; smoke test {'passed' if smoke and smoke.ok else 'FAILED'}"
            f"{f' ({smoke.detail})' if smoke else ''}")


def _ask(sock: Path, out: QuickstartOutput) -> None:
    from host.client import DaemonClient, Endpoint, stream_text

    out.step(f"\n[4/6] asking: {QUESTION}")
    client = DaemonClient(Endpoint.unix(sock))
    deadline = time.monotonic() + 120
    while client.get("/v1/status").get("state") != "ready":  # activation after install
        if time.monotonic() > deadline:
            raise ToolkitError("the daemon did not become ready after the deploy")
        time.sleep(0.2)
    for text, _ in stream_text(client, QUESTION, max_tokens=48, temperature=0):
        out.answer(text)
    out.answer("\n")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
