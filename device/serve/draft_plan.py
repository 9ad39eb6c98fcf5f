"""How many draft tokens each row verifies this step: a cost model from measured step times.

One model, used for a lone row and for a batch alike. A row's drafted token is right with
probability p given the ones before it were (its recent acceptance), so a verify step with its
pending token and k drafted ones gives

    E(p, k) = 1 + p + ... + p^k  tokens  in  t(1, 1 + k)  seconds

(t: the engine's own step times, by rows and tokens per row). Where the engine steps jointly
(a ragged graph, several slots: convert/ragged.py) every row's draft rides the one decode step
and joint_length picks that step's T (below). Elsewhere a verify step takes one row (ONNX
Runtime's GroupQueryAttention runs T > 1 tokens over a cache for B = 1 only, without
`query_seqlens`; TensorRT graphs), so in a batch of n rows it is paid on top of the plain step,
which gives n tokens in t(n, 1) and reads the weights once for all of them. The step's plan
is the set of (row, k) with the most tokens per second:

    (n + sum of E(p_i, k_i)) / (t(n, 1) + sum of t(1, 1 + k_i))      (k_i = 0: row i rides along)

chosen greedily, best row first, each k the one that raises that ratio most (draft_length with
the plan so far as `base`). A lone row is the case n = 0 of it: its plain step is the same B = 1
step with no draft. SmolLM2-135M fp32 on 2 cores, t(1, 1 + k) = 23, 26, 30, 39 ms for k = 0, 4,
7, 15: text that copies (p ~ 0.99) takes k = 15 alone (~15 tokens a step) and in a batch of
three (t(3, 1) ~ 30 ms: 3 + 3 x 15 tokens in 150 ms against 3 in 30); text that does not
(p ~ 0.4) takes 2 or 3 alone and none beside eight plain rows (t(8, 1) ~ 44 ms, 180 tok/s).

What the model does not know it learns from the tokens as they come (Acceptance): p is measured
over a row's last ~WINDOW draft tokens, those its verify steps took and, for free, the first
token of each draft it was offered while it rode a plain step (the plain step's token either is
that token or is not). So a row whose text starts copying after a sentence of its own is seen
to, without a verify step to find out, and one whose text stopped copying is seen to as well.
Step times are measured only for the steps that run; lengths never run, or not for STALE_STEPS
steps, are interpolated between timed ones (Curve), and a lone row's first draft is made
whatever the costs say (`tried`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

COST_EMA = 0.25  # weight of the newest step time (steps are noisy on a shared 2-core board)
WINDOW = 32  # draft tokens an acceptance is measured over (older ones fade by 1/e per WINDOW)
STALE_STEPS = 500  # steps after which a verify length's time is measured again (~20 s at c=8)
# verify time a step may add beside rows that ride it, per plain step's time: riders' gaps
# stay within 3x. 1.0 (2x, near chunked prefill's 1.8x) cost 8 greedy streams of the bench's
# prompts ~20 % of their tokens/s in an A/B; 2.0 kept them (same-round median 1.08x) and cut
# the p95 gap to 0.90x, and a rider's beside 7 copying streams to 0.80x
RIDER_SHARE = 2.0


@dataclass(frozen=True)
class Curve:
    """t(1, tokens), the time of a one-row step, for this step's plan: the timed lengths, sorted.
    Built once per step (StepCosts.curve) and read once per row and candidate length."""

    points: tuple[tuple[int, float], ...]  # (tokens, seconds), tokens ascending, 1 always present

    def at(self, tokens: int) -> float:
        """Between two timed lengths, the straight line; past the longest, what that one took
        (a guess on the low side, so the longer step gets tried and its time replaces the guess).
        Trying each length once instead cost a device whose step time grows with its tokens a
        wasted verify step per length and row."""
        lo = self.points[0]
        for hi in self.points:
            if hi[0] == tokens:
                return hi[1]
            if hi[0] > tokens:
                return lo[1] + (hi[1] - lo[1]) * (tokens - lo[0]) / (hi[0] - lo[0])
            lo = hi
        return lo[1]


@dataclass
class StepCosts:
    """Seconds per backend step by (rows, tokens per row): a moving average of those run, and
    the step count at which each was last run (`ran`)."""

    seconds: dict[tuple[int, int], float] = field(default_factory=dict)
    ran: dict[tuple[int, int], int] = field(default_factory=dict)
    steps: int = 0

    def observe(self, rows: int, tokens: int, seconds: float) -> None:
        key = (rows, tokens)
        old = self.seconds.get(key)
        self.seconds[key] = seconds if old is None else old + COST_EMA * (seconds - old)
        self.steps += 1
        self.ran[key] = self.steps

    def get(self, rows: int, tokens: int) -> float | None:
        return self.seconds.get((rows, tokens))

    def joint_curve(self, rows: int, base: int = 2) -> Curve | None:
        """t(rows, tokens) of joint steps (every row of a span at once, each padded to `tokens`:
        convert/ragged.py) for tokens >= base, the step with no draft (1 where the graph gives a
        row of one token its spare, 2 where the host does); None until that step has been timed
        for this many rows. Stale lengths are left out as in curve()."""
        timed = {t: s for (r, t), s in self.seconds.items()
                 if r == rows and t >= base and (t == base or self.steps - self.ran[r, t] < STALE_STEPS)}
        return Curve(tuple(sorted(timed.items()))) if base in timed else None

    def curve(self) -> Curve | None:
        """The one-row steps timed so far; None before any one-token step was. A verify length
        not run for STALE_STEPS steps is left out (guessed again from the others, on the low
        side, so it is tried and re-timed): a time measured under a passing load would otherwise
        keep a batch from ever verifying that long a draft again. t(1, 1) never
        timed (a batch decoding from the start): the cheapest one-token step of any rows stands
        in, a memory-bound step costing about the same for a few more rows."""
        ones = [s for (_, t), s in self.seconds.items() if t == 1]
        if not ones:
            return None
        one_row = {t: s for (rows, t), s in self.seconds.items()
                   if rows == 1 and (t == 1 or self.steps - self.ran[rows, t] < STALE_STEPS)}
        one_row.setdefault(1, min(ones))
        return Curve(tuple(sorted(one_row.items())))


@dataclass
class Acceptance:
    """A row's p: the share of its draft tokens that were right (each given the ones before it
    were), over its last ~WINDOW of them, smoothed by two tokens' worth of `prior`. Recent ones
    count: text switches between copying and not within a few dozen tokens, and a lifetime count
    took hundreds of right tokens to forget thirty wrong ones.

    The prior of a new row is the engine's own acceptance over its recent draft tokens, all rows
    together (0.5 before any). With a fixed 0.5 every new row of a joint step started with short
    drafts and learned its way up: bursts of 8 of bench/serve.py's streams (SmolLM2 fp32, 128
    tokens each, 2026-12-06 00:30) took 14 and 18 joint steps, 3 and 5 of them at T <= 4, where
    the engine's prior gives 8 and 11 (none and one). A row whose text does not copy, after rows
    that did, is down to p < 0.5 after two wrong tokens."""

    right: float = 0.0  # decayed counts
    wrong: float = 0.0
    prior: float = 0.5

    def observe(self, right: bool) -> None:
        self.right -= self.right / WINDOW
        self.wrong -= self.wrong / WINDOW
        if right:
            self.right += 1.0
        else:
            self.wrong += 1.0

    @property
    def p(self) -> float:
        return (self.right + 2.0 * self.prior) / (self.right + self.wrong + 2.0)


def expected_tokens(p: float, k: int) -> float:
    """E(p, k) = 1 + p + ... + p^k: the pending token, then each draft token while all before it held."""
    return float(k + 1) if p >= 1.0 else (1.0 - p ** (k + 1)) / (1.0 - p)


def draft_length(p: float, room: int, curve: Curve | None, base: tuple[float, float] = (0.0, 0.0),
                 tried: bool = True) -> int:
    """How many of `room` draft tokens to verify: the k with the most tokens per second for the
    plan `base` = (tokens, seconds) plus this row's verify step (a lone row: nothing else).
    0: the verify step does not pay (the row rides the plain step, or a lone row steps one
    token), which only a row that has verified drafts (`tried`) may be told: the step times of
    drafts are measured only when drafts run, so one noisy slow verify step once kept every
    later request of an engine from drafting (CI, under load). Nothing timed yet: all of room."""
    if curve is None:
        return room
    tokens, seconds = base
    # k = 0: the plan without this row's verify step (a lone row: its plain one-token step)
    best, best_rate = 0, (tokens / seconds if tokens else 1.0 / curve.at(1))
    if not tried:  # the first draft is made whatever it costs; at least 1 token
        best, best_rate = 1, float("-inf")
    for k in range(1, room + 1):
        rate = (tokens + expected_tokens(p, k)) / (seconds + curve.at(1 + k))
        if rate > best_rate:
            best, best_rate = k, rate
    return best


@dataclass(frozen=True)
class Row:
    """A row with a draft on offer this step."""

    slot: int
    p: float  # its Acceptance.p
    room: int  # draft tokens on offer
    tried: bool = True  # it has verified a draft before (read for a lone row only)


def plan(rows: Sequence[Row], active: int, plain_seconds: float | None,
         curve: Curve | None) -> dict[int, int]:
    """slot -> draft tokens its verify step takes this step; rows left out ride the plain step
    of all `active` rows, which takes plain_seconds (None: that step size was never timed, so
    nothing drafts and the plain step gets measured).

    Rows that ride wait for the verify steps as well as the plain one: the plan with the most
    tokens per second may give seven rows that copy 15 tokens a step each while the one that
    does not waits ~7 verify steps per token (SmolLM2 fp32, 2 cores: 317 ms a token against
    44 ms). So where some row rides, the verify steps together may take at most RIDER_SHARE
    times the plain step (drafts are cut to fit, best rows first): a rider's time per output
    token stays within 1 + RIDER_SHARE of what it is without drafting. Where every row
    verifies, none waits on another's draft more than on its own, and the plan is not
    bounded."""
    if active <= 1:
        return {r.slot: k for r in rows if (k := draft_length(r.p, r.room, curve, tried=r.tried))}
    if curve is None or plain_seconds is None:
        return {}
    chosen = _greedy(rows, active, plain_seconds, curve, float("inf"))
    if len(chosen) == active:
        return chosen
    return _greedy(rows, active, plain_seconds, curve, RIDER_SHARE * plain_seconds)


def joint_length(rows: Sequence[Row], active: int, curve: Curve | None, base: int = 2) -> int:
    """T for a joint step: one [W, T] step of every active row (a backend with ragged steps,
    convert/ragged.py), each row its pending token plus min(room, T - 1) of its draft, so a
    row's draft tokens cost nothing beyond the step's T. `base`: the step with no draft, T = 1
    where the graph gives a row of one token its spare at the attention nodes (row spares), 2
    where it carries one from the host. The T >= base with the most expected tokens per second,

        (riders + sum of E(p_i, min(room_i, T - 1))) / t(W, T),

    where riders, the rows without a draft (sampled rows, text that found no match), take one
    token whatever T is; while any rides, t(W, T) may be at most 1 + RIDER_SHARE times the
    base step's, as in plan(). curve: joint_curve(W, base); None (that step never timed): base."""
    if curve is None or not rows:
        return base
    riders = active - len(rows)
    limit = (1.0 + RIDER_SHARE) * curve.at(base) if riders else float("inf")
    best, best_rate = base, float("-inf")
    for T in range(base, 2 + max(r.room for r in rows)):
        seconds = curve.at(T)
        if T > base and seconds > limit:
            break
        rate = (riders + sum(expected_tokens(r.p, min(r.room, T - 1)) for r in rows)) / seconds
        if rate > best_rate:
            best, best_rate = T, rate
    return best


def _greedy(rows: Sequence[Row], active: int, plain_seconds: float, curve: Curve,
            budget: float) -> dict[int, int]:
    """Best row first, each with the k that raises the plan's rate most, the verify steps
    together within `budget` seconds."""
    chosen: dict[int, int] = {}
    tokens, seconds = float(active), plain_seconds

    def alone(r: Row) -> float:  # its best rate on its own: the order rows are offered in
        k = max(1, draft_length(r.p, r.room, curve))
        return expected_tokens(r.p, k) / curve.at(1 + k)

    for r in sorted(rows, key=alone, reverse=True):
        room = r.room
        while room and curve.at(1 + room) > budget:  # the longest draft that fits
            room -= 1
        if room and (k := draft_length(r.p, room, curve, base=(tokens, seconds))):
            chosen[r.slot] = k
            tokens, seconds = tokens + expected_tokens(r.p, k), seconds + curve.at(1 + k)
            budget -= curve.at(1 + k)
    return chosen
