"""Target data files and the `toolkit targets` CLI."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from bundle.errors import ToolkitError
from targets import PRECISIONS, list_targets, load_target, target_names, validate

EXPECTED = {"cpu", "jetson", "jetson-orin-nano-8gb", "jetson-orin-nano-super",
            "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-thor"}
JETSONS = sorted(EXPECTED - {"cpu"})
JETSON_FORMATS = {"fp16": "trt-fp16", "int8": "qdq-int8-symmetric",
                  "int4": "qdq-int4-block-weight-only"}


def run(*args: str):
    from toolkit.cli import main

    return CliRunner().invoke(main, list(args))


def test_every_target_file_loads_and_is_consistent():
    assert set(target_names()) == EXPECTED
    for t in list_targets():
        assert validate(t) == [], t.name
        assert t.memory_bandwidth_gbs > 0 and t.description and t.sources
        assert list(t.precisions) == [p for p in PRECISIONS if p in t.precisions]  # order
        assert all(t.peak_tflops[p] > 0 for p in t.precisions)
        assert t.memory_total_bytes() > 0


@pytest.mark.parametrize("name", JETSONS)
def test_jetson_facts_present(name):
    t = load_target(name)
    assert (t.family, t.runtime, t.unified_memory, t.builds_on_device) == (
        "jetson", "tensorrt", True, True)
    assert t.memory_gb and 0 < t.os_reserve_gb < t.memory_gb / 4
    assert t.compute_capability and t.jetpack and t.l4t and t.tensorrt and t.cuda
    assert (t.compute_dtype, t.kv_dtype) == ("float16", "float16")
    assert {p: f for p, f in t.formats.items() if p != "fp8"} == JETSON_FORMATS
    assert any("os_reserve_gb" in n for n in t.notes)  # the reserve is explained
    assert all(re.search(r"\[S\d+b?\]", s) for s in t.sources)  # every source cites a tag


@pytest.mark.parametrize("name", [n for n in JETSONS if n != "jetson-thor"])
def test_orin_is_ampere_jetpack6_without_fp8(name):
    t = load_target(name)
    assert t.precisions == ("fp32", "fp16", "int8", "int4")
    assert (t.compute_capability, t.jetpack, t.tensorrt, t.cuda) == ("8.7", "6.2", "10.3", "12.6")


def test_specific_boards():
    thor = load_target("jetson-thor")
    assert thor.precisions == ("fp32", "fp16", "fp8", "int8", "int4")
    assert thor.formats["fp8"] == "qdq-fp8"
    assert (thor.memory_gb, thor.memory_bandwidth_gbs, thor.compute_capability) == (
        128.0, 273.0, "11.0")
    assert thor.jetpack.startswith("7") and thor.tensorrt == "10.13"
    assert any("UNVERIFIED" in n for n in thor.notes)
    sup = load_target("jetson-orin-nano-super")
    assert (sup.memory_gb, sup.memory_bandwidth_gbs, sup.jetpack) == (8.0, 102.0, "6.2")
    nano = load_target("jetson-orin-nano-8gb")
    assert (nano.memory_gb, nano.memory_bandwidth_gbs) == (8.0, 68.0)
    assert (load_target("jetson-orin-nx-16gb").memory_gb,
            load_target("jetson-agx-orin-64gb").memory_bandwidth_gbs) == (16.0, 204.8)
    family = load_target("jetson")
    assert "family" in family.description and "Orin Nano 8GB" in family.description
    assert (family.memory_gb, family.memory_bandwidth_gbs) == (8.0, 68.0)


def test_agx_orin_gpu_peak_is_the_technical_briefs_170_tops():
    """AGX Orin 64GB: GPU 170 sparse INT8 TOPS + DLAs 105 = the 275 headline (NVIDIA's technical
    brief); the file had 171 (85.5 dense), which does not add up."""
    agx = load_target("jetson-agx-orin-64gb")
    assert agx.peak_tflops["int8"] * 2 + 105 == 275
    assert agx.peak_tflops["fp16"] == agx.peak_tflops["int4"] == agx.peak_tflops["int8"] / 2
    assert "GPU gives 170" in agx.description


def test_cpu_target():
    cpu = load_target("cpu")
    assert cpu.memory_gb is None and cpu.host_memory and not cpu.builds_on_device
    # quantize/: 8-bit MatMulNBits passes the gate where dynamic MatMulInteger does not
    assert cpu.formats == {"int8": "ort-matmulnbits", "int4": "ort-matmulnbits"}
    assert cpu.precisions == ("fp32", "int8", "int4")
    assert (cpu.compute_dtype, cpu.kv_dtype) == ("float32", "float32")


def test_fp8_on_orin_is_a_clear_error():
    with pytest.raises(ToolkitError) as e:
        load_target("jetson-orin-nano-8gb").check_precision("fp8")
    msg = str(e.value)
    assert "cannot run fp8" in msg and "8.9" in msg and "SM 8.7" in msg
    assert "jetson-thor" in msg and "fp32, fp16, int8, int4" in msg
    load_target("jetson-thor").check_precision("fp8")  # Thor runs it


def test_unknown_precision_and_target_errors_list_the_choices():
    with pytest.raises(ToolkitError, match="'fp64' is not a precision"):
        load_target("cpu").check_precision("fp64")
    with pytest.raises(ToolkitError) as e:
        load_target("jetson-nano-2gb")
    assert "unknown target 'jetson-nano-2gb'" in e.value.message
    assert all(name in e.value.message for name in EXPECTED)
    with pytest.raises(ToolkitError, match="unknown target"):
        load_target("../targets/cpu")


def test_cli_targets_table():
    res = run("targets")
    assert res.exit_code == 0, res.output
    for name in EXPECTED:
        assert name in res.output
    for column in ("runtime", "memory", "bandwidth", "precisions", "TensorRT"):
        assert column in res.output
    thor_line = next(line for line in res.output.splitlines() if line.startswith("jetson-thor"))
    assert "fp8" in thor_line and "10.13" in thor_line and "273 GB/s" in thor_line
    assert "host (" in res.output  # the cpu target's memory is the host's


def test_cli_targets_json():
    res = run("targets", "--json")
    assert res.exit_code == 0
    assert {t["name"] for t in json.loads(res.output)} == EXPECTED


def test_cli_targets_show_jetson():
    res = run("targets", "show", "jetson-orin-nano-8gb")
    assert res.exit_code == 0, res.output
    out = res.output
    assert "Engines are built on the device" in out
    assert "only runs on the TensorRT version and GPU that built it" in out
    assert "TensorRT / CUDA" in out and "10.3 / 12.6" in out and "6.2 / 36.4.3" in out
    assert "Sources:" in out and "[S44]" in out
    assert "No fp8" in out


def test_cli_targets_show_cpu_and_unknown():
    res = run("targets", "show", "cpu")
    assert res.exit_code == 0 and "built on the device" not in res.output
    assert "host's own" in res.output
    bad = run("targets", "show", "nope")
    assert bad.exit_code == 1
    assert "unknown target 'nope'" in bad.output and "jetson-thor" in bad.output
