"""The spare token of batch-1 steps (convert/spare_token.py): with one slot, a one-token step
gives exactly the logits the same token gets inside a longer step, at fp32, int8 and int4, so
drafting stays on and cannot change greedy output; several slots keep batched decode as it was.
Both forms (through the whole graph, at the attention nodes only) are checked."""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from engine_helpers import Watching
from quantize_fixtures import MAX_SEQ, q_bundle, q_fp32_bundle  # noqa: F401  (fixtures)

from bundle.contract import SPARE_AT_ATTENTION, SPARE_TOKEN, SPARE_WHOLE
from device.runtime.draft import VERIFY_TOLERANCE, verify_step_deviation
from device.runtime.generate import generate, prefill
from device.runtime.runner import load_bundle


def bundle(q_bundle: Callable[..., Path], q_fp32_bundle: Callable[..., Path],  # noqa: F811
           precision: str) -> Path:
    return q_fp32_bundle("llama", "cpu") if precision == "fp32" else q_bundle("llama", "cpu", precision)


def test_in_place_graphs_take_the_spare_token_and_others_do_not(q_fp32_bundle) -> None:  # noqa: F811
    model = onnx.load(str(q_fp32_bundle("llama", "cpu") / "model.onnx"), load_external_data=False)
    spare = next(i for i in model.graph.input if i.name == SPARE_TOKEN)
    assert spare.type.tensor_type.elem_type == onnx.TensorProto.INT32
    assert not spare.type.tensor_type.shape.dim
    readers = [n for n in model.graph.node if {"input_ids", "position_ids"} & set(n.input)]
    assert all(n.name.startswith("spare_token/") for n in readers)  # the rest read the padded ones
    jetson = onnx.load(str(q_fp32_bundle("llama", "jetson-orin-nano-8gb") / "model.onnx"),
                       load_external_data=False)
    assert SPARE_TOKEN not in {i.name for i in jetson.graph.input}  # host-written cache: none


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_with_a_spare_one_token_steps_equal_longer_steps_bit_for_bit(q_bundle, q_fp32_bundle,  # noqa: F811
                                                                    precision) -> None:
    from device.serve.scheduler import spare_form

    backend = load_bundle(bundle(q_bundle, q_fp32_bundle, precision), slots=1, threads=2).backend
    assert backend.spare_forms == (SPARE_WHOLE, SPARE_AT_ATTENTION)  # the graph says so, quantized too
    form = spare_form(backend, 4)  # the daemon's pick: the attention form where it is exact
    if platform.machine() in ("x86_64", "AMD64") and precision != "int4":
        # the one one-row kernel of these graphs is the attention's (the tiny int4's MatMulNBits,
        # K = 64, has its own: |diff| ~1e-6, where SmolLM2's int4, K = 576 and 640, has none)
        assert form == SPARE_AT_ATTENTION
    for backend.spare_form in sorted({SPARE_WHOLE, form}):
        backend.spare_token = True
        for k in (1, 4, 15):
            assert verify_step_deviation(backend, k) == 0.0
    if platform.machine() in ("x86_64", "AMD64") and precision == "fp32":
        # without it MLAS's one-row kernels round differently: what it is for
        backend.spare_token = False
        assert 0.0 < verify_step_deviation(backend, 4) <= VERIFY_TOLERANCE


def test_the_last_cache_position_and_a_full_prefill_run_without_a_spare(q_fp32_bundle) -> None:  # noqa: F811
    backend = load_bundle(q_fp32_bundle("llama", "cpu"), slots=1, threads=2).backend
    ids = np.random.default_rng(0).integers(0, backend.vocab_size, MAX_SEQ).tolist()
    last = []
    for spare in (True, False):  # the last step writes the cache's last position: no room
        backend.spare_token = spare
        prefill(backend, ids[:MAX_SEQ - 1], 0)
        last.append(backend.step(np.array([[ids[-1]]], np.int64), np.array([[MAX_SEQ - 1]], np.int64),
                                 [0])[0, -1].copy())
    np.testing.assert_array_equal(last[0], last[1])  # the same one-token step both times
    backend.spare_token = True
    whole = backend.step(np.array([ids], np.int64), np.arange(MAX_SEQ, dtype=np.int64)[None], [0])
    np.testing.assert_allclose(whole[0, -1], last[0], atol=1e-4)


def test_a_batch_of_rows_never_takes_a_spare(q_fp32_bundle) -> None:  # noqa: F811
    """Asked for one with batch > 1 (which the engine never does), the graph still runs: the
    attention kernel refuses several tokens per row over a cache for batch > 1."""
    two = load_bundle(q_fp32_bundle("llama", "cpu"), slots=2, threads=2).backend
    two.spare_token = True
    rng = np.random.default_rng(1)
    for s in (0, 1):
        prefill(two, rng.integers(0, two.vocab_size, 5 + s).tolist(), s)
    out = two.step(rng.integers(0, two.vocab_size, (2, 1)), np.array([[5], [6]], np.int64), [0, 1])
    assert out.shape == (2, 1, two.vocab_size) and np.isfinite(out).all()


def test_int4_drafts_in_a_one_slot_engine_and_only_greedy_rows_pay_for_it(q_bundle) -> None:  # noqa: F811
    from device.runtime.sampling import SamplingParams
    from device.serve.scheduler import GenerationRequest, Scheduler, TextDelta

    runner = load_bundle(q_bundle("llama", "cpu", "int4"), slots=1, threads=2)
    watch = Watching(runner.backend)
    on = Scheduler(watch, runner.tokenizer, speculate="ngram")  # type: ignore[arg-type]
    assert on.draft_tokens > 0  # the probe found verify steps exact: drafting stays on
    off = Scheduler(runner.backend, runner.tokenizer, speculate="off")
    ids = list(range(3, 13)) * 2  # text that repeats: drafts on offer
    outs = []
    for engine in (on, off):  # one after the other: both share the backend's one slot
        engine.start()
        try:
            with engine.reserve() as ticket:
                handle = engine.submit(ticket, GenerationRequest(ids, 24))
            events = list(handle.events(timeout=60))
            outs.append(("".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]))
            if engine is on:
                watch.seen.clear()
                with engine.reserve() as ticket:
                    sampled = engine.submit(ticket, GenerationRequest(ids, 8, params=SamplingParams(
                        temperature=0.8, seed=1)))
                list(sampled.events(timeout=60))
        finally:
            engine.close()
    assert outs[0][0] == outs[1][0]  # drafted int4 output is plain greedy's, token for token
    assert outs[0][1].usage.drafted_tokens > 0 and outs[1][1].usage.drafted_tokens == 0
    decode = [spare for shape, spare, _ in watch.seen if shape[1] == 1]
    assert decode and not any(decode)  # the sampled row's one-token steps took no spare


def test_int4_batches_with_a_lone_row_paired(q_bundle) -> None:  # noqa: F811
    """ONNX Runtime 1.32's 4-bit MatMulNBits sums one row apart from two or more (AVX2 hosts),
    so an int4 engine with several slots steps a lone row beside a padding row: its output is
    then the same alone as batched, and batching stays on. Which batch sizes agree is the CPU's
    kernels' business: on an AVX512-VNNI/AMX host (2026-12-05) the tiny model's third row of a
    3-row step differed from the same row in 4 (2.4e-4) while SmolLM2's agreed at every size.
    Where no lone-row form makes every size agree, the engine must decode per row; either way
    a row's output is the same alone as among others."""
    from device.serve.scheduler import GenerationRequest, Scheduler, TextDelta, probe_batch_invariance

    runner = load_bundle(q_bundle("llama", "cpu", "int4"), slots=4, threads=2)
    lone = probe_batch_invariance(runner.backend)
    engine = Scheduler(runner.backend, runner.tokenizer, speculate="off")
    assert engine.decode_mode == ("per-row" if lone is None else "batched")
    engine.start()
    prompts = [list(range(3 + i, 20 + i)) for i in range(3)]
    try:
        def text(handle: Any) -> str:
            return "".join(e.text for e in handle.events(timeout=60) if isinstance(e, TextDelta))

        with engine.reserve() as ticket:
            alone = text(engine.submit(ticket, GenerationRequest(prompts[0], 16)))
        handles = []
        for ids in prompts:
            with engine.reserve() as ticket:
                handles.append(engine.submit(ticket, GenerationRequest(ids, 16)))
        together = [text(h) for h in handles]
    finally:
        engine.close()
    assert together[0] == alone


def test_the_attention_form_runs_the_spare_through_the_attention_nodes_alone(q_fp32_bundle) -> None:  # noqa: F811
    """The spare's key, one position past a one-token step, is what its input was: token 0's
    key through the whole graph, a zero row's key (zero: RoPE of zero) at the attention only.
    The step's own logits and keys are the same in both forms."""
    backend = load_bundle(q_fp32_bundle("llama", "cpu"), slots=1, threads=2).backend
    ids = np.random.default_rng(3).integers(1, backend.vocab_size, 6).tolist()
    seen = {}
    for form in (SPARE_WHOLE, SPARE_AT_ATTENTION):
        backend.spare_token, backend.spare_form = True, form
        prefill(backend, ids[:5], 0)
        logits = backend.step(np.array([[ids[5]]], np.int64), np.array([[5]], np.int64), [0])[0, -1].copy()
        seen[form] = logits, backend.read_kv(0, 0, 7).data.copy()  # [2L, Hkv, 7, D]
    (whole, whole_kv), (attention, attention_kv) = seen[SPARE_WHOLE], seen[SPARE_AT_ATTENTION]
    assert np.abs(whole_kv[:, :, 6]).max() > 0.0  # token 0's key and value
    assert not attention_kv[:, :, 6].any()  # a zero row's
    np.testing.assert_array_equal(whole_kv[:, :, :6], attention_kv[:, :, :6])
    np.testing.assert_array_equal(whole, attention)


def test_the_daemon_picks_the_attention_form_only_where_it_is_exact(q_fp32_bundle) -> None:  # noqa: F811
    from device.serve.scheduler import spare_form

    backend = load_bundle(q_fp32_bundle("llama", "cpu"), slots=1, threads=2).backend
    assert spare_form(backend, 4) == SPARE_AT_ATTENTION

    class RoundsAlone(Watching):
        """A one-row kernel of its own in the attention form: one-token steps round differently."""

        def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any, **kw: Any) -> np.ndarray:
            out = super().step(ids, pos, slots, *rest, **kw)
            if ids.shape[1] == 1 and self.spare_form == SPARE_AT_ATTENTION:
                out = out + np.float32(1e-5)
            return out

    assert spare_form(RoundsAlone(backend), 4) == SPARE_WHOLE


def test_a_one_slot_engine_steps_greedy_rows_with_the_form_it_picked(q_fp32_bundle) -> None:  # noqa: F811
    from engine_helpers import run

    from device.serve.scheduler import GenerationRequest, Scheduler

    runner = load_bundle(q_fp32_bundle("llama", "cpu"), slots=1, threads=2)
    engine = Scheduler(runner.backend, runner.tokenizer)
    assert (engine.spare, runner.backend.spare_form) == ("attention", SPARE_AT_ATTENTION)
    ids = runner.tokenizer.encode("a b c a b c a b c a b")
    engine.start()
    try:
        text, final = run(engine, GenerationRequest(ids, max_tokens=24, ignore_eos=True))
    finally:
        engine.close()
    backend = load_bundle(q_fp32_bundle("llama", "cpu"), slots=1, threads=2).backend
    backend.spare_token = True  # the whole form, token by token: the same text
    assert runner.tokenizer.decode(list(generate(backend, ids, 24))) == text
    assert final.usage.completion_tokens == 24 and final.usage.drafted_tokens > 0  # it verified drafts


def test_a_graph_older_than_the_attention_form_gets_the_whole_form_unprobed(q_fp32_bundle) -> None:  # noqa: F811
    """Such a graph reads 2 as 1, so a probe would pass and the status would name a form the
    graph does not have: its metadata (no SPARE_FORMS_KEY) says so first."""
    from device.serve.scheduler import spare_form

    class Older(Watching):
        spare_forms = (SPARE_WHOLE,)  # type: ignore[assignment]

    older = Older(load_bundle(q_fp32_bundle("llama", "cpu"), slots=1, threads=2).backend)
    assert spare_form(older, 4) == SPARE_WHOLE and not older.seen  # no step run
