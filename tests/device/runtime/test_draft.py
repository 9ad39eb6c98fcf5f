"""Prompt-lookup drafting: the n-gram index on its own, and the engine's verify step giving
exactly what plain greedy decoding gives (text, stops, budgets, logprobs, grammar), with drafts
really accepted, while sampled requests never draft."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemon_fixtures import llama_bundle  # noqa: F401 - a fixture
from engine_helpers import OnlyTokens, SlowBackend, prompt, run

from device.runtime.draft import PromptLookup
from device.runtime.runner import load_bundle
from device.runtime.sampling import SamplingParams
from device.serve.scheduler import GenerationRequest, Scheduler, TextDelta

# --- the index -------------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_most_recent_longest_match() -> None:
    lk = PromptLookup([5, 1, 2, 3, 4, 9, 1, 2, 7, 8], max_ngram=3, min_ngram=1)
    lk.push(1)
    lk.push(2)  # suffix 1 2: last seen before at 6..8, followed by 7 8
    assert lk.draft(4) == [7, 8, 1, 2]
    lk.push(3)  # suffix 1 2 3 was seen at 1..4 (the longer match wins over "2 3" / "3")
    assert lk.draft(3) == [4, 9, 1]
    assert lk.draft(0) == []


def test_lookup_needs_min_ngram_and_extends_a_repeating_run() -> None:
    lk = PromptLookup([1, 2, 3], min_ngram=2)
    lk.push(3)  # "3 3" never seen, and "3" alone is below min_ngram
    assert lk.draft(4) == []
    run_ = PromptLookup([7, 8, 7, 8, 7], min_ngram=2)  # period 2: "8 7" last ended at 3
    assert run_.draft(5) == [8, 7, 8, 7, 8]
    with pytest.raises(ValueError):
        PromptLookup(min_ngram=0)


def test_lookup_equals_a_brute_force_scan() -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 6, 300).tolist()
    lk = PromptLookup(tokens[:50])
    for i in range(50, 300):
        t = tokens[:i]
        want: list[int] = []
        for n in (3, 2):  # the most recent earlier occurrence of the longest suffix
            ends = [e for e in range(n, len(t)) if t[e - n:e] == t[-n:]]
            if ends:
                e = ends[-1]
                want = (t[e:] * 8)[:4] if e + 4 > len(t) else t[e:e + 4]
                break
        assert lk.draft(4) == want, i
        lk.push(tokens[i])


# --- the engine ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(llama_bundle: Path) -> Any:  # noqa: F811
    r = load_bundle(llama_bundle, slots=4, threads=1)
    yield r
    r.close()


class Recording(SlowBackend):
    """Counts the steps by width."""

    def widths(self) -> list[int]:
        return [ids.shape[1] for ids, _, _ in self.calls]


@pytest.fixture
def engines(runner: Any) -> Iterator[tuple[Scheduler, Scheduler, Recording]]:
    rec = Recording(runner.backend, 0.0)
    on = Scheduler(rec, runner.tokenizer, speculate="ngram", draft_tokens=4)  # type: ignore[arg-type]
    off = Scheduler(runner.backend, runner.tokenizer, speculate="off")
    on.start()
    off.start()
    rec.calls.clear()
    yield on, off, rec
    on.close()
    off.close()


def copying_prompt(runner: Any) -> list[int]:
    return prompt(runner, "sun moon star sky rain snow wind fire " * 2)


def test_drafted_output_equals_plain_greedy_and_drafts_are_accepted(engines: Any, runner: Any) -> None:
    on, off, rec = engines
    total = 0
    for words in ("sun moon star sky rain snow wind fire " * 2, "cat dog bird fish cat dog bird",
                  "hello world"):
        req = GenerationRequest(prompt(runner, words), 40, logprobs=2)
        (text_on, fin_on), (text_off, fin_off) = run(on, req), run(off, req)
        assert text_on == text_off and fin_on.usage.completion_tokens == fin_off.usage.completion_tokens
        assert fin_off.usage.drafted_tokens == 0
        assert fin_on.usage.accepted_tokens <= fin_on.usage.drafted_tokens
        assert fin_on.timings.draft_n == fin_on.usage.drafted_tokens
        total += fin_on.usage.accepted_tokens
    assert total > 0 and max(rec.widths()) > 1  # verify steps ran and drafts were accepted
    assert on.metrics.accepted_tokens.get() == total
    assert on.metrics.draft_tokens.get() >= total


def test_logprobs_of_verified_rows_equal_plain_steps(engines: Any, runner: Any) -> None:
    on, off, _ = engines
    req = GenerationRequest(copying_prompt(runner), 30, logprobs=3)
    got = []
    for engine in (on, off):  # one after the other: both engines share the backend's cache
        with engine.reserve() as ticket:
            handle = engine.submit(ticket, req)
        got.append([lp for e in handle.events(timeout=30) for lp in getattr(e, "logprobs", ())])
    assert [lp.token for lp in got[0]] == [lp.token for lp in got[1]]
    np.testing.assert_allclose([lp.logprob for lp in got[0]], [lp.logprob for lp in got[1]], atol=1e-4)


def test_stop_strings_and_max_tokens_hold_inside_a_draft(engines: Any, runner: Any) -> None:
    on, off, _ = engines
    ids = copying_prompt(runner)
    full, fin = run(on, GenerationRequest(ids, 40))
    assert fin.usage.accepted_tokens > 0
    words = full.split()
    for n in range(1, 12):  # every budget cuts wherever it falls in a draft
        text_on, fin_on = run(on, GenerationRequest(ids, n))
        text_off, _ = run(off, GenerationRequest(ids, n))
        assert text_on == text_off and fin_on.usage.completion_tokens == n
        assert fin_on.finish_reason == "length"
    for stop in dict.fromkeys(words[3:10]):
        cut, fin_s = run(on, GenerationRequest(ids, 40, stop=(stop,)))
        assert fin_s.finish_reason == "stop" and cut == full[:full.index(stop)]


def test_grammar_rows_draft_exactly(engines: Any, runner: Any) -> None:
    on, _, _ = engines
    forced = runner.tokenizer.encode("sun moon star sky rain sun moon star sky", add_special_tokens=False)
    text, fin = run(on, GenerationRequest(copying_prompt(runner), 30, constraint=OnlyTokens(
        forced, runner.backend.vocab_size)))  # type: ignore[arg-type]
    assert text == runner.tokenizer.decode(forced) and fin.usage.completion_tokens == len(forced)


def test_sampled_and_penalized_requests_never_draft(engines: Any, runner: Any) -> None:
    on, off, rec = engines
    for params in (SamplingParams(temperature=0.8, seed=3), SamplingParams(frequency_penalty=0.5)):
        req = GenerationRequest(copying_prompt(runner), 30, params)
        rec.calls.clear()
        (text_on, fin_on), (text_off, _) = run(on, req), run(off, req)
        assert text_on == text_off and fin_on.usage.drafted_tokens == 0
        assert max(rec.widths()[1:]) == 1  # the prefill, then one token a step


def test_drafting_rows_and_plain_rows_share_the_engine(engines: Any, runner: Any) -> None:
    """A drafting greedy row and sampled rows running together each get what they get alone."""
    import threading

    on, off, _ = engines
    reqs = [GenerationRequest(copying_prompt(runner), 30),
            GenerationRequest(prompt(runner, "tree road"), 30, SamplingParams(temperature=0.9, seed=1)),
            GenerationRequest(prompt(runner, "cat cat cat"), 30)]
    alone = [run(off, r) for r in reqs]
    together: list[Any] = [None] * len(reqs)

    def worker(i: int) -> None:
        together[i] = run(on, reqs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for (text_a, _), (text_b, _) in zip(alone, together):
        assert text_a == text_b


def test_smollm2_extraction_with_drafts_equals_plain_greedy(smollm2_bundle: Path) -> None:
    """The real model on a prompt whose answer copies it: most of the answer comes from accepted
    drafts, and the text is plain greedy's."""
    r = load_bundle(smollm2_bundle, slots=1, threads=2)
    on = Scheduler(r.backend, r.tokenizer, speculate="ngram")
    off = Scheduler(r.backend, r.tokenizer, speculate="off")
    on.start()
    off.start()
    try:
        text = ("The museum opened its doors at nine, but the queue had started forming an hour "
                "earlier. Most people had come for the new exhibition of maps: hand-drawn charts of "
                "coastlines, city plans with streets that were later demolished, and a painted globe.")
        ids = r.tokenizer.encode_chat([{"role": "user", "content":
                                        "Repeat the following text exactly:\n\n" + text}])
        req = GenerationRequest(ids, 60)
        (text_on, fin_on), (text_off, fin_off) = run(on, req), run(off, req)  # one after the other
        assert text_on == text_off and fin_on.usage.completion_tokens == fin_off.usage.completion_tokens
        assert fin_on.usage.accepted_tokens > fin_on.usage.completion_tokens // 3
    finally:
        on.close()
        off.close()
        r.close()


def test_verify_steps_reuse_a_binding_and_equal_the_general_path(runner: Any) -> None:
    """ONNX Runtime: a small multi-token step with logits at every position (a draft's verify
    step) runs through a cached IO binding, and gives the general path's logits bit for bit."""
    from device.runtime.generate import prefill

    be = runner.backend
    ids = prompt(runner, "sun moon star")
    prefill(be, ids, 3)
    step_ids = np.array([ids[:3]], np.int64)
    pos = (len(ids) + np.arange(3, dtype=np.int64))[None]
    bound = be.step(step_ids, pos, [3]).copy()  # [1, 3, V]
    assert (3, 1, 3) in be._bound
    general = be.step(step_ids, pos, [3], np.arange(3, dtype=np.int64))
    assert bound.shape == general.shape == (1, 3, be.vocab_size)
    assert np.array_equal(bound, general)


def test_the_first_run_of_a_step_shape_is_not_timed(runner: Any) -> None:
    """A shape's first step pays one-time costs (its IO binding, the runtime's allocations);
    timed, that one step stood in the drafting plan until the length ran again, which a length
    priced too high never does (SmolLM2 int8: a lone row stopped drafting in ~1 of 7 runs of a
    copying prompt). Here every shape's first step after start takes 0.2 s more: none of that
    reaches the step costs, and the row drafts as it does without the delays."""
    import time

    class FirstRunSlow(SlowBackend):
        def __init__(self, backend: Any) -> None:
            super().__init__(backend, 0.0)
            self.armed, self.ran = False, set()

        def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
            shape = (int(list(slots)[0]), *ids.shape)
            if self.armed and shape not in self.ran:
                time.sleep(0.2)
            self.ran.add(shape)
            return super().step(ids, pos, slots, *rest)

    accepted = {}
    for slow in (False, True):
        backend = FirstRunSlow(runner.backend)
        engine = Scheduler(backend, runner.tokenizer, speculate="ngram",  # type: ignore[arg-type]
                           draft_tokens=4)
        backend.armed, backend.ran = slow, set()  # what the start-up probes ran does not count
        engine.start()
        try:
            _, final = run(engine, GenerationRequest(copying_prompt(runner), 40, ignore_eos=True))
        finally:
            engine.close()
        assert engine.costs.seconds and max(engine.costs.seconds.values()) < 0.1, engine.costs.seconds
        accepted[slow] = final.timings.draft_n_accepted
    assert accepted[True] == accepted[False] > 0


def test_serve_options_refuse_a_bad_speculate_setting(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bundle.errors import ToolkitError
    from device.runtime.ort_backend import BOUND_T
    from device.serve.config import DRAFT_TOKENS, ServeConfig
    from toolkit.commands.serve import serve

    assert DRAFT_TOKENS + 1 <= BOUND_T  # the default's longest verify step stays on the bound path
    for bad in (0, 65, 5000):
        with pytest.raises(ToolkitError, match=f"--draft-tokens must be 1 to 64 \\(got {bad}\\)"):
            ServeConfig(bundle=tmp_path, draft_tokens=bad)
    with pytest.raises(ToolkitError, match="--speculate 'eagle'"):
        ServeConfig(bundle=tmp_path, speculate="eagle")
    out = CliRunner().invoke(serve, [str(tmp_path), "--speculate", "eagle"])
    assert out.exit_code == 2 and "'eagle' is not one of 'off', 'ngram'" in out.output


def test_drafting_is_refused_where_a_multi_token_step_is_not_single_steps(runner: Any) -> None:
    """A graph whose multi-token logits differ from single steps' by more than rounding (int8
    dynamic quantization scales activations over the whole step) would let drafts change the
    greedy output: the engine turns drafting off at start."""
    from device.runtime.draft import VERIFY_TOLERANCE, verify_step_deviation

    class Skewed(SlowBackend):
        def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
            out = super().step(ids, pos, slots, *rest)
            return out + np.float32(0.5) * (ids.shape[1] > 1)

    assert verify_step_deviation(runner.backend, 4) <= VERIFY_TOLERANCE
    assert Scheduler(runner.backend, runner.tokenizer).draft_tokens > 0
    skewed = Skewed(runner.backend, 0.0)
    assert verify_step_deviation(skewed, 4) > VERIFY_TOLERANCE  # type: ignore[arg-type]
    assert Scheduler(skewed, runner.tokenizer).draft_tokens == 0  # type: ignore[arg-type]


# --- which rows verify when several decode (device/serve/draft_plan.py) ----------------------


def smollm2_curve() -> Any:
    """SmolLM2-135M fp32 on 2 cores: one-row steps of 1, 5, 8, 16 tokens took 23, 26, 30, 39 ms."""
    from device.serve.draft_plan import StepCosts

    costs = StepCosts()
    for tokens, seconds in ((1, 0.023), (5, 0.026), (8, 0.030), (16, 0.039)):
        costs.observe(1, tokens, seconds)
    return costs.curve()


def test_the_plan_verifies_rows_only_where_that_raises_tokens_per_second() -> None:
    from device.serve.draft_plan import Row, expected_tokens, plan

    curve = smollm2_curve()
    copying = [Row(slot, 0.98, 15) for slot in range(8)]
    # two rows that copy beside a 26 ms plain step of both: both verify, all of their drafts
    assert plan(copying[:2], 2, 0.026, curve) == {0: 15, 1: 15}
    # eight of them beside a 44 ms plain step (182 tok/s): still worth it, ~14 tokens in 39 ms
    assert len(plan(copying, 8, 0.044, curve)) == 8
    # eight rows at the prior (p 0.5: ~2 tokens a verify step): batching wins
    assert plan([Row(slot, 0.5, 4) for slot in range(8)], 8, 0.044, curve) == {}
    assert plan(copying[:2], 2, None, curve) == {}  # the plain step was never timed
    # best first, each while it raises the plan's rate: the row that copies, not the others
    mixed = [Row(0, 0.3, 4), Row(1, 0.99, 15), Row(2, 0.6, 4)]
    assert plan(mixed, 3, 0.03, curve) == {1: 15}
    # a lone row plans alone (active 1: no plain step to beat but its own one-token step)
    assert plan([Row(0, 0.5, 15)], 1, None, curve) == {0: 4}
    assert plan([Row(0, 0.02, 15)], 1, None, curve) == {}
    assert plan([Row(0, 0.02, 15, tried=False)], 1, None, curve) == {0: 1}  # a first draft is made
    assert expected_tokens(0.5, 2) == 1.75 and expected_tokens(1.0, 15) == 16.0


def test_rows_that_ride_wait_at_most_two_more_plain_steps_for_the_others_drafts() -> None:
    from device.serve.draft_plan import RIDER_SHARE, Row, plan

    curve = smollm2_curve()
    assert curve is not None
    copying = [Row(slot, 0.98, 15) for slot in range(7)]
    # seven rows that copy and one that has no draft, beside a 44 ms plain step of all eight:
    # the most tokens per second would verify all seven (the rider: 44 + 7 x 39 = 317 ms a
    # token); bounded, the verify steps add at most 2 x 44 ms: two 15-token drafts (78 ms)
    assert RIDER_SHARE == 2.0 and plan(copying, 8, 0.044, curve) == {0: 15, 1: 15}
    lengths = plan(copying + [Row(7, 0.3, 2)], 8, 0.044, curve)  # the eighth's draft is poor
    assert lengths and sum(curve.at(1 + k) for k in lengths.values()) <= RIDER_SHARE * 0.044
    # every row verifies (none rides): unbounded, as before
    assert len(plan(copying + [Row(7, 0.98, 15)], 8, 0.044, curve)) == 8
    # beside a 15 ms plain step a draft is cut to what fits in 30 ms (7 tokens: 30 ms)
    assert plan(copying[:1] + [Row(1, 0.2, 4)], 2, 0.015, curve) == {0: 7}
    # a plain step cheaper than any verify step's half: none is made
    assert plan(copying[:1] + [Row(1, 0.2, 4)], 2, 0.010, curve) == {}


def test_a_draft_is_as_long_as_its_acceptance_and_the_measured_step_times_make_worth_it() -> None:
    from device.serve.draft_plan import STALE_STEPS, Acceptance, StepCosts, draft_length

    costs = StepCosts()
    assert costs.curve() is None and draft_length(0.9, 7, None) == 7  # nothing timed: all of it
    costs.observe(4, 1, 0.020)  # t(1, 1) never timed: the cheapest one-token step stands in
    flat = costs.curve()
    assert flat is not None and flat.at(1) == 0.020 and flat.at(16) == 0.020  # past the longest: no dearer
    curve = smollm2_curve()
    assert abs(curve.at(12) - 0.0345) < 1e-12  # the straight line between 8 and 16
    assert draft_length(0.97, 15, curve) == 15  # text that copies
    assert draft_length(0.42, 15, curve) == 3  # text that does not
    assert draft_length(0.5, 15, curve) == 4
    assert draft_length(0.02, 15, curve) == 0  # not worth a draft at all
    assert draft_length(0.02, 15, curve, tried=False) == 1  # ... but a row's first one is made
    # beside a plan of 8 rows in 44 ms a shorter draft is not worth its step
    assert draft_length(0.5, 15, curve, base=(8.0, 0.044)) == 0
    assert draft_length(0.98, 15, curve, base=(8.0, 0.044)) == 15
    # a device whose steps grow with their tokens (30 ms a token): one try, then no drafts
    steep = StepCosts()
    steep.observe(2, 1, 0.010)
    steep.observe(1, 5, 0.150)
    steep_curve = steep.curve()
    assert steep_curve is not None and 0.010 < steep_curve.at(2) < steep_curve.at(4) < 0.150
    assert draft_length(0.9, 4, steep_curve) == 0
    assert draft_length(0.5, 4, steep_curve, tried=False) == 1
    costs.observe(1, 5, 0.1)
    costs.observe(1, 5, 0.2)  # a moving average of what the steps took
    assert costs.get(1, 5) == 0.125
    # a verify length timed high once (a passing load) is guessed again after STALE_STEPS steps
    # of others, from the lengths still timed: low, so it is tried and timed anew
    spike = StepCosts()
    spike.observe(1, 1, 0.023)
    spike.observe(1, 16, 0.400)
    curve_then = spike.curve()
    assert curve_then is not None and draft_length(0.98, 15, curve_then, base=(8.0, 0.044)) == 0
    for _ in range(STALE_STEPS):
        spike.observe(8, 1, 0.044)
    curve_now = spike.curve()
    assert curve_now is not None and curve_now.at(16) == 0.023
    assert draft_length(0.98, 15, curve_now, base=(8.0, 0.044)) == 15
    assert Acceptance().p == 0.5


def test_acceptance_follows_the_recent_draft_tokens() -> None:
    """Text that starts copying after thirty tokens of its own is seen to within a window's worth
    (a lifetime count needed hundreds of right tokens), and text that stops copying too."""
    from device.serve.draft_plan import WINDOW, Acceptance, draft_length

    a = Acceptance()
    for _ in range(30):
        a.observe(False)
    assert a.p < 0.1
    for _ in range(WINDOW):
        a.observe(True)
    assert a.p > 0.7, a.p
    for _ in range(2 * WINDOW):
        a.observe(True)
    assert a.p > 0.9 and draft_length(a.p, 15, smollm2_curve(), base=(8.0, 0.044)) == 15
    for _ in range(WINDOW):
        a.observe(False)
    assert a.p < 0.4


def test_a_new_rows_acceptance_starts_from_the_engines_recent_one() -> None:
    """The prior weighs two tokens: a row after rows that copied starts high and is down below
    0.5 after two wrong tokens; with no draft seen yet the prior is 0.5."""
    from device.serve.draft_plan import Acceptance

    assert Acceptance().p == 0.5
    engine = Acceptance()
    for _ in range(40):
        engine.observe(True)
    row = Acceptance(prior=engine.p)
    assert row.p == engine.p > 0.95
    row.observe(False)
    row.observe(False)
    assert row.p < 0.5


def test_the_engine_gives_new_rows_its_acceptance_as_their_prior(engines: Any, runner: Any,
                                                                 monkeypatch: Any) -> None:
    on, _, _ = engines
    assert on.acceptance.p == 0.5  # nothing drafted yet
    run(on, GenerationRequest(copying_prompt(runner), 40, ignore_eos=True))
    learned = on.acceptance.p
    assert learned != 0.5
    import device.serve.scheduler as scheduler

    priors: list[float] = []
    real = scheduler.Acceptance

    def record(*args: Any, **kw: Any) -> Any:
        priors.append(kw.get("prior", 0.5))
        return real(*args, **kw)

    monkeypatch.setattr(scheduler, "Acceptance", record)
    run(on, GenerationRequest(copying_prompt(runner), 8))
    assert priors == [learned]


class ShapedDelay(SlowBackend):
    """A device whose step time depends on the step's shape: delay_of(rows, tokens)."""

    def __init__(self, backend: Any, delay_of: Any) -> None:
        super().__init__(backend, 0.0)
        self.delay_of = delay_of

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
        import time

        time.sleep(self.delay_of(*ids.shape))
        return super().step(ids, pos, slots, *rest)


def _two_copying_at_once(runner: Any, delay_of: Any) -> tuple[list[tuple[str, Any]], int]:
    """Two greedy requests that copy their prompt, decoding together in batched mode (both are
    queued before the engine starts): their results and the number of verify steps (one row,
    2..5 tokens, past the prompt) they took."""
    device = ShapedDelay(runner.backend, delay_of)
    engine = Scheduler(device, runner.tokenizer, decode_mode="batched",  # type: ignore[arg-type]
                       speculate="ngram", draft_tokens=4)
    device.calls.clear()  # the start-up probes
    ids = copying_prompt(runner)
    handles = []
    for req in (GenerationRequest(ids, 40, ignore_eos=True),
                GenerationRequest(ids[1:], 40, ignore_eos=True)):
        with engine.reserve() as ticket:
            handles.append(engine.submit(ticket, req))
    engine.start()
    out = []
    try:
        for handle in handles:
            events = list(handle.events(timeout=60))
            out.append(("".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]))
    finally:
        engine.close()
    verifies = sum(1 for ids_, pos, _ in device.calls
                   if ids_.shape[0] == 1 and 1 < ids_.shape[1] <= 5 and pos[0, 0] >= len(ids) - 1)
    return out, verifies


def test_rows_decoding_together_learn_their_acceptance_from_plain_steps(runner: Any,
                                                                         monkeypatch: Any) -> None:
    """Where verify steps do not pay (each draft token costs a plain step's time), rows that copy
    still have their acceptance measured: each plain step's token is checked against the first
    token of the draft the row was offered, for free. Without that a row that never verified
    would stay at the prior (0.5) for good and could not start drafting when it would pay."""
    import device.serve.scheduler as scheduler

    seen: list[float] = []

    def plan(rows: Any, *rest: Any) -> Any:
        seen.extend(r.p for r in rows)
        return real(rows, *rest)

    real = scheduler.plan
    monkeypatch.setattr(scheduler, "plan", plan)
    _, verifies = _two_copying_at_once(runner, lambda rows, tokens: 0.01 * (1 if tokens == 1
                                                                                else 3 * tokens))
    assert seen and max(seen) > 0.9, seen
    assert verifies <= 4


def test_rows_decoding_together_draft_where_verify_steps_cost_what_plain_ones_do(
        engines: Any, runner: Any) -> None:
    """A memory-bound device (every step 10 ms, whatever its shape): two rows copying text
    verify their drafts. A compute-bound one (a step of T > 1 tokens a row costs 30 ms a token):
    after a try or two, they batch while both decode. Both give plain greedy's text."""
    _, off, _ = engines
    flat, flat_verifies = _two_copying_at_once(runner, lambda rows, tokens: 0.01)
    steep, steep_verifies = _two_copying_at_once(runner, lambda rows, tokens: 0.01 * (1 if tokens == 1
                                                                                       else 3 * tokens))
    alone = [run(off, GenerationRequest(ids, 40, ignore_eos=True))
             for ids in (copying_prompt(runner), copying_prompt(runner)[1:])]
    for got in (flat, steep):
        assert [text for text, _ in got] == [text for text, _ in alone]
    assert all(fin.usage.accepted_tokens > 0 for _, fin in flat)
    assert flat_verifies >= 6 and steep_verifies <= flat_verifies // 2, (flat_verifies, steep_verifies)
