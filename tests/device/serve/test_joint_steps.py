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


def burst(engine: Scheduler, requests: list[GenerationRequest]) -> list[str]:
    """Submitted together: the engine reads the burst, then decodes it; the texts."""
    handles = []
    for r in requests:
        with engine.reserve() as ticket:
            handles.append(engine.submit(ticket, r))
    return ["".join(e.text for e in h.events(timeout=120) if isinstance(e, TextDelta)) for h in handles]


SAMPLED = [GenerationRequest(list(range(5 + i, 30)), 24, params=SamplingParams(temperature=0.8, seed=i),
                             ignore_eos=True) for i in range(3)]


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_rows_stepped_jointly_give_the_one_slot_engines_output(q_bundle, q_fp32_bundle,  # noqa: F811
                                                                precision: str) -> None:
    """Greedy rows beside each other and a sampled row: each the one-slot engine's text. Sampled
    rows among themselves take the plain batched step (no spare): each the same as alone."""
    path = bundle(q_bundle, q_fp32_bundle, precision)
    one = load_bundle(path, slots=1, threads=2)
    four = load_bundle(path, slots=4, threads=2, ragged=True)
    watch = Watching(four.backend)
    engine = Scheduler(watch, four.tokenizer, speculate="ngram")  # type: ignore[arg-type]
    assert engine.joint and engine.draft_tokens > 0 and engine.draft_steps == "joint"
    single = Scheduler(one.backend, one.tokenizer, speculate="ngram")
    single.start()
    engine.start()
    try:
        alone = [run(single, r)[0] for r in REQUESTS[:2] + REQUESTS[3:]]
        watch.seen.clear()
        together = burst(engine, REQUESTS)
        mixed = list(watch.seen)
        sampled_alone = [run(engine, r)[0] for r in SAMPLED]
        watch.seen.clear()
        sampled_together = burst(engine, SAMPLED)
        sampled_steps = list(watch.seen)
    finally:
        engine.close()
        single.close()
    assert together[:2] + together[3:] == alone
    joint = [(shape, lengths) for shape, _, lengths in mixed if lengths is not None]
    # rows without a draft: one token where the graph gives it its spare (row spares: the
    # attention form, which the tiny model's 4-bit blocks of 64 do not keep exact), else two
    assert engine.row_spares == (precision != "int4")
    assert engine.joint_spare == ("attention" if engine.row_spares else "host token")
    least = 1 if engine.row_spares else 2
    assert joint and all(shape[1] >= least and min(lengths) == least for shape, lengths in joint)
    assert any(max(lengths) > 2 for _, lengths in joint)  # drafts verified in a joint step
    assert sampled_together == sampled_alone
    decode = [(shape, spare, lengths) for shape, spare, lengths in sampled_steps if shape[1] == 1]
    assert decode and not any(spare or lengths is not None for _, spare, lengths in decode)
    assert all(lengths is None for _, _, lengths in sampled_steps)  # no joint step: none may draft


def test_lone_rows_take_the_whole_form_where_the_attention_form_breaks_joint_steps(q_fp32_bundle) -> None:  # noqa: F811
    """Lone rows take the spare's attention form only where ragged rows still equal them."""
    import numpy as np

    from bundle.contract import SPARE_AT_ATTENTION, SPARE_WHOLE

    class LoneRowsApart(Watching):
        """Steps of one row (no lengths) in the attention form round apart from ragged rows;
        among themselves, single and multi-token, they agree (so spare_form picks it)."""

        def step(self, ids, pos, slots, *rest, **kw):  # type: ignore[no-untyped-def]
            out = super().step(ids, pos, slots, *rest, **kw)
            if kw.get("lengths") is None and self.spare_form == SPARE_AT_ATTENTION:
                out = out + np.float32(1e-5)
            return out

    three = load_bundle(q_fp32_bundle("llama", "cpu"), slots=3, threads=1, ragged=True)
    engine = Scheduler(LoneRowsApart(three.backend), three.tokenizer)  # type: ignore[arg-type]
    assert engine.joint and (engine.spare, three.backend.spare_form) == ("whole graph", SPARE_WHOLE)
    plain = Scheduler(Watching(three.backend), three.tokenizer)  # type: ignore[arg-type]
    assert plain.joint and (plain.spare, three.backend.spare_form) == ("attention", SPARE_AT_ATTENTION)


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


def test_with_row_spares_a_joint_step_without_drafts_is_one_token_wide() -> None:
    """base 1 (the graph's row spares): T = 1 is the step with no draft, the riders' bound is
    counted from it, and text that does not copy takes it."""
    costs = StepCosts()
    costs.observe(4, 16, 0.190)
    assert costs.joint_curve(4, 1) is None
    assert joint_length([Row(0, 0.99, 15)], 4, costs.joint_curve(4, 1), 1) == 1  # t(4, 1) not timed
    costs.observe(4, 1, 0.022)
    costs.observe(4, 16, 0.190)
    curve = costs.joint_curve(4, 1)
    assert curve is not None and curve.points[0] == (1, 0.022)
    assert joint_length([Row(s, 0.3, 15) for s in range(4)], 4, curve, 1) == 1  # text that does not
    assert joint_length([Row(s, 1.0, 15) for s in range(4)], 4, curve, 1) == 16  # text that copies
    T = joint_length([Row(s, 0.99, 15) for s in range(3)], 4, curve, 1)  # one rider: <= 3 t(4, 1)
    assert curve.at(T) <= 3 * 0.022 < curve.at(T + 1)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_row_at_the_cache_end_keeps_joint_steps_within_the_cache(q_bundle, q_fp32_bundle,  # noqa: F811
                                                                   precision: str) -> None:
    """A row whose cache is nearly full beside rows that draft: every row's past plus the step's
    T must fit in the cache (ONNX Runtime refuses the step otherwise, and every row in it
    failed), so T is cut to the fullest row's room; each text is still the one-slot engine's."""
    path = bundle(q_bundle, q_fp32_bundle, precision)
    one = load_bundle(path, slots=1, threads=2)
    three = load_bundle(path, slots=3, threads=2, ragged=True)
    watch = Watching(three.backend)
    engine = Scheduler(watch, three.tokenizer, speculate="ngram")  # type: ignore[arg-type]
    single = Scheduler(one.backend, one.tokenizer, speculate="ngram")
    near_end = GenerationRequest(list(range(3, 27)) * 2 + list(range(3, 7)), 64, ignore_eos=True)  # 52 + 12
    requests = [near_end, REQUESTS[0], REQUESTS[1]]
    single.start()
    engine.start()
    try:
        alone = [run(single, r)[0] for r in requests]
        watch.seen.clear()
        together = burst(engine, requests)
    finally:
        engine.close()
        single.close()
    assert together == alone
    joint = [shape for shape, _, lengths in watch.seen if lengths is not None]
    assert any(shape[1] > 2 for shape in joint)  # drafts were verified jointly all along


def test_random_traffic_on_joint_steps_keeps_greedy_text(q_bundle, q_fp32_bundle) -> None:  # noqa: F811
    """Random bursts on a 4-slot joint engine with the prefix cache and chunked prefill: prompts
    of 1..62 tokens (cache 64), that repeat (drafts) or not, greedy and sampled, 1..79 new
    tokens (so rows run into the cache's end), some arriving while others decode. Every request
    finishes, and each greedy one gives the one-slot engine's text. (It found the cache-end
    failure above; 60 bursts a precision, ~10 s in all.)"""
    import time

    import numpy as np

    from device.serve.scheduler import Finished

    for precision in ("fp32", "int8", "int4"):
        path = bundle(q_bundle, q_fp32_bundle, precision)
        one, four = load_bundle(path, slots=1, threads=2), load_bundle(path, slots=4, threads=2, ragged=True)
        cache = {"prefix_cache_bytes": 1 << 22, "prefix_block_tokens": 4}
        single = Scheduler(one.backend, one.tokenizer, speculate="ngram", **cache)  # type: ignore[arg-type]
        engine = Scheduler(four.backend, four.tokenizer, speculate="ngram", prefill_chunk=8,
                           **cache)  # type: ignore[arg-type]
        assert engine.joint
        rng = np.random.default_rng(7)
        V = four.backend.vocab_size
        single.start()
        engine.start()
        try:
            for _ in range(60):
                requests = []
                for _ in range(int(rng.integers(2, 7))):
                    n = int(rng.integers(1, 63))
                    repeat = rng.integers(3, V, int(rng.integers(2, 8))).tolist() * 64
                    prompt = repeat[:n] if rng.random() < 0.6 else rng.integers(3, V, n).tolist()
                    params = (SamplingParams() if rng.random() < 0.75 else
                              SamplingParams(temperature=0.9, seed=int(rng.integers(0, 99))))
                    requests.append(GenerationRequest(prompt, int(rng.integers(1, 80)), params=params,
                                                      ignore_eos=bool(rng.random() < 0.7)))
                handles = []
                for r in requests:
                    if rng.random() < 0.5:  # some arrive while others decode
                        time.sleep(float(rng.random()) * 0.01)
                    with engine.reserve() as ticket:
                        handles.append(engine.submit(ticket, r))
                for r, h in zip(requests, handles):
                    events = list(h.events(timeout=60))
                    assert isinstance(events[-1], Finished), events[-1]
                    if r.params.greedy:
                        text = "".join(e.text for e in events if isinstance(e, TextDelta))
                        assert text == run(single, r)[0]
        finally:
            engine.close()
            single.close()


@pytest.mark.parametrize(("precision", "trials"), [("int8", (9, 54)), ("int4", (59,))])
def test_a_greedy_turn_after_a_sampled_answer_answers_as_a_cold_request(q_bundle, q_fp32_bundle,  # noqa: F811
                                                                        precision: str,
                                                                        trials: tuple[int, ...]) -> None:
    """A sampled answer is decoded without the spare token (outside joint steps), while prompts
    are read with it: its keys/values differ from a prompt's in the last bits. They were stored
    in the prefix cache at finish, and a greedy next turn that hit them gave other text than a
    cold one-slot engine (these trials of 60 random ones; fp32 showed none). Such an answer
    stores its prompt only."""
    import numpy as np

    path = bundle(q_bundle, q_fp32_bundle, precision)
    one = load_bundle(path, slots=1, threads=2)
    four = load_bundle(path, slots=4, threads=2, ragged=True)
    single = Scheduler(one.backend, one.tokenizer, speculate="ngram")
    engine = Scheduler(four.backend, four.tokenizer, speculate="ngram", prefix_cache_bytes=1 << 22,
                       prefix_block_tokens=4)  # type: ignore[arg-type]
    V = four.backend.vocab_size
    single.start()
    engine.start()
    try:
        for trial in trials:
            prompt = np.random.default_rng(trial).integers(3, V, 10).tolist()
            sampled = GenerationRequest(prompt, 24, params=SamplingParams(temperature=0.9, seed=trial),
                                        ignore_eos=True, logprobs=0)
            with engine.reserve() as ticket:
                handle = engine.submit(ticket, sampled)
            answer = [t.token for e in handle.events(timeout=60) for t in getattr(e, "logprobs", ())]
            assert len(answer) == 24
            follow = GenerationRequest(prompt + answer[:23] + [5, 6], 20, ignore_eos=True)
            assert run(engine, follow)[0] == run(single, follow)[0], trial
    finally:
        engine.close()
        single.close()


@pytest.mark.parametrize("T", [3, 5, 7])
def test_three_rows_of_an_odd_length_keep_the_one_slot_engines_logits(q_bundle, monkeypatch,  # noqa: F811
                                                                       T: int) -> None:
    """int4: MatMulNBits sums rows in pairs and an unpaired last row in its own order (the
    one-row kernel that makes lone rows step "paired"). A joint step of 3 rows of T odd tokens
    is 3T rows: the last row's last token fell alone there, and its logits differed from the
    same row stepped alone (n=3 greedy choices: the third one's logprobs, found by
    test_concurrent_traffic.py). The plan's T is forced here; every joint step must have an
    even number of token rows, and each choice the one-slot engine's logprobs, bit for bit."""
    import device.serve.scheduler as scheduler

    monkeypatch.setattr(scheduler, "joint_length", lambda rows, active, curve, base=2: T)
    path = q_bundle("llama", "cpu", "int4")
    one = load_bundle(path, slots=1, threads=1)
    four = load_bundle(path, slots=4, threads=1, ragged=True)
    watch = Watching(four.backend)
    engine = Scheduler(watch, four.tokenizer, speculate="ngram")  # type: ignore[arg-type]
    single = Scheduler(one.backend, one.tokenizer, speculate="ngram")
    assert engine.joint
    text = " ".join(["token show but for fly feel"] * 6)
    prompt = four.tokenizer.encode_chat([{"role": "user", "content": text}], None)
    request = GenerationRequest(prompt, 12, ignore_eos=True, logprobs=2)

    def logprobs(eng: Scheduler, n: int) -> list[list[tuple[int, float]]]:
        handles = []
        for _ in range(n):
            with eng.reserve() as ticket:
                handles.append(eng.submit(ticket, request))
        return [[(t.token, t.logprob) for e in h.events(timeout=60) for t in getattr(e, "logprobs", ())]
                for h in handles]

    single.start()
    engine.start()
    try:
        (want,) = logprobs(single, 1)
        watch.seen.clear()
        got = logprobs(engine, 3)
    finally:
        engine.close()
        single.close()
    joint = [shape for shape, _, lengths in watch.seen if lengths is not None]
    assert any(shape[0] == 3 for shape in joint) and engine.even_steps
    assert got == [want] * 3
    assert all(shape[0] * shape[1] % 2 == 0 for shape in joint), joint
