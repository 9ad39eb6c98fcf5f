"""Size / perplexity / speed points of the quantization bench: the Pareto table, the peer check,
same-round speed ratios and the plot (bench/quantize.py prints and writes them).

    pts = [Point("ours int4", "ours", 92e6, 27.1, [210.0, 205.0]), Point("genai int4", "peer", ...)]
    print(pareto_table(pts)); beaten = dominated(pts); paired_ratio(ours.tok_s, peer.tok_s)
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Point:
    name: str
    side: str  # "ours" | "peer"
    bytes: int
    ppl: float | None  # held-out perplexity (lower is more accurate)
    tok_s: list[float] = field(default_factory=list)  # decode tokens/s, one per round

    @property
    def speed(self) -> float | None:
        """The median round (the CPU may be shared: no best-of)."""
        return statistics.median(self.tok_s) if self.tok_s else None


def paired_ratio(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Median over rounds of a[r] / b[r]: each pair ran in the same round (same CPU weather);
    rounds where either is missing are skipped."""
    pairs = [x / y for x, y in zip(a, b) if x and y]
    return statistics.median(pairs) if pairs else None


def _measured(p: Point) -> bool:
    return p.ppl is not None and p.speed is not None


def speed_ratio(p: Point, q: Point) -> float:
    """p's decode speed over q's: the median of their same-round ratios, as every ratio of the
    benches (this VM's load moves by tens of percent between rounds, and every point of a round
    ran in it); the ratio of their median rounds where they share no round."""
    return paired_ratio(p.tok_s, q.tok_s) or p.speed / q.speed  # type: ignore[operator]


def beats(p: Point, q: Point) -> bool:
    """p is both faster (same-round ratio > 1) and more accurate than q (strictly, on both)."""
    return _measured(p) and _measured(q) and p.ppl < q.ppl and speed_ratio(p, q) > 1  # type: ignore[operator]


def pareto(points: list[Point]) -> list[Point]:
    """The points no other point beats on size, perplexity and speed together (at least as good
    on all three and better on one; speed by same-round ratio), smallest first."""
    def better(p: Point, q: Point) -> bool:
        r = speed_ratio(p, q)
        no_worse = p.bytes <= q.bytes and p.ppl <= q.ppl and r >= 1  # type: ignore[operator]
        return no_worse and (p.bytes < q.bytes or p.ppl < q.ppl or r > 1)  # type: ignore[operator]

    done = [p for p in points if _measured(p)]
    return sorted((p for p in done if not any(better(q, p) for q in done if q is not p)),
                  key=lambda p: p.bytes)


def dominated(points: list[Point]) -> list[tuple[Point, Point]]:
    """(peer, ours) for every peer point that is both faster and more accurate than one of ours."""
    return [(p, o) for p in points if p.side == "peer" for o in points if o.side == "ours" and beats(p, o)]


def pareto_table(points: list[Point]) -> str:
    front = {p.name for p in pareto(points)}
    lines = [f"{'point':44} {'size MiB':>9} {'ppl':>8} {'tok/s (median)':>15}  Pareto"]
    for p in sorted(points, key=lambda p: p.bytes):
        ppl = f"{p.ppl:.3f}" if p.ppl is not None else "n/a"
        speed = f"{p.speed:.1f}" if p.speed is not None else "n/a"
        lines.append(f"{p.name:44} {p.bytes / 2**20:9.1f} {ppl:>8} {speed:>15}  "
                     f"{'yes' if p.name in front else ''}")
    beaten = dominated(points)
    lines.append("peer points both faster (median of same-round ratios) and more accurate than "
                 "one of ours: " + ("; ".join(f"{p.name} beats {o.name} ({speed_ratio(p, o):.2f}x, "
                                             f"ppl {p.ppl:.3f} < {o.ppl:.3f})" for p, o in beaten)
                                   if beaten else "none"))
    return "\n".join(lines)


def plot(points: list[Point], path: Path, title: str) -> Path | None:
    """Size (x) against perplexity (y), marker area by decode speed, ours and peers in two
    colours; None (and nothing written) without matplotlib (the `report` extra)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in points if _measured(p)]
    fig, (ax, key) = plt.subplots(1, 2, figsize=(12, 6), gridspec_kw={"width_ratios": [3, 1.4]})
    top = max((p.speed or 0.0) for p in done) if done else 1.0
    for side, colour in (("ours", "tab:blue"), ("peer", "tab:orange")):
        sel = [p for p in done if p.side == side]
        ax.scatter([p.bytes / 2**20 for p in sel], [p.ppl or 0.0 for p in sel],
                   s=[40 + 400 * (p.speed or 0.0) / top for p in sel], c=colour, alpha=0.6,
                   label=side)
    # Points are numbered and named in the key beside the plot: names written at the markers
    # overlap where several points share a size and perplexity (a bundle in-process and
    # through the daemon, the kept ladder step and the default).
    spots: dict[tuple[float, float], list[int]] = {}
    for i, p in enumerate(done, 1):
        spots.setdefault((round(p.bytes / 2**20), round(p.ppl or 0.0, 1)), []).append(i)
    for i, p in enumerate(done, 1):
        numbers = spots[(round(p.bytes / 2**20), round(p.ppl or 0.0, 1))]
        if numbers[0] == i:
            ax.annotate(",".join(map(str, numbers)), (p.bytes / 2**20, p.ppl or 0.0), fontsize=7,
                        xytext=(5, 4), textcoords="offset points")
    key.axis("off")
    key.text(0, 1, "\n".join(f"{i:>2}  {p.name}  {p.speed or 0.0:.0f} tok/s"
                             for i, p in enumerate(done, 1)),
             va="top", ha="left", fontsize=7, family="monospace", transform=key.transAxes)
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel("held-out perplexity (lower is better)")
    ax.set_title(title + "\nmarker area: decode tokens/s (median round)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
