"""Jetson telemetry: tegrastats lines (real captures), energy arithmetic, INA3221 sysfs, nvpmodel."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest
from paths import TEST_DATA

from bundle.benchreport import RequestRecord, RoundResult
from device.runtime.bench import cell_energy, power_report
from device.runtime.tegrastats import (
    Ina3221Sampler,
    PowerSample,
    TegrastatsSampler,
    find_ina3221,
    integrate_power,
    open_power_source,
    parse_line,
    parse_nvpmodel,
    power_mode,
)

# Real tegrastats lines, verbatim, one per file (tests/data/tegrastats/README.md: captured in
# jetson-stats' tests, [S30] of ../shared/reference/tensorrt_jetson.md §6.1).
DATA = TEST_DATA / "tegrastats"
ORIN_JP6 = (DATA / "orin-jetpack6.txt").read_text().strip()  # GR3D 10%@1300
ORIN_JP7 = (DATA / "agx-orin-jetpack7.txt").read_text().strip()  # GR3D 12%@[1300,1300], rails
THOR = (DATA / "thor.txt").read_text().strip()  # GR3D @[1000,1000,1000]: clocks, no load


def test_jetpack6_orin_line():
    r = parse_line(ORIN_JP6)
    assert (r.ram_used_mb, r.ram_total_mb) == (4722, 7844)
    assert (r.emc_pct, r.emc_freq_mhz) == (2, 1866)
    assert (r.gr3d_pct, r.gr3d_freq_mhz) == (10, (1300,))
    assert r.rails == {} and r.total_power_mw is None and r.total_rail is None
    assert r.timestamp is None and r.cpus == ()


def test_jetpack7_agx_orin_line_with_power_rails():
    r = parse_line(ORIN_JP7)
    assert r.timestamp == "07-25-2026 09:08:28"
    assert (r.ram_used_mb, r.ram_total_mb) == (20642, 62817)
    assert len(r.cpus) == 12 and all(c.online and c.freq_mhz == 2201 for c in r.cpus)
    assert [c.load_pct for c in r.cpus][:3] == [23, 10, 4]
    assert (r.emc_pct, r.emc_freq_mhz) == (3, 3199)
    assert (r.gr3d_pct, r.gr3d_freq_mhz) == (12, (1300, 1300))
    assert r.temps_c == {"cpu": 52.968, "soc2": 48.406, "soc0": 49.531, "gpu": 47.625}
    assert set(r.rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"}
    gpu = r.rails["VDD_GPU_SOC"]
    assert (gpu.mw, gpu.avg_mw, gpu.values) == (5139, 5139, (5139, 5139, 5139))
    # no VDD_IN on AGX Orin: the total is the sum of the rails (jtop's rule)
    assert r.total_rail == "sum of rails"
    assert r.total_power_mw == 5139 + 3268 + 5500 == 13907
    # "RAM 20642/62817MB" and "APE 174" are not rails
    assert "RAM" not in r.rails and "APE" not in r.rails


def test_thor_line_has_gpu_clocks_but_no_load():
    r = parse_line(THOR)
    assert r.gr3d_pct is None  # missing, never 0 % (tensorrt_jetson.md §8 pitfall 14)
    assert r.gr3d_freq_mhz == (1000, 1000, 1000)
    assert (r.ram_used_mb, r.emc_pct) == (4722, 2)


def test_board_input_rail_is_the_total_when_present():
    # Constructed (not captured) lines: a VDD_IN board-input rail as Orin NX / Nano print it,
    # and JetPack 4's unit-less POM_5V_IN form.
    nx = parse_line("RAM 2448/7620MB (lfb 5x4MB) CPU [1%@729,off,off] VDD_IN 4706mW/4600mW "
                    "VDD_CPU_GPU_CV 550mW/550mW VDD_SOC 1414mW/1414mW")
    assert nx.total_rail == "VDD_IN" and nx.total_power_mw == 4706
    assert nx.rails["VDD_IN"].avg_mw == 4600
    assert [c.online for c in nx.cpus] == [True, False, False]
    nano = parse_line("RAM 1000/3964MB (lfb 1x4MB) SWAP 0/1982MB (cached 0MB) POM_5V_IN 2564/2564 "
                      "POM_5V_GPU 40/40")
    assert nano.total_rail == "POM_5V_IN" and nano.total_power_mw == 2564
    assert (nano.swap_used_mb, nano.swap_total_mb, nano.swap_cached_mb) == (0, 1982, 0)


# --- energy ------------------------------------------------------------------------------------
def test_power_integral_by_hand():
    s = [(0.0, 10.0), (1.0, 20.0), (2.0, 10.0)]  # watts
    assert integrate_power(s, 0.0, 2.0) == pytest.approx(30.0)  # two trapezoids of 15 J
    # [0.5, 1.5]: P(0.5) = 15, P(1) = 20, P(1.5) = 15 -> 0.5*17.5 + 0.5*17.5 = 17.5 J
    assert integrate_power(s, 0.5, 1.5) == pytest.approx(17.5)
    assert integrate_power(s, 2.0, 3.0) == pytest.approx(10.0)  # held after the last sample
    # between two samples: P(0.2) = 12, P(0.3) = 13 -> 0.1 * 12.5
    assert integrate_power(s, 0.2, 0.3) == pytest.approx(1.25)
    assert integrate_power(s, 1.0, 1.0) == 0.0 and integrate_power([], 0, 1) == 0.0
    assert integrate_power(s, 0.5, 1.5) / 35 == pytest.approx(0.5)  # 35 tokens: 0.5 J each


def _round(start: float, decode_start: float, decode_s: float, c: int = 2,
           steps: int = 10) -> RoundResult:
    reqs = tuple(RequestRecord(s, 8, steps + 1, 0.0, 0.01, 0.01, decode_start - start + decode_s)
                 for s in range(c))
    return RoundResult(8, c, 0, start, decode_start - start + decode_s, decode_start, decode_s,
                       steps, reqs)


def test_energy_per_token_from_real_lines():
    """Three JetPack 7 samples 0.1 s apart: 13.907 W throughout. A 0.2 s decode phase of
    10 steps x 2 rows = 20 tokens takes 2.7814 J: 0.13907 J per token."""
    rec = parse_line(ORIN_JP7)
    samples = [PowerSample(t, rec.total_power_mw, {k: r.mw for k, r in rec.rails.items()}, rec)
               for t in (0.0, 0.1, 0.2)]
    rnd = _round(start=0.0, decode_start=0.0, decode_s=0.2)
    energy = cell_energy([rnd], samples)
    assert energy is not None
    assert energy.decode_tokens == 20
    assert energy.decode_energy_j == pytest.approx(13.907 * 0.2)
    assert energy.energy_per_token_j == pytest.approx(13.907 * 0.2 / 20)
    assert energy.avg_power_w == pytest.approx(13.907)

    class Source:
        name, total_rail = "tegrastats", rec.total_rail

    power = power_report(Source(), "", samples, [rnd], None, "nvpmodel not found")
    assert power["energy_per_token_j"] == pytest.approx(0.13907)
    assert power["rails_avg_mw"] == {"VDD_CPU_CV": 3268, "VDD_GPU_SOC": 5139, "VIN_SYS_5V0": 5500}
    assert power["tegrastats"]["gr3d_pct_max"] == 12
    assert power["tegrastats"]["temps_c_max"]["gpu"] == 47.625


def test_energy_follows_changing_power():
    # 10 W at 0 s, 20 W from 1 s on (linear in between); the decode phase is [0.5, 1.5] s
    samples = [PowerSample(0.0, 10_000, {}), PowerSample(1.0, 20_000, {}),
               PowerSample(3.0, 20_000, {})]
    energy = cell_energy([_round(start=0.0, decode_start=0.5, decode_s=1.0, c=1, steps=4)],
                         samples)
    assert energy is not None
    # [0.5, 1.0]: (15 + 20)/2 * 0.5 = 8.75; [1.0, 1.5]: 20 * 0.5 = 10 -> 18.75 J over 4 tokens
    assert energy.decode_energy_j == pytest.approx(18.75)
    assert energy.energy_per_token_j == pytest.approx(18.75 / 4)


# --- samplers -----------------------------------------------------------------------------------
def _executable(path: Path, script: str) -> Path:
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_tegrastats_sampler_reads_a_running_process(tmp_path):
    exe = _executable(tmp_path / "tegrastats",
                      f"#!/bin/sh\nwhile true; do echo '{ORIN_JP7}'; sleep 0.02; done\n")
    sampler = TegrastatsSampler(str(exe))
    origin = time.perf_counter()
    sampler.start(lambda: time.perf_counter() - origin)
    deadline = time.monotonic() + 5
    while len(sampler.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    samples = sampler.stop()
    assert len(samples) >= 3 and sampler.total_rail == "sum of rails"
    assert all(s.total_mw == 13907 for s in samples)
    assert [s.t for s in samples] == sorted(s.t for s in samples)
    assert sampler._proc is not None and sampler._proc.poll() is not None  # the child is gone


def _fake_ina3221(root: Path) -> Path:
    hw = root / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    hw.mkdir(parents=True)
    files = {"name": "ina3221\n",
             "in1_label": "VDD_IN\n", "in1_input": "5000\n", "curr1_input": "1200\n",
             "in2_label": "VDD_CPU_GPU_CV\n", "in2_input": "5000\n", "curr2_input": "200 ma\n",
             "in3_label": "NC\n", "in3_input": "0\n", "curr3_input": "0\n",
             "in7_label": "sum of shunt voltages\n", "in7_input": "12\n", "curr7_input": "9\n"}
    for name, text in files.items():
        (hw / name).write_text(text)
    return hw


def test_ina3221_rails_from_sysfs(tmp_path):
    _fake_ina3221(tmp_path)
    channels = find_ina3221(tmp_path)
    assert [c.label for c in channels] == ["VDD_IN", "VDD_CPU_GPU_CV"]  # NC and channel 7 skipped
    sampler = Ina3221Sampler(channels)
    sample = sampler.sample(0.0)
    assert sample.rails_mw == {"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 1000.0}  # mV x mA / 1000
    assert sampler.total_rail == "VDD_IN" and sample.total_mw == 6000.0
    source, why = open_power_source(tmp_path, tegrastats=None)
    assert isinstance(source, Ina3221Sampler) and why == ""
    source.start(time.perf_counter)
    time.sleep(0.25)
    assert len(source.stop()) >= 2


def test_no_power_source_says_why(tmp_path):
    source, why = open_power_source(tmp_path, tegrastats="no-such-tegrastats-here")
    assert source is None and "tegrastats is not on PATH" in why and "INA3221" in why


def test_nvpmodel(tmp_path, monkeypatch):
    assert parse_nvpmodel("NV Power Mode: MAXN\n0\n").name == "MAXN"
    mode = parse_nvpmodel("NV Fan Mode:quiet\nNV Power Mode: 15W\n2\n")
    assert mode is not None and (mode.name, mode.id) == ("15W", 2)
    assert parse_nvpmodel("garbage") is None
    _executable(tmp_path / "nvpmodel", "#!/bin/sh\necho 'NV Power Mode: MAXN_SUPER'\necho 2\n")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    found, why = power_mode()
    assert found is not None and (found.name, found.id) == ("MAXN_SUPER", 2) and why == ""
    missing, why = power_mode("no-such-nvpmodel")
    assert missing is None and "not on PATH" in why
