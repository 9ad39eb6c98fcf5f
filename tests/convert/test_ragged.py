"""The ragged graph (convert/ragged.py): rows of different lengths in one step, each computing
bit for bit what it computes alone, and a plain graph wherever it cannot load."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from quantize_fixtures import MAX_SEQ, q_bundle, q_fp32_bundle  # noqa: F401  (fixtures)

from bundle.contract import QUERY_SEQLENS, RAGGED_MODEL_FILE, ROW_SPARES_KEY, SPARE_AT_ATTENTION
from bundle.manifest import read_manifest
from device.runtime.generate import prefill
from device.runtime.ort_backend import OrtDecoderBackend
from device.runtime.runner import load_bundle
from device.serve.scheduler import Scheduler


def bundle(q_bundle: Callable[..., Path], q_fp32_bundle: Callable[..., Path],  # noqa: F811
           precision: str) -> Path:
    return q_fp32_bundle("llama", "cpu") if precision == "fp32" else q_bundle("llama", "cpu", precision)


def test_in_place_bundles_carry_a_ragged_twin_that_shares_the_weights(q_bundle, q_fp32_bundle) -> None:  # noqa: F811
    for precision in ("fp32", "int8", "int4"):
        path = bundle(q_bundle, q_fp32_bundle, precision)
        assert RAGGED_MODEL_FILE in read_manifest(path).files  # hashed like every file
        twin = onnx.load(str(path / RAGGED_MODEL_FILE), load_external_data=False)
        plain = onnx.load(str(path / "model.onnx"), load_external_data=False)
        assert [i.name for i in twin.graph.input] == [i.name for i in plain.graph.input] + [QUERY_SEQLENS]
        gqa = [n for n in twin.graph.node if n.op_type == "GroupQueryAttention"]
        assert gqa and all(n.input[-1] == f"{QUERY_SEQLENS}/i32" for n in gqa)  # + the spare
    jetson = q_fp32_bundle("llama", "jetson-orin-nano-8gb")
    assert not (jetson / RAGGED_MODEL_FILE).exists()  # no GroupQueryAttention to feed


def _restore(backend: OrtDecoderBackend, snapshot: list[np.ndarray]) -> None:
    for c, s in zip(backend.cache.buffers, snapshot):
        c[...] = s


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_ragged_rows_equal_each_row_stepped_alone_bit_for_bit(q_bundle, q_fp32_bundle, precision) -> None:  # noqa: F811
    """Rows of 2..4 real tokens (padded to 4) against each row alone with its spare, as the
    one-slot engine steps: logits and the cache's real positions equal, earlier ones untouched."""
    path = bundle(q_bundle, q_fp32_bundle, precision)
    rag = load_bundle(path, slots=4, threads=2, ragged=True).backend
    assert isinstance(rag, OrtDecoderBackend) and rag.ragged_steps
    rag.spare_token = True
    rng = np.random.default_rng(0)
    starts = [9 + s for s in range(4)]
    for s, n in enumerate(starts):
        prefill(rag, rng.integers(0, rag.vocab_size, n).tolist(), s)
    snapshot = [c.copy() for c in rag.cache.buffers]
    lens = np.array([2, 4, 3, 2])
    ids = rng.integers(0, rag.vocab_size, (4, 4)).astype(np.int64)
    pos = np.array([[p + min(i, n - 1) for i in range(4)] for p, n in zip(starts, lens)], np.int64)
    for b, n in enumerate(lens):
        ids[b, n:] = 0
    out = rag.step(ids, pos, [0, 1, 2, 3], lengths=lens).copy()
    after = [c.copy() for c in rag.cache.buffers]
    for b, (p, n) in enumerate(zip(starts, lens)):
        _restore(rag, snapshot)
        alone = rag.step(ids[b:b + 1, :n], pos[b:b + 1, :n], [b])  # B = 1: the graph's spare
        np.testing.assert_array_equal(alone[0], out[b, :n])
        for got, want, old in zip(after, rag.cache.buffers, snapshot):
            np.testing.assert_array_equal(got[b, :, :p + n], want[b, :, :p + n])
            np.testing.assert_array_equal(got[b, :, :p], old[b, :, :p])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_rows_of_one_token_take_the_graphs_spare_at_the_attention_nodes(q_bundle, q_fp32_bundle,  # noqa: F811
                                                                       precision) -> None:
    """Fed the attention form, a step of several rows gives each row of one real token a spare
    of its own (row spares): every row, of 1..4 tokens, equals bit for bit the same tokens
    stepped alone in the attention form, also in a step of one token a row ([B, 1]), and the
    cache's real positions too. Fed no spare, a row of one token takes the one-query path and
    does not (the reason the spare exists)."""
    path = bundle(q_bundle, q_fp32_bundle, precision)
    rag = load_bundle(path, slots=4, threads=2, ragged=True).backend
    assert isinstance(rag, OrtDecoderBackend) and rag.row_spares
    rag.spare_token, rag.spare_form = True, SPARE_AT_ATTENTION
    rng = np.random.default_rng(3)
    starts = [9 + 2 * s for s in range(4)]
    for s, n in enumerate(starts):
        prefill(rag, rng.integers(0, rag.vocab_size, n).tolist(), s)
    snapshot = [c.copy() for c in rag.cache.buffers]
    for lens in (np.array([1, 4, 1, 2]), np.array([1, 1, 1, 1]), np.array([3, 1, 2, 1])):
        T = int(lens.max())
        ids = rng.integers(0, rag.vocab_size, (4, T)).astype(np.int64)
        pos = np.array([[p + min(i, n - 1) for i in range(T)] for p, n in zip(starts, lens)], np.int64)
        for b, n in enumerate(lens):
            ids[b, n:] = 0
        _restore(rag, snapshot)
        out = rag.step(ids, pos, [0, 1, 2, 3], lengths=lens).copy()
        after = [c.copy() for c in rag.cache.buffers]
        for b, (p, n) in enumerate(zip(starts, lens)):
            _restore(rag, snapshot)
            alone = rag.step(ids[b:b + 1, :n], pos[b:b + 1, :n], [b])  # B = 1: the attention form
            np.testing.assert_array_equal(alone[0], out[b, :n])
            for got, want in zip(after, rag.cache.buffers):
                np.testing.assert_array_equal(got[b, :, :p + n], want[b, :, :p + n])
    _restore(rag, snapshot)
    rag.spare_token = False  # no spare: the joint row of one token rounds otherwise
    ones = rng.integers(0, rag.vocab_size, (4, 1)).astype(np.int64)
    at = np.array([[p] for p in starts], np.int64)
    bare = rag.step(ones, at, [0, 1, 2, 3], lengths=np.ones(4, np.int32)).copy()
    rag.spare_token = True
    _restore(rag, snapshot)
    alone = rag.step(ones[:1], at[:1], [0])
    assert not np.array_equal(alone[0], bare[0])


def test_a_ragged_graph_without_row_spares_leaves_them_to_the_host(q_fp32_bundle, tmp_path: Path) -> None:  # noqa: F811
    """A ragged graph written before row spares (no ROW_SPARES_KEY): joint steps carry each
    row's spare from the host (rows of at least two tokens), as before."""
    copy, original = tmp_path / "b", q_fp32_bundle("llama", "cpu")
    shutil.copytree(original, copy)
    twin = onnx.load(str(copy / RAGGED_MODEL_FILE), load_external_data=False)
    kept = [p for p in twin.metadata_props if p.key != ROW_SPARES_KEY]
    assert len(kept) < len(twin.metadata_props)
    del twin.metadata_props[:]
    twin.metadata_props.extend(kept)
    onnx.save(twin, str(copy / RAGGED_MODEL_FILE))
    m = read_manifest(copy)
    backend = OrtDecoderBackend(copy / "model.onnx", m.kv_layout(), m.dims.vocab_size, slots=3,
                                threads=1, ragged=True)
    assert backend.ragged_steps and not backend.row_spares
    engine = Scheduler(backend, load_bundle(original, slots=1, threads=1).tokenizer)
    assert engine.joint and not engine.row_spares and engine.joint_spare == "host token"


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_full_length_rows_compute_what_the_plain_graph_does(q_bundle, q_fp32_bundle, precision) -> None:  # noqa: F811
    path = bundle(q_bundle, q_fp32_bundle, precision)
    rag = load_bundle(path, slots=3, threads=2, ragged=True).backend
    plain = load_bundle(path, slots=3, threads=2).backend
    assert rag.ragged_steps and not plain.ragged_steps
    rng = np.random.default_rng(1)
    for s in range(3):
        prompt = rng.integers(0, rag.vocab_size, 5 + s).tolist()
        for b in (rag, plain):
            prefill(b, prompt, s)
    ids = rng.integers(0, rag.vocab_size, (3, 1)).astype(np.int64)
    pos = np.array([[5], [6], [7]], np.int64)
    np.testing.assert_array_equal(rag.step(ids, pos, [0, 1, 2]), plain.step(ids, pos, [0, 1, 2]))
    for spare in (True, False):  # batch 1: the lengths the graph adds for its spare
        rag.spare_token = plain.spare_token = spare
        two = rng.integers(0, rag.vocab_size, (1, 2)).astype(np.int64)
        at = np.array([[8, 9]], np.int64)
        np.testing.assert_array_equal(rag.step(two, at, [0]), plain.step(two, at, [0]))


def test_one_slot_or_ragged_off_loads_the_plain_graph_and_refuses_lengths(q_fp32_bundle) -> None:  # noqa: F811
    path = q_fp32_bundle("llama", "cpu")
    for slots, ragged in ((1, True), (2, False)):
        backend = load_bundle(path, slots=slots, threads=1, ragged=ragged).backend
        assert not backend.ragged_steps
        with pytest.raises(ValueError, match="per-row lengths"):
            backend.step(np.zeros((1, 2), np.int64), np.array([[3, 4]]), [0], lengths=np.array([2]))


def test_a_ragged_graph_this_runtime_refuses_falls_back_to_the_plain_one(
        q_fp32_bundle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """What a board with ONNX Runtime 1.23 (Python 3.10, JetPack 6) meets: an input its
    GroupQueryAttention does not know. Simulated by a twin that does not load."""
    copy = tmp_path / "b"
    shutil.copytree(q_fp32_bundle("llama", "cpu"), copy)
    (copy / RAGGED_MODEL_FILE).write_bytes(b"not a graph this runtime takes")
    m = read_manifest(copy)
    caplog.set_level("INFO", "toolkit.runtime")
    backend = OrtDecoderBackend(copy / "model.onnx", m.kv_layout(), m.dims.vocab_size, slots=2,
                                threads=1, ragged=True)
    assert not backend.ragged_steps
    assert "does not load here" in caplog.text
    assert backend.step(np.zeros((2, 1), np.int64), np.zeros((2, 1), np.int64), [0, 1]).shape[0] == 2


def test_the_fallback_line_keeps_the_reason_not_the_node_signature(
        q_fp32_bundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """ORT's refusal is one line of ~900 characters (the node's whole signature), its reason at
    the end: the log keeps that end."""
    import device.runtime.ort_backend as ob

    real = ob.open_session
    why = "has input size 17 not in range [min=7, max=12]."

    def refuse_the_twin(model: Path, *args: Any, **kwargs: Any) -> Any:
        if Path(model).name == RAGGED_MODEL_FILE:
            raise RuntimeError(f"[ONNXRuntimeError] : 10 : INVALID_GRAPH : In Node, ({'x' * 900}) {why}")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(ob, "open_session", refuse_the_twin)
    bundle = q_fp32_bundle("llama", "cpu")
    m = read_manifest(bundle)
    caplog.set_level("INFO", "toolkit.runtime")
    OrtDecoderBackend(bundle / "model.onnx", m.kv_layout(), m.dims.vocab_size, slots=2, threads=1,
                      ragged=True)
    (line,) = [r.getMessage() for r in caplog.records if "does not load here" in r.getMessage()]
    assert why in line and len(line) < 260


def test_bound_steps_of_every_shape_share_one_logits_buffer(q_fp32_bundle) -> None:  # noqa: F811
    """Joint steps run many (rows, tokens) shapes; each cached binding used to own its logits
    buffer, sum(B x T) x V floats in all (SmolLM2, 8 slots: up to 0.9 GB). Now they are views of
    one buffer at most twice the largest step's logits, and each step's logits are its own."""
    backend = load_bundle(q_fp32_bundle("llama", "cpu"), slots=4, threads=1, ragged=True).backend
    rng = np.random.default_rng(2)
    for s in range(4):
        prefill(backend, rng.integers(0, backend.vocab_size, 6).tolist(), s)
    largest = 0
    for B in (2, 4, 3):
        for T in (2, 5, 3):
            ids = rng.integers(0, backend.vocab_size, (B, T)).astype(np.int64)
            pos = 6 + np.tile(np.arange(T), (B, 1))
            got = backend.step(ids, pos, list(range(B)), lengths=np.full(B, T)).copy()
            again = backend.step(ids, pos, list(range(B)), lengths=np.full(B, T))  # the same cache rows
            np.testing.assert_array_equal(got, again)
            largest = max(largest, again.nbytes)
    views = [entry[-1][0] for entry in backend._bound.values()]
    assert len(views) > 1 and all(np.shares_memory(v, backend._logits) for v in views)
    assert backend._logits.nbytes <= 2 * largest
