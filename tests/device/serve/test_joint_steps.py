"""Joint steps (device/serve/scheduler.py, convert/ragged.py): with several slots and a ragged
graph, every decode step runs every row with its draft or a spare token, and each row's
output is the one-slot engine's, token for token, whatever else runs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from engine_helpers import Watching, run
from quantize_fixtures import q_bundle, q_fp32_bundle  # noqa: F401  (fixtures)

from device.runtime.runner import load_bundle
from device.runtime.sampling import SamplingParams
from device.serve.draft_plan import Curve, Row, StepCosts, joint_length
from device.serve.scheduler import GenerationRequest, Scheduler, TextDelta


def bundle(q_bundle: Callable[..., Path], q_fp32_bundle: Callable[..., Path],  # noqa: F811
           precision: str) -> Path:
    return q_fp32_bundle("llama", "cpu") if precision == "fp32" else q_bundle("llama", "cpu", precision)


# text that repeats, and a random model's greedy text soon loops: drafts on offer
REQUESTS = [GenerationRequest(list(range(3, 13)) * 2, 40, ignore_eos=True),
            GenerationRequest(list(range(40, 52)) * 2, 40, ignore_eos=True),
            GenerationRequest(list(range(5, 30)), 40, params=SamplingParams(temperature=0.8, seed=1),
                              ignore_eos=True),
            GenerationRequest(list(range(60, 66)) * 3, 40, ignore_eos=True)]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_rows_stepped_jointly_give_the_one_slot_engines_output(q_bundle, q_fp32_bundle,  # noqa: F811
                                                                precision: str) -> None:
    path = bundle(q_bundle, q_fp32_bundle, precision)
    one = load_bundle(path, slots=1, threads=2)
    four = load_bundle(path, slots=4, threads=2, ragged=True)
    watch = Watching(four.backend)
    engine = Scheduler(watch, four.tokenizer, speculate="ngram")  # type: ignore[arg-type]
    assert engine.joint and engine.decode_mode == "batched" and engine.draft_tokens > 0
    single = Scheduler(one.backend, one.tokenizer, speculate="ngram")
    single.start()
    engine.start()
    try:
        alone = [run(single, r) for r in REQUESTS[:2] + REQUESTS[3:]]
        sampled_alone = run(engine, REQUESTS[2])  # a sampled row: the same alone and together
        watch.seen.clear()
        handles = []
        for r in REQUESTS:  # submitted together: the engine reads the burst, then decodes it
            with engine.reserve() as ticket:
                handles.append(engine.submit(ticket, r))
        together = []
        for h in handles:
            events = list(h.events(timeout=120))
            together.append(("".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]))
    finally:
        engine.close()
        single.close()
    greedy = together[:2] + together[3:]
    assert [text for text, _ in greedy] == [text for text, _ in alone]
    assert together[2][0] == sampled_alone[0]
    assert sum(fin.usage.accepted_tokens for _, fin in greedy) > 0
    joint = [(shape, lengths) for shape, _, lengths in watch.seen if lengths is not None]
    assert joint and all(shape[1] >= 2 and min(lengths) >= 2 for shape, lengths in joint)
    assert any(max(lengths) > 2 for _, lengths in joint)  # drafts verified in a joint step


def test_without_a_ragged_graph_or_drafting_the_engine_steps_as_before(q_fp32_bundle) -> None:  # noqa: F811
    path = q_fp32_bundle("llama", "cpu")
    plain = load_bundle(path, slots=3, threads=1)
    assert not Scheduler(plain.backend, plain.tokenizer).joint  # model.onnx: no lengths
    ragged = load_bundle(path, slots=3, threads=1, ragged=True)
    off = Scheduler(ragged.backend, ragged.tokenizer, speculate="off")
    assert not off.joint and not ragged.backend.spare_token
    per_row = Scheduler(ragged.backend, ragged.tokenizer, decode_mode="per-row")
    assert not per_row.joint


def test_joint_length_takes_the_t_with_the_most_tokens_a_second() -> None:
    costs = StepCosts()
    assert joint_length([Row(0, 0.99, 15)], 4, costs.joint_curve(4)) == 2  # t(4, 2) not timed
    costs.observe(4, 2, 0.040)
    curve = costs.joint_curve(4)
    assert curve is not None
    assert joint_length([Row(s, 0.99, 15) for s in range(4)], 4, curve) == 16  # untimed: tried
    costs.observe(4, 16, 0.190)  # 8 rows: a compute-bound CPU's times, linear in T
    curve = costs.joint_curve(4)
    assert curve is not None and curve.at(9) == pytest.approx(0.115)
    assert joint_length([Row(s, 0.99, 15) for s in range(4)], 4, curve) == 16  # text that copies
    assert joint_length([Row(s, 0.3, 15) for s in range(4)], 4, curve) == 2  # text that does not
    # one rider (no draft) beside three copying rows: t(W, T) <= 3 t(W, 2) = 120 ms
    T = joint_length([Row(s, 0.99, 15) for s in range(3)], 4, curve)
    assert T == 9 and curve.at(T) <= 0.120 < curve.at(T + 1)
    assert joint_length([Row(0, 0.99, 15)], 4, curve) == 2  # three riders: their tokens count more
    flat = Curve(((2, 0.05), (16, 0.05)))  # a memory-bound device: width is free
    assert joint_length([Row(0, 0.5, 15), Row(1, 0.9, 3)], 4, flat) == 16
