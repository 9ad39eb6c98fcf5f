"""Jetson telemetry for the benchmark: tegrastats lines, INA3221 power rails, nvpmodel, energy.

    rec = parse_line("RAM 4722/7844MB (lfb 1x512kB) ... VDD_IN 4706mW/4706mW ...")
    rec.total_power_mw, rec.total_rail        # 4706, "VDD_IN"
    source, why = open_power_source()         # a running sampler, or None and the reason
    energy_j = integrate_power(samples, t0, t1)

tegrastats fields (tensorrt_jetson.md §6.1, [S30][S31]):
  RAM used/totalMB (lfb NxSIZE)      SWAP used/totalMB (cached NMB)
  CPU [load%@MHz, ..., off]          EMC_FREQ load%[@MHz]
  GR3D_FREQ has three forms:  10%@1300 (JetPack 6), 12%@[1300,1300] (JetPack 7 on Orin: one
                              clock per GPC), @[1000,1000,1000] (Thor: clocks only, NO load -
                              a missing load is None here, never 0 %, §8 pitfall 14)
  name@temperatureC[/...C]           temperatures (-256C = sensor off, dropped)
  NAME XmW/YmW[/ZmW]                 power rails. jtop reads the first two as current and
                                     average; what a third value (JetPack 7) means is
                                     UNVERIFIED, so it is kept but not used.
Rail names differ per module: VDD_IN (Orin NX / Nano: the whole board's input), POM_5V_IN
(Nano, JetPack 4), VDD_GPU_SOC / VDD_CPU_CV / VIN_SYS_5V0 (AGX Orin). The reference does not
list Thor's names, so any NAME XmW/YmW token is taken as a rail. Total input power follows
jtop (jtop/core/power.py total_power): VDD_IN or POM_5V_IN when present, else the sum of rails.

Energy per token = the integral of total power over the decode time / the tokens decoded.
Samples come every ~100 ms (tegrastats --interval 100); the integral takes power as linear
between samples and constant before the first / after the last, so a decode phase shorter than
the interval still gets the power around it, not zero.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")  # board input rails, when the module has one (jtop)
SAMPLE_INTERVAL_MS = 100

_TIMESTAMP = re.compile(r"^(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB(?: \(cached (\d+)MB\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%(?:@(\d+))?")
_GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@\[([\d,]+)\]|@(\d+))?")
_TEMP = re.compile(r"\b(\w+)@(-?\d+(?:\.\d+)?)C(?:/-?\d+(?:\.\d+)?C)*")
# NAME 123mW/456mW[/789mW]; units optional for JetPack 4's "POM_5V_IN 2564/2564". The lookahead
# keeps "RAM 4722/7844MB" and "IRAM 0/252kB" out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")


# --- one line --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rail:
    mw: int  # the current reading
    avg_mw: int | None  # tegrastats' running average (second value)
    values: tuple[int, ...]  # every value printed, as printed


@dataclass(frozen=True)
class CpuCore:
    online: bool
    load_pct: int | None = None
    freq_mhz: int | None = None


@dataclass(frozen=True)
class TegrastatsRecord:
    timestamp: str | None = None
    ram_used_mb: int | None = None
    ram_total_mb: int | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    swap_cached_mb: int | None = None
    cpus: tuple[CpuCore, ...] = ()
    emc_pct: int | None = None
    emc_freq_mhz: int | None = None
    gr3d_pct: int | None = None  # None on Thor: it prints clocks only
    gr3d_freq_mhz: tuple[int, ...] = ()  # one per GPC on JetPack 7
    temps_c: dict[str, float] = field(default_factory=dict)
    rails: dict[str, Rail] = field(default_factory=dict)

    @property
    def total_rail(self) -> str | None:
        """The rail total_power_mw is read from, "sum of rails", or None without rails."""
        if not self.rails:
            return None
        return next((r for r in TOTAL_RAILS if r in self.rails), "sum of rails")

    @property
    def total_power_mw(self) -> int | None:
        name = self.total_rail
        if name is None:
            return None
        if name in self.rails:
            return self.rails[name].mw
        return sum(r.mw for r in self.rails.values())

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_power_mw": self.total_power_mw,
                "total_rail": self.total_rail}


def parse_line(line: str) -> TegrastatsRecord:
    """One tegrastats line -> a record; fields the line lacks are None / empty."""
    line = line.strip()
    stamp = _TIMESTAMP.match(line)
    ram, swap, emc = _RAM.search(line), _SWAP.search(line), _EMC.search(line)
    cpu = _CPU.search(line)
    pct, freqs = _gr3d(line)
    return TegrastatsRecord(
        timestamp=stamp.group(1) if stamp else None,
        ram_used_mb=_int(ram, 1), ram_total_mb=_int(ram, 2),
        swap_used_mb=_int(swap, 1), swap_total_mb=_int(swap, 2), swap_cached_mb=_int(swap, 3),
        cpus=tuple(_core(c) for c in cpu.group(1).split(",")) if cpu else (),
        emc_pct=_int(emc, 1), emc_freq_mhz=_int(emc, 2), gr3d_pct=pct, gr3d_freq_mhz=freqs,
        temps_c={m.group(1): float(m.group(2)) for m in _TEMP.finditer(line)
                 if float(m.group(2)) > -100},  # -256C: a sensor that is off
        rails={m.group(1): _rail(m) for m in _RAIL.finditer(line)})


def _int(match: re.Match[str] | None, group: int) -> int | None:
    value = match.group(group) if match else None
    return int(value) if value is not None else None


def _core(text: str) -> CpuCore:
    text = text.strip()
    if text == "off":
        return CpuCore(online=False)
    load, _, freq = text.partition("@")
    return CpuCore(True, int(load.rstrip("%")) if load.rstrip("%").isdigit() else None,
                   int(freq) if freq.isdigit() else None)


def _gr3d(line: str) -> tuple[int | None, tuple[int, ...]]:
    m = _GR3D.search(line)
    if not m:
        return None, ()
    pct = int(m.group(1)) if m.group(1) is not None else None
    if m.group(2):
        return pct, tuple(int(f) for f in m.group(2).split(","))
    return pct, (int(m.group(3)),) if m.group(3) else ()


def _rail(m: re.Match[str]) -> Rail:
    values = tuple(int(v) for v in m.groups()[1:] if v is not None)
    return Rail(mw=values[0], avg_mw=values[1] if len(values) > 1 else None, values=values)


# --- energy ----------------------------------------------------------------------------------
def integrate_power(samples: Sequence[tuple[float, float]], t0: float, t1: float) -> float:
    """Integral of power over [t0, t1] for samples [(t seconds, watts)] sorted by t: joules.

    Power is linear between samples and held constant outside them (trapezoids over the
    sample points inside the window plus interpolated end points)."""
    if t1 <= t0 or not samples:
        return 0.0

    def at(t: float) -> float:
        if t <= samples[0][0]:
            return samples[0][1]
        if t >= samples[-1][0]:
            return samples[-1][1]
        i = next(k for k in range(1, len(samples)) if samples[k][0] >= t)
        (ta, pa), (tb, pb) = samples[i - 1], samples[i]
        return pa + (pb - pa) * (t - ta) / (tb - ta) if tb > ta else pb

    points = [(t0, at(t0)), *[(t, p) for t, p in samples if t0 < t < t1], (t1, at(t1))]
    return sum((tb - ta) * (pa + pb) / 2 for (ta, pa), (tb, pb) in zip(points, points[1:]))


# --- samplers ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerSample:
    t: float  # seconds on the caller's clock (time.perf_counter() - its origin)
    total_mw: float
    rails_mw: dict[str, float]
    record: TegrastatsRecord | None = None  # tegrastats only: the whole line


class PowerSource(Protocol):
    name: str  # "tegrastats" | "ina3221"
    total_rail: str | None
    samples: list[PowerSample]  # grows while running

    def start(self, clock: Callable[[], float]) -> None: ...

    def stop(self) -> list[PowerSample]: ...


class TegrastatsSampler:
    """`tegrastats --interval 100` in a child process; a thread parses each line as it comes
    and stamps it with the caller's clock at the moment it was read."""

    name = "tegrastats"

    def __init__(self, exe: str = "tegrastats", interval_ms: int = SAMPLE_INTERVAL_MS) -> None:
        self.cmd = [exe, "--interval", str(interval_ms)]
        self.samples: list[PowerSample] = []
        self.total_rail: str | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def start(self, clock: Callable[[], float]) -> None:
        self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)
        self._thread = threading.Thread(target=self._read, args=(self._proc, clock),
                                        name="tegrastats", daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str], clock: Callable[[], float]) -> None:
        assert proc.stdout is not None  # Popen(stdout=PIPE) always sets it
        for line in proc.stdout:
            rec = parse_line(line)
            if rec.total_power_mw is None:  # a line without rails (no sudo, odd module)
                continue
            self.total_rail = rec.total_rail
            self.samples.append(PowerSample(clock(), rec.total_power_mw,
                                            {k: r.mw for k, r in rec.rails.items()}, rec))

    def stop(self) -> list[PowerSample]:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return list(self.samples)


@dataclass(frozen=True)
class Ina3221Channel:
    label: str
    voltage: Path | None = None  # in{N}_input, mV (hwmon, JetPack 5+)
    current: Path | None = None  # curr{N}_input, mA
    power: Path | None = None  # in_power{N}_input, mW (iio, JetPack 4)

    def read_mw(self) -> float:
        if self.power is not None:
            return _read_number(self.power)
        assert self.voltage is not None and self.current is not None  # built with both
        return _read_number(self.voltage) * _read_number(self.current) / 1000.0


def _read_number(path: Path) -> float:
    return float(path.read_text().split()[0])  # "32760 ma" style files: the first word


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # no such attribute on this chip
        return ""


def find_ina3221(sys_root: Path = Path("/sys")) -> list[Ina3221Channel]:
    """The INA3221 rails under sys_root, the way jtop finds them: hwmon in{N}_label with
    in{N}_input (mV) and curr{N}_input (mA), skipping "NC" (not connected) labels and channel 7
    (the sum of shunt voltages, not a rail); or JetPack 4's iio rail_name_{N} + in_power{N}_input."""
    root = str(sys_root)
    bound = glob.glob(f"{root}/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*")  # the driver's own
    named = [p for p in glob.glob(f"{root}/bus/i2c/devices/*/hwmon/hwmon*")  # any hwmon chip
             if "ina3221" in _read_text(Path(p) / "name")]
    channels = []
    for folder in sorted({Path(p).resolve() for p in bound + named}):
        for label_file in sorted(folder.glob("in*_label")):
            n = label_file.name[2:].split("_")[0]
            label = label_file.read_text().strip()
            volt, curr = folder / f"in{n}_input", folder / f"curr{n}_input"
            if "NC" in label or n == "7" or not (volt.is_file() and curr.is_file()):
                continue
            channels.append(Ina3221Channel(label, voltage=volt, current=curr))
    for iio in sorted(glob.glob(f"{root}/bus/i2c/devices/*/iio:device*")):
        for label_file in sorted(Path(iio).glob("rail_name_*")):
            n = label_file.name.removeprefix("rail_name_")
            power = Path(iio) / f"in_power{n}_input"
            if power.is_file():
                channels.append(Ina3221Channel(label_file.read_text().strip(), power=power))
    return channels


class Ina3221Sampler:
    """Reads the INA3221 rails every interval in a thread (no tegrastats needed)."""

    name = "ina3221"

    def __init__(self, channels: Sequence[Ina3221Channel],
                 interval_s: float = SAMPLE_INTERVAL_MS / 1000) -> None:
        self.channels, self.interval = list(channels), interval_s
        labels = [c.label for c in self.channels]
        self.total_rail: str | None = next((r for r in TOTAL_RAILS if r in labels),
                                           "sum of rails")
        self.samples: list[PowerSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self, t: float) -> PowerSample:
        rails = {c.label: c.read_mw() for c in self.channels}
        total = rails[self.total_rail] if self.total_rail in rails else sum(rails.values())
        return PowerSample(t, total, rails)

    def start(self, clock: Callable[[], float]) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append(self.sample(clock()))
                except (OSError, ValueError):  # a rail that vanished or read garbage: skip it
                    pass
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=loop, name="ina3221", daemon=True)
        self._thread.start()

    def stop(self) -> list[PowerSample]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return list(self.samples)


def open_power_source(sys_root: Path = Path("/sys"),
                      tegrastats: str | None = "tegrastats") -> tuple[PowerSource | None, str]:
    """The first power source this device has: tegrastats on PATH, else INA3221 rails in sysfs.
    Returns (source not yet started, "") or (None, why there is none)."""
    exe = shutil.which(tegrastats) if tegrastats else None
    if exe:
        return TegrastatsSampler(exe), ""
    channels = find_ina3221(sys_root)
    if channels:
        return Ina3221Sampler(channels), ""
    return None, ("no power telemetry: tegrastats is not on PATH and there are no INA3221 rails "
                  f"under {sys_root}/bus/i2c (not a Jetson)")


# --- power mode --------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerMode:
    name: str  # "MAXN", "15W", ...
    id: int | None


def parse_nvpmodel(text: str) -> PowerMode | None:
    """`nvpmodel -q` prints "NV Power Mode: MAXN" and, on the next line, the mode's number."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if line.startswith("NV Power Mode"):
            name = line.split(":", 1)[1].strip()
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            return PowerMode(name, int(nxt) if nxt.isdigit() else None)
    return None


def power_mode(exe: str = "nvpmodel") -> tuple[PowerMode | None, str]:
    """(the nvpmodel mode, "") or (None, why not). Clocks differ per mode (tensorrt_jetson.md
    §6.5), so a report without it cannot be compared fairly with another."""
    path = shutil.which(exe)
    if path is None:
        return None, "nvpmodel is not on PATH (not a Jetson)"
    try:
        out = subprocess.run([path, "-q"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"`nvpmodel -q` failed: {e}"
    mode = parse_nvpmodel(out.stdout)
    return (mode, "") if mode else (None, f"`nvpmodel -q` printed no mode: {out.stdout.strip()!r}")


def wait_first_sample(source: PowerSource, timeout_s: float = 1.0) -> None:
    """Give a just-started sampler time for its first sample, so the warm-up is covered."""
    deadline = time.monotonic() + timeout_s
    while not source.samples and time.monotonic() < deadline:
        time.sleep(0.02)
