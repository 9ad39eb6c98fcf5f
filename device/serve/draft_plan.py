"""Which rows of a batch verify their drafts this step: a cost model from measured step times.

A verify step takes one row (ONNX Runtime's GroupQueryAttention runs T > 1 tokens over a cache
for B = 1 only), so drafting c rows turns one batched step, which reads the weights once for
all of them, into c steps that each read them. Whether that pays depends on the sizes:

    plain:   every active row, one token each, in one step of B rows   n tokens / t(B, 1)
    verify:  row i alone with its pending token and k_i drafted ones   g_i tokens / t(1, 1 + k_i)

g_i is what row i's verify steps have produced so far (its accepted run + 1, averaged), t the
engine's own step times. A row's g_i goes stale while it decodes in plain steps (its text may
start copying: an answer that quotes the prompt after a sentence of its own), so it relaxes back
towards the prior by half every STALE_TOKENS tokens, and the row gets tried again. Rows are
taken best first while each one's rate beats the plan's so far, so a row is verified only when
that raises tokens per second. SmolLM2-135M fp32 on 2 cores, text that copies: a 4-token draft
(g ~ 4, t(1, 5) ~ 25 ms) gives 160 tok/s a row, against 77 tok/s for a plain step of 2 rows
(26 ms) and 180 for 8 rows (44 ms), so at c=2 both rows draft and at c=8 none does.

How long each row's draft is (draft_length) is chosen before this, from the row's acceptance
and the same step times; while other rows decode it is at most config.SHARED_DRAFT_TOKENS (4),
since the others wait for each verify step (a lone row takes up to 15).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

COST_EMA = 0.25  # weight of the newest step time (steps are noisy on a shared 2-core board)
GAIN_EMA = 0.5  # weight of a row's newest verify outcome (a text switches from copying fast)
STALE_TOKENS = 32  # a gain measured this many plain tokens ago counts half (see current_gain)


@dataclass
class StepCosts:
    """Seconds per backend step by (rows, tokens per row): a moving average of those run."""

    seconds: dict[tuple[int, int], float] = field(default_factory=dict)

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        key = (rows, tokens)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + COST_EMA * (seconds - old)

    def get(self, rows: int, tokens: int) -> float | None:
        return self.seconds.get((rows, tokens))

    def verify(self, tokens: int) -> float | None:
        """t(1, tokens). Never measured: the straight line between the one-row steps timed on
        either side (t(1, 1) never timed: the cheapest one-token step of any rows stands in, a
        memory-bound step costing about the same for a few more rows); past the longest, what
        that one took (a guess on the low side, so the longer step gets tried and its time
        replaces the guess). Trying each length once instead cost a device whose step time
        grows with its tokens a wasted verify step per length and row."""
        ones = [s for (_, t), s in self.seconds.items() if t == 1]
        if not ones:
            return None
        one_row = {t: s for (rows, t), s in self.seconds.items() if rows == 1}
        one_row.setdefault(1, min(ones))
        if tokens in one_row:
            return one_row[tokens]
        below = sorted((t, s) for t, s in one_row.items() if t < tokens)
        above = sorted((t, s) for t, s in one_row.items() if t > tokens)
        if above:
            (t0, s0), (t1, s1) = below[-1], above[0]
            return s0 + (s1 - s0) * (tokens - t0) / (t1 - t0)
        return max(s for _, s in below)


def prior_gain(draft_len: int) -> float:
    """Tokens a row's first verify step is expected to give: the pending one and half the draft."""
    return 1.0 + draft_len / 2


def updated_gain(old: float | None, produced: int) -> float:
    return float(produced) if old is None else old + GAIN_EMA * (produced - old)


def current_gain(measured: float | None, draft_len: int, since: int) -> float:
    """What a row's next verify step is expected to give: its measured gain, `since` plain
    tokens after its last verify step, relaxed towards the prior (halfway per STALE_TOKENS).
    Without it a row that once copied badly never verified again while others decoded; a
    re-try costs one single-row step (SmolLM2 fp32: ~25 ms, against ~5 ms a row batched at c=8),
    once per STALE_TOKENS or so while its drafts keep failing."""
    prior = prior_gain(draft_len)
    if measured is None:
        return prior
    return prior + (measured - prior) * 0.5 ** (since / STALE_TOKENS)


def acceptance(accepted: int, missed: int) -> float:
    """A row's chance that a draft token is right given the ones before it were: its accepted
    tokens over those and its misses (one per verify step that stopped short), Laplace-smoothed
    (0.5 before any verify)."""
    return (accepted + 1) / (accepted + missed + 2)


def draft_length(p: float, room: int, costs: StepCosts, tried: bool = True) -> int:
    """How many of `room` draft tokens to verify: the k with the most expected tokens per second.
    Each token is right with probability p given the ones before, so a step of 1 + k tokens gives
    1 + p + ... + p^k of them and costs t(1, 1 + k). SmolLM2-135M fp32 on 2 cores: t = 23, 26,
    30, 39 ms for 1, 5, 8, 16 tokens, so text that copies (p ~ 0.96) takes 15 (~11 tokens a
    step, ~290 tok/s against ~170 at k = 4) and text that does not (p ~ 0.4) takes 2 or 3.
    0: not worth a draft at all, which only a row that has verified drafts (`tried`) may be
    told: the step times of drafts are measured only when drafts run, so one noisy slow verify
    step once kept every later request of an engine from drafting (CI, under load). Nothing
    timed yet: all of room."""
    best, best_rate, expected = room, 0.0, 0.0
    for k in range(room + 1):
        expected += p ** k
        cost = costs.verify(1 + k)
        if cost is None:
            return room
        if (k > 0 or tried) and expected / cost > best_rate:
            best, best_rate = k, expected / cost
    return best


@dataclass(frozen=True)
class Candidate:
    slot: int
    gain: float  # expected tokens from its verify step
    cost: float  # seconds of its verify step


def choose_verifies(active: int, plain_cost: float | None, candidates: list[Candidate]) -> list[int]:
    """Slots to verify before (or instead of) the plain step of `active` rows costing plain_cost.
    None: that step size was never timed, so nothing drafts and the plain step measures it."""
    if plain_cost is None or plain_cost <= 0:
        return []
    tokens, seconds = float(active), plain_cost
    chosen: list[int] = []
    for c in sorted(candidates, key=lambda c: c.gain / c.cost, reverse=True):
        if c.gain / c.cost <= tokens / seconds:
            break
        chosen.append(c.slot)
        tokens, seconds = tokens + c.gain, seconds + c.cost
    return chosen


def candidates(drafts: Mapping[int, list[int]], gains: Mapping[int, tuple[float | None, int]],
               costs: StepCosts) -> list[Candidate]:
    """gains: slot -> (its measured gain or None, plain tokens since its last verify step)."""
    out = []
    for slot, draft in drafts.items():
        cost = costs.verify(1 + len(draft))
        if cost:
            measured, since = gains.get(slot, (None, 0))
            out.append(Candidate(slot, current_gain(measured, len(draft), since), cost))
    return out
