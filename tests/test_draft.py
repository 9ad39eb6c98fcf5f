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
from test_scheduler import OnlyTokens, SlowBackend, prompt, run

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


def test_the_plan_verifies_rows_only_where_that_raises_tokens_per_second() -> None:
    from device.serve.draft_plan import Candidate, StepCosts, candidates, choose_verifies

    # SmolLM2-135M fp32 on 2 cores, text that copies: a verify step of 1+4 tokens ~25 ms gives ~4
    rows = [Candidate(slot, 4.0, 0.025) for slot in range(8)]
    assert choose_verifies(2, 0.026, rows[:2]) == [0, 1]  # 160 tok/s a row against 77 plain
    assert choose_verifies(8, 0.044, rows) == []  # 182 tok/s plain: batching wins
    assert choose_verifies(2, None, rows[:2]) == []  # the plain step was never timed
    # best first, and only while each row beats the plan so far
    mixed = [Candidate(0, 1.2, 0.025), Candidate(1, 5.0, 0.025), Candidate(2, 2.0, 0.025)]
    assert choose_verifies(3, 0.03, mixed) == [1]
    costs = StepCosts()
    assert candidates({0: [5, 6, 7, 8]}, {}, costs) == []  # nothing timed yet
    costs.observe(2, 1, 0.026)
    assert candidates({0: [5, 6, 7, 8]}, {}, costs) == [Candidate(0, 3.0, 0.026)]  # guesses
    costs.observe(1, 5, 0.1)
    costs.observe(1, 5, 0.2)  # a moving average of what the steps took
    assert candidates({0: [5, 6, 7, 8]}, {0: (1.5, 0)}, costs) == [Candidate(0, 1.5, 0.125)]


def test_a_draft_is_as_long_as_its_acceptance_and_the_measured_step_times_make_worth_it() -> None:
    from device.serve.draft_plan import StepCosts, acceptance, draft_length

    costs = StepCosts()
    assert draft_length(0.9, 7, costs) == 7  # nothing timed: all of it
    costs.observe(4, 1, 0.020)  # t(1, 1) never timed: the cheapest one-token step stands in
    assert costs.verify(1) == 0.020 and costs.verify(16) == 0.020  # past the longest: no dearer
    # SmolLM2-135M fp32 on 2 cores: one-row steps of 1, 5, 8, 16 tokens
    for tokens, seconds in ((1, 0.023), (5, 0.026), (8, 0.030), (16, 0.039)):
        costs.observe(1, tokens, seconds)
    assert abs(costs.verify(12) - 0.0345) < 1e-12  # the straight line between 8 and 16
    assert draft_length(acceptance(240, 9), 15, costs) == 15  # text that copies
    assert draft_length(acceptance(51, 72), 15, costs) == 3  # text that does not (p 0.42)
    assert draft_length(0.5, 15, costs) == 4
    assert draft_length(0.02, 15, costs) == 0  # not worth a draft at all
    assert draft_length(0.02, 15, costs, tried=False) == 1  # ... but a row's first one is made
    assert acceptance(0, 0) == 0.5
    # a device whose steps grow with their tokens (30 ms a token): one try, then no drafts
    steep = StepCosts()
    steep.observe(2, 1, 0.010)
    steep.observe(1, 5, 0.150)
    assert 0.010 < steep.verify(2) < steep.verify(4) < 0.150
    assert draft_length(0.9, 4, steep) == 0
    assert draft_length(0.5, 4, steep, tried=False) == 1


def test_a_row_whose_drafts_failed_is_tried_again_after_a_while() -> None:
    """A measured gain goes stale as the row decodes plainly: it relaxes back towards the prior,
    so a row whose text did not copy at first verifies again once that could pay."""
    from device.serve.draft_plan import STALE_TOKENS, Candidate, choose_verifies, current_gain

    assert current_gain(None, 4, 0) == 3.0  # the prior: the pending token and half the draft
    assert current_gain(1.0, 4, 0) == 1.0
    assert current_gain(1.0, 4, STALE_TOKENS) == 2.0  # halfway back
    assert current_gain(5.0, 4, STALE_TOKENS) == 4.0  # a good one fades towards the prior too
    assert 2.9 < current_gain(1.0, 4, 8 * STALE_TOKENS) < 3.0

    # two rows, a plain step of both 26 ms, a verify step 25 ms (SmolLM2 fp32 on 2 cores)
    def chosen(since: int) -> list[int]:
        return choose_verifies(2, 0.026, [Candidate(0, current_gain(1.0, 4, since), 0.025)])
    assert chosen(0) == [] and chosen(STALE_TOKENS // 2) == []  # 40 tok/s < 77: batch
    assert chosen(2 * STALE_TOKENS) == [0]  # 2.5 expected: 100 tok/s, worth a try


class ShapedDelay(SlowBackend):
    """A device whose step time depends on the step's shape: delay_of(rows, tokens)."""

    def __init__(self, backend: Any, delay_of: Any) -> None:
        super().__init__(backend, 0.0)
        self.delay_of = delay_of

    def step(self, ids: np.ndarray, pos: np.ndarray, slots: Any, *rest: Any) -> np.ndarray:
        import time

        time.sleep(self.delay_of(*ids.shape))
        return super().step(ids, pos, slots, *rest)


def _two_copying_at_once(runner: Any, delay_of: Any, draft_tokens: int = 4,
                         calls: list[Any] | None = None,
                         budgets: tuple[int, int] = (40, 40)) -> tuple[list[tuple[str, Any]], int]:
    """Two greedy requests that copy their prompt, decoding together in batched mode (both are
    queued before the engine starts): their results and the number of verify steps (one row,
    2..5 tokens, past the prompt) they took. calls: gets the device's steps."""
    device = ShapedDelay(runner.backend, delay_of)
    engine = Scheduler(device, runner.tokenizer, decode_mode="batched",  # type: ignore[arg-type]
                       speculate="ngram", draft_tokens=draft_tokens)
    device.calls.clear()  # the start-up probes
    ids = copying_prompt(runner)
    handles = []
    for req in (GenerationRequest(ids, budgets[0], ignore_eos=True),
                GenerationRequest(ids[1:], budgets[1], ignore_eos=True)):
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
    if calls is not None:
        calls.extend(device.calls)
    return out, verifies


def test_rows_decoding_together_take_short_drafts_and_a_lone_row_long_ones(runner: Any) -> None:
    """A verify step takes one row and the others wait for it, so while two rows decode their
    drafts stay within SHARED_DRAFT_TOKENS; the row left alone drafts up to --draft-tokens."""
    from device.serve.config import SHARED_DRAFT_TOKENS

    calls: list[Any] = []
    _two_copying_at_once(runner, lambda rows, tokens: 0.01, draft_tokens=15, calls=calls,
                         budgets=(24, 64))
    last = {slot: i for i, (_, _, slots) in enumerate(calls) for slot in slots}
    prompt_len = len(copying_prompt(runner))
    verify = [(i, ids.shape[1]) for i, (ids, pos, _) in enumerate(calls)
              if ids.shape[0] == 1 and ids.shape[1] > 1 and pos[0, 0] >= prompt_len - 1]
    together = [t for i, t in verify if i < min(last.values())]
    alone = [t for i, t in verify if i > min(last.values())]
    assert together and max(together) <= 1 + SHARED_DRAFT_TOKENS, together
    assert alone and max(alone) > 1 + SHARED_DRAFT_TOKENS, alone


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
