"""bundle/: the typed manifest, its one codec and generated schema, schema-1 migration, and the
layers' import rules (the host-device contract imports nothing else; the device only it)."""

from __future__ import annotations

import ast
import io
import json
import shutil

import jsonschema
import pytest
from paths import REPO, TEST_DATA

from bundle.errors import ToolkitError
from bundle.manifest import (
    SCHEMA_VERSION,
    Manifest,
    load_verified,
    parse_manifest,
    read_manifest,
)
from bundle.progress import Steps
from bundle.schema import manifest_schema, render

ROOT, DATA = REPO, TEST_DATA
V1 = sorted((DATA / "manifests-v1").glob("manifest-v1-*.json"))  # written by toolkit 0.1 (a473340)


# --- the schema --------------------------------------------------------------------------------
def test_docs_schema_is_generated_from_the_records():
    assert (ROOT / "docs" / "manifest.schema.json").read_text() == render(), \
        "docs/manifest.schema.json is stale: run `python -m bundle.schema > docs/manifest.schema.json`"


@pytest.mark.parametrize("target", ["cpu", "jetson"])
def test_written_manifests_validate_against_the_schema_and_round_trip(tiny_bundle, target):
    bundle = tiny_bundle("llama", target)
    data = json.loads((bundle / "manifest.json").read_text())
    jsonschema.validate(data, manifest_schema())
    m = read_manifest(bundle)
    assert json.loads(m.to_json()) == data  # one codec: what is read is what was written
    assert Manifest.from_dict(json.loads(m.to_json())) == m


def test_every_fact_is_stored_once(tiny_bundle):
    """max_seq, the cache's layers/heads/head_dim and the decoder IO appear once in the JSON;
    the layout and the IO are derived from them."""
    m = read_manifest(tiny_bundle("llama"))
    data = json.loads(m.to_json())
    assert "kv_cache" not in data and data["contract"]["inputs"] is None
    assert json.dumps(data).count('"max_seq"') == 1
    kv = m.kv_layout()
    assert (kv.num_layers, kv.kv_heads, kv.head_dim, kv.max_seq) == (
        m.dims.num_layers, m.dims.kv_heads, m.dims.head_dim, m.max_seq)
    shapes = {t.name: t.shape for t in m.decoder_contract().inputs}
    assert shapes["past_key.0"] == ("batch", m.dims.kv_heads, m.max_seq, m.dims.head_dim)


def test_the_target_record_carries_what_a_board_builds_with(tiny_bundle):
    from targets import load_target

    m = read_manifest(tiny_bundle("llama", "jetson"))
    orin = load_target(m.target.name)
    assert m.target == orin.record()
    assert m.target.tensorrt == orin.tensorrt and m.target.compute_capability == orin.compute_capability
    assert m.target.memory_bytes == orin.memory_total_bytes()
    assert m.target.engine.workspace_bytes == orin.workspace_bytes()
    assert read_manifest(tiny_bundle("llama")).target.memory_bytes is None  # cpu: the host's


# --- reading bad manifests: one ToolkitError naming the field, never a traceback ----------------
def _base(tiny_bundle) -> dict:
    return json.loads((tiny_bundle("llama") / "manifest.json").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(target="cpu"), "manifest.target: expected an object"),
    (lambda d: d["target"].update(runtime="vulkan"), "manifest.target.runtime: expected one of"),
    (lambda d: d.update(max_seq="64"), "manifest.max_seq: expected an integer"),
    (lambda d: d.update(max_seq=True), "manifest.max_seq: expected an integer"),
    (lambda d: d["contract"].pop("opset"), "'opset' is missing"),
    (lambda d: d["files"].update({"x": {"sha256": "ab"}}), "manifest.files.x: the required field 'bytes'"),
    (lambda d: d.update(model_file="/etc/passwd"), "is an absolute path"),
    (lambda d: d.update(model_file="../other/model.onnx"), "leaves the bundle folder"),
    (lambda d: d["tokenizer"].update(path="../../x"), "manifest.tokenizer.path"),
    (lambda d: d["contract"].update(kv_dtype=None), "a decoder needs"),
    # every named path is normalised, inside the bundle and hashed (issue #16, item 6)
    (lambda d: d.update(model_file="./model.onnx"), "is not normalised"),
    (lambda d: d["tokenizer"].update(chat_template="tokenizer//chat_template.jinja"), "is not normalised"),
    (lambda d: d.update(model_file="report.md.onnx"), "'report.md.onnx' is not among the hashed files"),
    (lambda d: d["files"].pop("model.onnx"), "manifest.model_file 'model.onnx' is not among"),
    (lambda d: d["tokenizer"].update(path="engines"), "manifest.tokenizer.path 'engines' is not among"),
    (lambda d: d["files"].update({"../x": {"sha256": "0" * 64, "bytes": 1}}), "manifest.files '../x' leaves"),
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "upgrade the toolkit"),
    (lambda d: d.update(schema_version=0), "re-convert"),
    # impossible numbers: refused here, not as a terabyte allocation or a graph error later on
    (lambda d: d.update(max_seq=10 ** 12), "max_seq is 1000000000000; this decoder's cache holds 1 to"),
    (lambda d: d.update(max_seq=0), "manifest.max_seq is 0"),
    (lambda d: d.update(batch=0), "manifest.batch is 0"),
    (lambda d: d["architecture"]["dims"].update(num_layers=-2), "dims.num_layers is -2"),
    (lambda d: d["architecture"]["dims"].update(vocab_size=0), "dims.vocab_size is 0"),
    (lambda d: d["architecture"]["dims"].update(norm_eps=-1.0), "dims.norm_eps is -1.0"),
])
def test_a_bad_manifest_is_one_clear_error(tiny_bundle, change, message):
    data = _base(tiny_bundle)
    change(data)
    with pytest.raises(ToolkitError) as e:
        parse_manifest(json.dumps(data))
    assert message in str(e.value)


def test_deeply_nested_json_is_an_error_not_a_crash():
    with pytest.raises(ToolkitError, match="not valid JSON|expected"):
        parse_manifest("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ToolkitError, match="not a toolkit manifest"):
        parse_manifest("[1, 2]")


def test_the_device_store_refuses_a_bad_manifest_with_its_code(tiny_bundle):
    from device.store.store import StoreError
    from device.store.store import parse_manifest as store_parse

    data = _base(tiny_bundle)
    data["target"] = ["not", "an", "object"]
    with pytest.raises(StoreError) as e:
        store_parse(json.dumps(data).encode())
    assert e.value.code == "bad_manifest" and "manifest.target" in e.value.message


# --- schema 1 (toolkit 0.1) ------------------------------------------------------------------
@pytest.mark.parametrize("path", V1, ids=lambda p: p.stem)
def test_schema_1_manifests_are_migrated(path):
    v1 = json.loads(path.read_text())
    assert v1["schema_version"] == 1
    m = parse_manifest(path.read_text(), path.name)
    assert m.schema_version == SCHEMA_VERSION and m.kind == v1["kind"]
    assert m.target.name == v1["target"]["name"] and m.precision == v1["precision"]
    assert {k: (e.sha256, e.bytes) for k, e in m.files.items()} == {
        k: (e["sha256"], e["bytes"]) for k, e in v1["files"].items()}
    if m.kind == "decoder":  # what 0.1 stored three times comes out as one fact, unchanged
        assert m.kv_layout().to_json() == v1["kv_cache"]
        io = m.decoder_contract()
        assert [t.to_json() for t in io.inputs] == v1["contract"]["inputs"]
        assert [t.to_json() for t in io.outputs] == v1["contract"]["outputs"]
        assert m.plan is not None and m.plan.row(v1["plan"]["precision"]) is not None
    if v1.get("quantization"):
        assert m.quantization is not None and m.quantization.gate is not None
        assert m.quantization.gate.passed == v1["quantization"]["gate"]["passed"]
    if m.target.runtime == "tensorrt":
        assert m.target.tensorrt == v1["target"]["engine"]["tensorrt"]
        assert m.target.engine.workspace_bytes is None  # 0.1 did not record it: TensorRT's default
    jsonschema.validate(json.loads(m.to_json()), manifest_schema())


def test_a_schema_1_manifest_that_cannot_be_read_says_reconvert():
    v1 = json.loads(V1[0].read_text())
    del v1["contract"]
    with pytest.raises(ToolkitError, match="re-convert"):
        parse_manifest(json.dumps(v1))


def test_a_bundle_written_by_0_1_is_served(tmp_path):
    """The whole path: a bundle converted by toolkit 0.1 loads, verifies and generates."""
    from device.runtime.generate import generate
    from device.runtime.runner import load_bundle

    bundle = tmp_path / "b"
    shutil.copytree(DATA / "bundle-v1-llama-cpu", bundle)
    assert json.loads((bundle / "manifest.json").read_text())["schema_version"] == 1
    m = load_verified(bundle)
    runner = load_bundle(bundle, slots=1, threads=1)
    try:
        prompt = runner.tokenizer.encode("hello world")
        assert len(list(generate(runner.backend, prompt, 6))) == 6  # greedy, no stop ids
    finally:
        runner.close()
    assert m.kv_layout().max_seq == 64


# --- the layers ------------------------------------------------------------------------------
PROJECT = ("bundle", "device", "host", "toolkit", "convert", "quantize", "targets", "models")


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (module level and inside functions)."""
    graph: dict[str, set[str]] = {}
    for pkg in PROJECT:
        for path in (ROOT / pkg).rglob("*.py"):
            mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module
                         and node.level == 0 else [])
                found |= {n for n in names if n.split(".")[0] in PROJECT}
            graph[mod.removesuffix(".__init__")] = found
    return graph


def test_layers_import_only_downwards():
    graph = _imports()
    for mod, deps in graph.items():
        tops = {d.split(".")[0] for d in deps}
        if mod.startswith("bundle"):
            assert tops <= {"bundle"}, (mod, deps)
        if mod.startswith("device"):
            assert tops <= {"bundle", "device"}, (mod, deps)
        if not mod.startswith("toolkit"):
            assert "toolkit" not in tops, (mod, deps)


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in graph.get(mod, ()):
            dep = dep if dep in graph else dep.rsplit(".", 1)[0]  # `from pkg import name`
            if dep == mod or dep not in graph:
                continue
            assert state.get(dep) != 1, "import cycle: " + " -> ".join([*path, mod, dep])
            if dep not in state:
                visit(dep, [*path, mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])


# --- bundle/progress.py: one line per step, what a step says in between on lines of its own
def test_a_progress_step_is_one_line_and_what_it_says_gets_lines_of_its_own() -> None:
    out = io.StringIO()
    steps = Steps(3, out=out)
    with steps.step("loading"):
        pass
    with steps.step("quantizing"):
        steps.say("    calibration 8/32 samples")
        with steps.step("accuracy gate"):  # a step inside a step
            pass
    with pytest.raises(ValueError), steps.step("writing"):
        raise ValueError("disk full")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[1/3] loading … ") and lines[0].endswith("s")
    assert lines[1] == "[2/3] quantizing …"
    assert lines[2] == "    calibration 8/32 samples"
    assert lines[3].startswith("[3/3] accuracy gate … ") and lines[3].endswith("s")
    assert lines[4].startswith("  … ") and lines[4].endswith("s")
    assert lines[5] == "[4/3] writing … failed"
    assert set(steps.timings) == {"loading", "quantizing", "accuracy gate"}


def test_quiet_progress_steps_print_nothing_and_still_time() -> None:
    out = io.StringIO()
    steps = Steps(out=out, quiet=True)
    with steps.step("exporting"):
        steps.say("hidden")
    assert out.getvalue() == "" and "exporting" in steps.timings
