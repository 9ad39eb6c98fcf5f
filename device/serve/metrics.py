"""Prometheus text exposition (format 0.0.4) without the prometheus_client dependency.

Names follow Prometheus' naming rules (protocols.md §1d): base units with a unit suffix,
`_total` on counters, ratios in 0..1, one application prefix `toolkit_` (underscore, not
vLLM's colon: colons are reserved for recording rules). Histogram buckets are vLLM's, verbatim,
so dashboards built for vLLM keep their thresholds.

Everything here is thread-safe: the engine thread observes, HTTP threads render.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence

PREFIX = "toolkit_"

# vLLM v1 bucket sets (protocols.md §1d, [R7])
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    esc = {k: v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]) -> None:
        self.name, self.help = PREFIX + name, help
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last: +Inf
        self.sum = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def render(self) -> list[str]:
        with self.lock:
            counts, total = list(self.counts), self.sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for bound, n in zip((*self.bounds, math.inf), counts):
            cum += n
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cum}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {cum}"]
        return lines


class Counter:
    """A counter family; one series per label set (e.g. finished_reason="stop")."""

    def __init__(self, name: str, help: str) -> None:
        self.name, self.help = PREFIX + name, help
        self.values: dict[tuple[tuple[str, str], ...], float] = {}
        self.lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: str) -> float:
        with self.lock:
            return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items()) or [((), 0.0)]
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(dict(k))} {_fmt(v)}" for k, v in items]
        return lines


class Gauge:
    """A gauge read at scrape time from a callable (no state to keep in sync)."""

    def __init__(self, name: str, help: str, read: Callable[[], float], labels: dict[str, str] | None = None,
                 prefixed: bool = True) -> None:
        self.name, self.help = (PREFIX + name if prefixed else name), help
        self.read, self.labels = read, labels or {}

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name}{_labels(self.labels)} {_fmt(self.read())}"]


class Registry:
    def __init__(self) -> None:
        self.metrics: list[Histogram | Counter | Gauge] = []

    def add(self, metric: Histogram | Counter | Gauge) -> Histogram | Counter | Gauge:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


class ServingMetrics:
    """The daemon's request metrics. Gauges are attached by the server (they read live state)."""

    def __init__(self) -> None:
        self.registry = Registry()
        self.ttft = Histogram("time_to_first_token_seconds",
                              "Time from request arrival to its first generated token.", TTFT_BUCKETS)
        self.tpot = Histogram("time_per_output_token_seconds",
                              "Mean time per generated token after the first, per request.", TPOT_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds",
                             "Time from request arrival to its last token.", E2E_BUCKETS)
        self.queue = Histogram("request_queue_time_seconds",
                               "Time a request waited for a KV slot.", E2E_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("generation_tokens_total", "Tokens generated.")
        self.success = Counter("request_success_total", "Requests finished, by finished_reason.")
        self.failure = Counter("request_failure_total", "Requests that failed or were refused, by reason.")
        self.prefix_hits = Counter("prefix_cache_hits_total",
                                   "Prompts that reused cached KV rows of a prefix.")
        self.prefix_misses = Counter("prefix_cache_misses_total",
                                     "Prompts that found no cached prefix (prefix cache on).")
        self.prefix_tokens = Counter("prefix_cache_reused_tokens_total",
                                     "Prompt tokens copied from the prefix cache instead of computed.")
        self.prefill_chunks = Counter("prefill_chunks_total",
                                      "Prompt chunks prefilled between other requests' decode steps.")
        # vLLM's spec_decode_num_{draft,accepted}_tokens_total: prompt-lookup drafts
        self.draft_tokens = Counter("spec_decode_num_draft_tokens_total",
                                    "Draft tokens (prompt lookup) verified by the model.")
        self.accepted_tokens = Counter("spec_decode_num_accepted_tokens_total",
                                       "Draft tokens that the model's own choice equalled.")
        for m in (self.ttft, self.tpot, self.e2e, self.queue, self.prompt_tokens,
                  self.generation_tokens, self.success, self.failure, self.prefix_hits,
                  self.prefix_misses, self.prefix_tokens, self.prefill_chunks, self.draft_tokens,
                  self.accepted_tokens):
            self.registry.add(m)

    def add_gauges(self, gauges: Iterable[Gauge]) -> None:
        for g in gauges:
            self.registry.add(g)

    def set_gauges(self, gauges: Iterable[Gauge]) -> None:
        """Attach gauges in place of any attached before (a deploy swaps the served bundle).
        One assignment: a scrape in progress renders the old list."""
        kept = [m for m in self.registry.metrics if not isinstance(m, Gauge)]
        self.registry.metrics = kept + list(gauges)

    def render(self) -> str:
        return self.registry.render()
