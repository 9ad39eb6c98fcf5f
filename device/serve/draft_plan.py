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
that raises tokens per second. SmolLM2-135M fp32 on 2 cores,
text that copies (g ~ 4): t(1, 5) ~ 25 ms gives 160 tok/s a row, against 77 tok/s for a plain
step of 2 rows (26 ms) and 180 for 8 rows (44 ms): at c=2 both rows draft, at c=8 none does.
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
        """t(1, tokens). Never measured: the cheapest one-token step timed, of any rows (a
        memory-bound step costs about the same for a few more tokens or rows). A guess on the
        low side, so the step gets tried, and its time replaces the guess."""
        known = self.get(1, tokens)
        if known is not None:
            return known
        ones = [s for (_, t), s in self.seconds.items() if t == 1]
        return min(ones) if ones else None


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
