"""toolkit quickstart: the whole main job on this machine, end to end, on the cpu target.

  1. convert SmolLM2-135M for the cpu target (reused when an intact bundle is already there)
  2. start a daemon with an empty bundle store on a temporary Unix socket
  3. deploy the bundle to it (verified, atomic install, smoke test)
  4. stream one chat answer
  5. benchmark inside the daemon and print the report's table (JSON + HTML + PNG written)
  6. stop the daemon (SIGTERM: drain, remove the socket)

Each step is the same library call the individual commands make; nothing here is special.
The device registry used for step 3 lives in the temporary folder, so the user's own
~/.config/toolkit/devices.json is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from bundle.errors import ToolkitError

MODEL = "smollm2-135m"
QUESTION = "What is the capital of France? Answer in one sentence."


@click.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path),
              default=Path("bundles/smollm2-135m-cpu-fp32"), show_default=True,
              help="Where the converted bundle goes (reused when it is already there, intact).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("quickstart-report.json"),
              show_default=True, help="The bench report (HTML and PNG plots beside it).")
@click.option("--prompt-lens", default="128", show_default=True, help="Bench prompt lengths.")
@click.option("--gen-len", type=int, default=64, show_default=True, help="Bench tokens per request.")
@click.option("--concurrency", default="1,2", show_default=True, help="Bench concurrency levels.")
@click.option("--threads", type=int, default=None, help="Daemon threads. Default: every core.")
def quickstart(bundle_dir: Path, output: Path, prompt_lens: str, gen_len: int, concurrency: str,
               threads: int | None) -> None:
    """Convert SmolLM2-135M for the CPU, serve it from a daemon on a temporary Unix socket,
    deploy to it, stream one answer, benchmark it on the "device" and print the report."""
    from bundle.benchreport import BenchConfig
    from toolkit.commands.bench import _measure_remote, _write_and_show

    bundle = _converted(bundle_dir)
    lens = tuple(int(v) for v in prompt_lens.split(","))
    conc = tuple(int(v) for v in concurrency.split(","))
    with tempfile.TemporaryDirectory(prefix="toolkit-quickstart-") as tmp:
        work = Path(tmp)
        os.environ["TOOLKIT_CONFIG_DIR"] = str(work / "config")  # a private device registry
        sock = work / "d.sock"
        daemon = _start_daemon(work, sock, max(conc), threads)
        try:
            _deploy(bundle, sock)
            _ask(sock)
            click.secho("\n[5/6] benchmarking inside the daemon", bold=True, err=True)
            config = BenchConfig(prompt_lens=lens, gen_len=gen_len, concurrency=conc, runs=2,
                                 warmup=1)
            report = _measure_remote(sock, None, config)
            _write_and_show(report, output, html_page=True)
        finally:
            click.secho("\n[6/6] stopping the daemon (SIGTERM)", bold=True, err=True)
            _stop(daemon)


def _converted(bundle_dir: Path) -> Path:
    from bundle.manifest import load_verified
    from bundle.progress import Steps
    from convert.pipeline import convert_model
    from convert.summary import convert_summary

    click.secho(f"[1/6] converting {MODEL} for the cpu target", bold=True, err=True)
    if (bundle_dir / "manifest.json").exists():
        try:
            m = load_verified(bundle_dir)
            if m.source.name == MODEL and m.target.name == "cpu":
                click.echo(f"reusing the intact bundle {bundle_dir}", err=True)
                return bundle_dir
        except ToolkitError as e:
            click.echo(f"{bundle_dir} is not usable ({e.message}); converting again", err=True)
    result = convert_model(MODEL, "cpu", bundle_dir, batch=2, force=True, steps=Steps(total=5))
    click.echo(convert_summary(result), err=True)
    return bundle_dir


def _start_daemon(work: Path, sock: Path, slots: int, threads: int | None) -> subprocess.Popen[bytes]:
    click.secho(f"\n[2/6] starting a daemon with an empty store on {sock}", bold=True, err=True)
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


def _deploy(bundle: Path, sock: Path) -> None:
    from host.deploy import add_device, deploy

    click.secho(f"\n[3/6] deploying {bundle} to it", bold=True, err=True)
    add_device("quickstart", f"unix://{sock}", replace=True)
    result = deploy(bundle, "quickstart")
    smoke = result.install.smoke
    click.echo(f"installed {result.total_bytes / 1e6:.0f} MB at {result.mb_per_s:.0f} MB/s: "
               f"{result.install.message}; smoke test {'passed' if smoke and smoke.ok else 'FAILED'}"
               f"{f' ({smoke.detail})' if smoke else ''}", err=True)


def _ask(sock: Path) -> None:
    from host.client import DaemonClient, Endpoint, stream_text

    click.secho(f"\n[4/6] asking: {QUESTION}", bold=True, err=True)
    client = DaemonClient(Endpoint.unix(sock))
    deadline = time.monotonic() + 120
    while client.get("/v1/status").get("state") != "ready":  # activation after install
        if time.monotonic() > deadline:
            raise ToolkitError("the daemon did not become ready after the deploy")
        time.sleep(0.2)
    for text, _ in stream_text(client, QUESTION, max_tokens=48, temperature=0):
        click.echo(text, nl=False)
    click.echo()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
