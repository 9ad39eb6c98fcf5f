"""The on-device benchmark: latency, throughput, memory and power of a loaded decoder bundle.

    runner = load_bundle(path, slots=4)
    report = run_bench(runner, BenchConfig(prompt_lens=(128, 512), gen_len=128,
                                           concurrency=(1, 4), runs=3), progress=print)
    report.save(Path("smol.json"))            # complete: false + stopped_because if cut short

It runs next to the model, so the network is never what is measured. For each prompt length x
concurrency it runs `warmup` unmeasured rounds (same shapes, a few tokens: per-shape
allocations and kernel choice stay out of the numbers), then `runs` measured rounds. A round is
`concurrency` requests that arrive together, one per KV slot (slots 0..c-1): each is prefilled in
turn (B=1) and then all decode together, one batched step per token, greedy, EOS ignored, so every
request makes exactly gen_len tokens. That is what the daemon's scheduler does with the same
requests (device/serve/scheduler.py: one prefill at a time, one decode step for the contiguous span of
active slots); run_round is kept small so the scheduler can replace it later.

Prompts are synthetic and deterministic: token ids drawn from a generator seeded with (seed,
prompt_len, concurrency, round), above the tokenizer's special ids. Compute does not depend on
which ids they are; their count is exact, which a tokenized text cannot promise.

Telemetry while it runs (tensorrt_jetson.md §6): process RSS and MemAvailable sampled in a thread
every sample_interval_s, the peak RSS (VmHWM, which includes loading the model); the GPU's free
memory where the backend or pycuda can tell (on a Jetson that is the same RAM: §6.4); the KV
cache bytes; and power from tegrastats or INA3221 rails (device/runtime/tegrastats.py) with the nvpmodel
mode. Whatever a device lacks is null with the reason beside it.

Progress events, for the terminal now and for the daemon's stream later (JSON-ready dicts):
    {"event": "start", "created_at", "config", "environment"}
    {"event": "cell", "cell", "cells", "prompt_len", "concurrency", "runs", "warmup"}
    {"event": "warmup", "cell", "round"}
    {"event": "round", "cell", "round": RoundResult.to_json()}   (every measured round)
    {"event": "stopped", "stopped_because"}                      (only when cut short)
    {"event": "report", "report": the whole report}              (always last)
The host rebuilds a partial report from "start" + "round" events when a stream dies before
"report" (host.report.report_from_events). A run cut short by an exception, Ctrl-C, `stop`
being set or a failing progress consumer returns the report of the rounds that finished, with
complete: false, stopped_because, and (for an exception) the traceback in `error`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundle import __version__
from bundle.benchreport import BenchConfig, BenchReport, Energy, RequestRecord, RoundResult, summarize
from bundle.manifest import Manifest
from device.runtime import procmem
from device.runtime.generate import prefill
from device.runtime.procmem import process_rss
from device.runtime.tegrastats import (
    SAMPLE_INTERVAL_MS,
    PowerSample,
    PowerSource,
    integrate_power,
    open_power_source,
    power_mode,
    wait_first_sample,
)

__all__ = ["BenchConfig", "BenchStopped", "run_bench", "run_round", "synthetic_prompts"]

Progress = Callable[[dict[str, Any]], None]
WARMUP_TOKENS = 4  # a warm-up round decodes this many tokens: enough to run each batch shape


class BenchStopped(Exception):
    """The bench was asked to stop (the daemon's client went away) or could not report."""


# --- one round -------------------------------------------------------------------------------
def run_round(backend: Any, prompts: Sequence[Sequence[int]], gen_len: int,
              clock: Callable[[], float], stop: threading.Event | None = None,
              run: int = 0) -> RoundResult:
    """len(prompts) requests arriving now on slots 0..c-1: prefill each (B=1), then decode all
    together for gen_len - 1 steps. Greedy; EOS is not looked at."""
    c = len(prompts)
    slots = list(range(c))
    ids = np.zeros((c, 1), dtype=np.int64)  # [c, 1] next input token per slot
    pos = np.zeros((c, 1), dtype=np.int64)  # [c, 1] its position
    queue, spent, first = [0.0] * c, [0.0] * c, [0.0] * c
    start = clock()
    for slot, prompt in enumerate(prompts):
        t0 = clock()
        logits = prefill(backend, prompt, slot)  # [V] of the last prompt token
        ids[slot, 0] = int(np.argmax(logits))
        t1 = clock()
        queue[slot], spent[slot], first[slot] = t0 - start, t1 - t0, t1 - start
        pos[slot, 0] = len(prompt)
        _check(stop)
    decode_start = clock()
    for _ in range(gen_len - 1):
        logits = backend.step(ids, pos, slots)  # [c, 1, V]
        ids[:, 0] = logits[:, -1].argmax(-1)
        pos += 1
        _check(stop)
    end = clock()
    records = tuple(RequestRecord(slot=s, prompt_tokens=len(prompts[s]), output_tokens=gen_len,
                                  queue_s=queue[s], prefill_s=spent[s], ttft_s=first[s],
                                  e2e_s=end - start) for s in range(c))
    return RoundResult(prompt_len=len(prompts[0]), concurrency=c, run=run, start_s=start,
                       wall_s=end - start, decode_start_s=decode_start,
                       decode_s=end - decode_start, decode_steps=gen_len - 1, requests=records)


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise BenchStopped("asked to stop")


def synthetic_prompts(vocab_size: int, prompt_len: int, count: int, seed: int,
                      round_index: int = 0, first_id: int = 0) -> list[list[int]]:
    """`count` prompts of exactly prompt_len ids in [first_id, vocab); the same arguments give
    the same prompts."""
    rng = np.random.default_rng([seed, prompt_len, count, round_index])
    lo = min(first_id, vocab_size - 1)
    return [rng.integers(lo, vocab_size, prompt_len).tolist() for _ in range(count)]


def first_plain_id(manifest: Manifest) -> int:
    """One past the highest special id the manifest names (BOS, stop tokens): small
    vocabularies put their specials first (ours 0..3, SmolLM2's 0..16)."""
    tok = manifest.tokenizer
    specials = [*(tok.stop_token_ids if tok else []), tok.bos_token_id if tok else None, 3]
    return 1 + max(int(s) for s in specials if s is not None)


# --- memory ------------------------------------------------------------------------------------
def mem_available() -> int:
    """MemAvailable, falling back to psutil where /proc/meminfo is missing."""
    got = procmem.mem_available()
    if got is not None:
        return got
    import psutil

    return int(psutil.virtual_memory().available)


GpuReader = Callable[[], tuple[int, int] | None]  # -> (free, total) bytes; None: no reading now


def gpu_reader(backend: Any) -> tuple[GpuReader | None, str, Callable[[], None]]:
    """How to read the GPU's (free, total): the TensorRT backend's memory(), else pycuda on
    device 0's primary context (what ONNX Runtime's CUDA provider uses). Returns the reader
    (None: no GPU, and why) and what to call when done."""
    memory = getattr(backend, "memory", None)
    if callable(memory):
        def from_backend() -> tuple[int, int] | None:
            m = memory()  # TrtDecoderBackend.memory(): None values once it is closed
            free, total = m.get("gpu_free_bytes"), m.get("gpu_total_bytes")
            return (int(free), int(total)) if free is not None and total is not None else None

        return from_backend, "", lambda: None
    try:
        import pycuda.driver as cuda
    except (ImportError, OSError):  # OSError: pycuda without libcuda (no driver)
        return None, "no GPU view: pycuda is not importable here", lambda: None
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return None, "no CUDA device", lambda: None
        ctx = cuda.Device(0).retain_primary_context()
    except cuda.Error as e:
        return None, f"no GPU view: CUDA says {e}", lambda: None

    def from_pycuda() -> tuple[int, int] | None:
        try:
            ctx.push()
        except cuda.Error:  # the context went away (driver reset): no reading, the run goes on
            return None
        try:
            return cuda.mem_get_info()
        finally:
            cuda.Context.pop()

    return from_pycuda, "", ctx.detach


@dataclass
class MemoryReport:
    rss_peak_bytes: int  # VmHWM: the process's peak, loading the model included
    rss_start_bytes: int
    rss_end_bytes: int
    rss_max_sampled_bytes: int  # the highest RSS the sampler saw during the run
    mem_total_bytes: int
    mem_available_start_bytes: int
    mem_available_min_bytes: int
    mem_available_drop_bytes: int  # start - min: system-wide (other processes count too)
    mem_available_before_load_bytes: int | None  # given by the caller that loaded the bundle
    load_drop_bytes: int | None  # before_load - start: what loading the bundle took
    kv_cache_bytes: int
    gpu: dict[str, int] | None  # {free_start_bytes, free_min_bytes, total_bytes, used_delta_bytes}
    gpu_reason: str | None
    unified_memory: bool  # a Jetson: GPU memory is this same RAM (count it once)
    samples: int
    sample_interval_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class MemorySampler:
    """RSS and MemAvailable every interval in a thread; the GPU from the bench's own thread
    between rounds (pycuda contexts belong to threads)."""

    def __init__(self, interval_s: float, gpu: GpuReader | None) -> None:
        self.interval, self.gpu = interval_s, gpu
        self.rss_start, _ = process_rss()
        self.avail_start = self.avail_min = mem_available()
        self.rss_max, self.samples = self.rss_start, 1
        self.gpu_samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-memory", daemon=True)

    def start(self) -> None:
        self.sample_gpu()
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            rss, _ = process_rss()
            self.rss_max = max(self.rss_max, rss)
            self.avail_min = min(self.avail_min, mem_available())
            self.samples += 1

    def sample_gpu(self) -> None:
        if self.gpu is not None and (reading := self.gpu()) is not None:
            self.gpu_samples.append(reading)

    def stop(self, kv_cache_bytes: int, before_load: int | None, unified: bool,
             gpu_reason: str) -> MemoryReport:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample_gpu()
        rss, peak = process_rss()
        gpu = None
        if self.gpu_samples:
            free_start, total = self.gpu_samples[0]
            free_min = min(f for f, _ in self.gpu_samples)
            gpu = {"free_start_bytes": free_start, "free_min_bytes": free_min,
                   "total_bytes": total, "used_delta_bytes": free_start - free_min}
        total_mem = procmem.proc_kib(procmem.MEMINFO, ("MemTotal",)).get("MemTotal", 0)
        return MemoryReport(
            rss_peak_bytes=peak, rss_start_bytes=self.rss_start, rss_end_bytes=rss,
            rss_max_sampled_bytes=max(self.rss_max, rss), mem_total_bytes=total_mem,
            mem_available_start_bytes=self.avail_start, mem_available_min_bytes=self.avail_min,
            mem_available_drop_bytes=self.avail_start - self.avail_min,
            mem_available_before_load_bytes=before_load,
            load_drop_bytes=before_load - self.avail_start if before_load is not None else None,
            kv_cache_bytes=kv_cache_bytes, gpu=gpu, gpu_reason=None if gpu else gpu_reason,
            unified_memory=unified, samples=self.samples, sample_interval_s=self.interval)


# --- power -------------------------------------------------------------------------------------
def cell_energy(rounds: Sequence[RoundResult], samples: Sequence[PowerSample]) -> Energy | None:
    """Decode energy of a cell's rounds: the power integral over each decode phase."""
    if not samples or not rounds:
        return None
    watts = [(s.t, s.total_mw / 1000.0) for s in samples]
    decode_j = sum(integrate_power(watts, r.decode_start_s, r.decode_start_s + r.decode_s)
                   for r in rounds)
    wall_j = sum(integrate_power(watts, r.start_s, r.start_s + r.wall_s) for r in rounds)
    tokens = sum(r.decode_tokens for r in rounds)
    wall = sum(r.wall_s for r in rounds)
    return Energy(avg_power_w=wall_j / wall if wall > 0 else 0.0, decode_energy_j=decode_j,
                  decode_tokens=tokens, energy_per_token_j=decode_j / tokens if tokens else 0.0)


def power_report(source: PowerSource | None, reason: str, samples: Sequence[PowerSample],
                 rounds: Sequence[RoundResult], mode: Any, mode_reason: str) -> dict[str, Any]:
    """The report's `power` section: totals over every measured decode phase."""
    base: dict[str, Any] = {
        "source": source.name if source else None, "reason": reason or None,
        "power_mode": asdict(mode) if mode else None, "power_mode_reason": mode_reason or None,
        "total_rail": source.total_rail if source else None, "samples": len(samples),
        "interval_ms": SAMPLE_INTERVAL_MS, "avg_power_w": None, "rails_avg_mw": None,
        "decode_energy_j": None, "decode_tokens": None, "energy_per_token_j": None,
        "tegrastats": None}
    if source is None:
        return base
    if not samples:
        return {**base, "reason": f"{source.name} gave no power readings (on some JetPacks the "
                                  "rails need root: run the bench with sudo)"}
    energy = cell_energy(rounds, samples)
    rails = sorted({k for s in samples for k in s.rails_mw})
    base.update(
        avg_power_w=sum(s.total_mw for s in samples) / len(samples) / 1000.0,
        rails_avg_mw={k: sum(s.rails_mw.get(k, 0.0) for s in samples) / len(samples)
                      for k in rails})
    if energy is not None:
        base.update(decode_energy_j=energy.decode_energy_j, decode_tokens=energy.decode_tokens,
                    energy_per_token_j=energy.energy_per_token_j)
    records = [s.record for s in samples if s.record is not None]
    if records:
        base["tegrastats"] = {
            "ram_used_mb_max": max((r.ram_used_mb or 0) for r in records),
            "ram_total_mb": records[-1].ram_total_mb,
            "gr3d_pct_max": max((r.gr3d_pct for r in records if r.gr3d_pct is not None),
                                default=None),  # None on Thor: no GPU load printed
            "emc_pct_max": max((r.emc_pct for r in records if r.emc_pct is not None),
                               default=None),
            "temps_c_max": {k: max(r.temps_c[k] for r in records if k in r.temps_c)
                            for k in sorted({k for r in records for k in r.temps_c})}}
    return base


# --- environment -------------------------------------------------------------------------------
def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def cpu_model() -> str:
    """/proc/cpuinfo's model name (x86), else its Hardware / CPU part lines (arm64)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:  # not Linux
        return platform.processor() or platform.machine()
    if "model name" in fields:
        return fields["model name"]
    if "Hardware" in fields:
        return fields["Hardware"]
    part = fields.get("CPU part")
    return f"{platform.machine()} (CPU part {part})" if part else platform.machine()


def board_model() -> str | None:
    """"NVIDIA Jetson Orin Nano Developer Kit" from the device tree, where there is one."""
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def collect_environment(runner: Any) -> dict[str, Any]:
    from device.runtime.engine_identity import detect_device
    from device.runtime.runner import device_family

    m, backend = runner.manifest, runner.backend
    described = json.loads(json.dumps(backend.describe(), default=str))
    dev = detect_device()
    arch = m.architecture
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {
        "hostname": platform.node(),
        "device_family": device_family(),
        "target": {"name": m.target.name, "family": m.target.family, "runtime": m.target.runtime},
        "backend": described,
        "threads": described.get("threads"),
        "bundle": {
            "name": m.name, "path": str(runner.path), "kind": m.kind,
            "source_kind": m.source.kind, "source_sha256": m.source.sha256,
            "precision": m.precision, "max_seq": m.max_seq, "batch": m.batch,
            "slots": backend.slots, "target": m.target.name,
            "model_type": arch.model_type if arch else None,
            "params": arch.dims.params if arch else None,
            "dims": arch.dims.to_json() if arch else None, "created_at": m.created_at,
            "toolkit_version": m.toolkit_version},
        "versions": {
            "toolkit": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
            "tensorrt": dev.tensorrt_version, "l4t": dev.l4t, "jetpack": dev.jetpack},
        "cpu": {"model": cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": usable,
                "machine": platform.machine(), "kernel": platform.release(),
                "board": board_model()},
        "gpu": ({"name": dev.gpu_name, "compute_capability": dev.compute_capability}
                if dev.gpu_name else None),
    }


# --- the bench ---------------------------------------------------------------------------------
class _Emitter:
    """Calls the progress consumer; if it fails (a dead stream), the bench stops and says so,
    and nothing more is sent to it."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress, self.broken = progress, False

    def __call__(self, event: dict[str, Any]) -> None:
        if self.progress is None or self.broken:
            return
        try:
            self.progress(event)
        except Exception as e:  # noqa: BLE001 - the reason is reported as stopped_because
            self.broken = True
            raise BenchStopped(f"the progress consumer failed: {type(e).__name__}: {e}") from e

    def last(self, event: dict[str, Any]) -> None:
        """Final events: a consumer that fails now has nothing left to lose."""
        try:
            self(event)
        except BenchStopped:
            pass


def run_bench(runner: Any, config: BenchConfig, progress: Progress | None = None, *,
              stop: threading.Event | None = None, before_load: int | None = None,
              power_source: tuple[PowerSource | None, str] | None = None) -> BenchReport:
    """Benchmark runner.backend (it must be idle: the bench uses slots 0..max(concurrency)-1).

    progress: called with each event dict (module docstring). stop: set it to end the run
    early (a partial report comes back). before_load: MemAvailable before the bundle was
    loaded, to report what loading took. power_source: (source, reason) to use instead of
    what open_power_source() finds (tests; None = detect, unless config.power is off)."""
    backend = runner.backend
    config.check_fits(backend.slots, backend.max_seq)
    # plain one-token steps, as in-process generate runs them: the daemon's one-slot engine
    # leaves spare_token as its last step had it (it sets it before every step of its own)
    backend.spare_token = False
    emit = _Emitter(progress)
    origin = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - origin

    env = collect_environment(runner)
    report = BenchReport(config.to_json(), env,
                         created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    source, reason = _power(config, power_source)
    mode, mode_reason = power_mode() if source else (None, "not read: no power telemetry")
    read_gpu, gpu_reason, release_gpu = gpu_reader(backend)
    sampler = MemorySampler(config.sample_interval_s, read_gpu)
    samples: list[PowerSample] = []
    sampler.start()
    if source is not None:
        source.start(clock)
        wait_first_sample(source)  # so the power of the first rounds is measured, not guessed
    try:
        emit({"event": "start", "created_at": report.created_at, "config": report.config,
              "environment": env})
        _run_cells(runner, config, report, emit, clock, stop, sampler)
        report.complete = True
    except KeyboardInterrupt:
        report.stopped_because = "interrupted (Ctrl-C)"
    except BenchStopped as e:
        report.stopped_because = str(e)
    except Exception as e:  # noqa: BLE001 - kept: the partial report carries it and the traceback
        report.stopped_because = f"{type(e).__name__}: {e}"
        report.error = traceback.format_exc()
    finally:
        if source is not None:
            samples = source.stop()
        memory = sampler.stop(backend.kv_cache_bytes(), before_load,
                              env["device_family"] == "jetson", gpu_reason)
        release_gpu()
    return _finish(report, config, memory, samples, source, reason, mode, mode_reason, emit, clock)


def _power(config: BenchConfig, given: tuple[PowerSource | None, str] | None
           ) -> tuple[PowerSource | None, str]:
    if given is not None:
        return given
    if not config.power:
        return None, "not measured: power sampling was turned off"
    return open_power_source()


def _run_cells(runner: Any, config: BenchConfig, report: BenchReport, emit: _Emitter,
               clock: Callable[[], float], stop: threading.Event | None,
               sampler: MemorySampler) -> None:
    backend = runner.backend
    first_id = first_plain_id(runner.manifest)
    cells = [(p, c) for p in config.prompt_lens for c in config.concurrency]
    for i, (p, c) in enumerate(cells):
        emit({"event": "cell", "cell": i, "cells": len(cells), "prompt_len": p,
              "concurrency": c, "runs": config.runs, "warmup": config.warmup})
        for w in range(config.warmup):  # round indices after the measured ones: other prompts
            prompts = synthetic_prompts(backend.vocab_size, p, c, config.seed, config.runs + w,
                                        first_id)
            run_round(backend, prompts, min(config.gen_len, WARMUP_TOKENS), clock, stop)
            emit({"event": "warmup", "cell": i, "round": w})
        for run in range(config.runs):
            prompts = synthetic_prompts(backend.vocab_size, p, c, config.seed, run, first_id)
            result = run_round(backend, prompts, config.gen_len, clock, stop, run)
            report.rounds.append(result)
            sampler.sample_gpu()
            emit({"event": "round", "cell": i, "round": result.to_json()})


def _finish(report: BenchReport, config: BenchConfig, memory: MemoryReport,
            samples: list[PowerSample], source: PowerSource | None, reason: str, mode: Any,
            mode_reason: str, emit: _Emitter, clock: Callable[[], float]) -> BenchReport:
    energy = {}
    for p in config.prompt_lens:
        for c in config.concurrency:
            mine = [r for r in report.rounds if r.prompt_len == p and r.concurrency == c]
            if (e := cell_energy(mine, samples)) is not None:
                energy[(p, c)] = e
    report.cells, report.prediction_note = summarize(report.config, report.rounds, energy)
    report.memory = memory.to_json()
    report.power = power_report(source, reason, samples, report.rounds, mode, mode_reason)
    report.duration_s = clock()
    if not report.complete:
        emit.last({"event": "stopped", "stopped_because": report.stopped_because})
    emit.last({"event": "report", "report": report.to_json()})
    return report
