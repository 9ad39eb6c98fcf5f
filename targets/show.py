"""Targets and plans as terminal text (`toolkit targets`, `toolkit targets show`, `toolkit plan`).

    print(targets_table(list_targets()))
    print(describe(load_target("jetson-orin-nano-8gb")))
    print(render_plan(plan_from_model("smollm2-135m", "cpu")))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from targets import GIB, Target

if TYPE_CHECKING:
    from targets.plan import PlanResult

TARGETS_FOOTER = ("`toolkit targets show NAME` explains one; `toolkit plan MODEL --target NAME` "
                  "says whether a model fits.")


def targets_table(all_targets: Sequence[Target]) -> str:
    """One row per target: runtime, memory, bandwidth, precisions, TensorRT."""
    header = ("name", "runtime", "memory", "bandwidth", "precisions", "TensorRT")
    rows = [(t.name, t.runtime, _memory(t), f"{t.memory_bandwidth_gbs:g} GB/s",
             ", ".join(t.precisions), t.tensorrt or "-") for t in all_targets]
    return table(header, rows)


def describe(t: Target) -> str:
    """The prose, the fields and the sources of one target."""
    lines = [f"{t.name}: {t.description}", "", *_prose(t), "", "Fields:"]
    fields = [
        ("family", t.family), ("runtime", t.runtime), ("arch", ", ".join(t.arch)),
        ("memory", _memory(t)), ("unified memory", "yes" if t.unified_memory else "no"),
        ("OS reserve", f"{t.os_reserve_gb:g} GiB"),
        ("bandwidth", f"{t.memory_bandwidth_gbs:g} GB/s"),
        ("precisions", ", ".join(t.precisions)),
        ("formats", ", ".join(f"{p}={f}" for p, f in t.formats.items()) or "-"),
        ("peak (dense)", ", ".join(f"{p} {v:g}" for p, v in t.peak_tflops.items()) + " TFLOPS"),
        ("compute / KV dtype", f"{t.compute_dtype} / {t.kv_dtype}"),
        ("compute capability", t.compute_capability or "-"),
        ("JetPack / L4T", f"{t.jetpack} / {t.l4t}" if t.jetpack else "-"),
        ("TensorRT / CUDA", f"{t.tensorrt} / {t.cuda}" if t.tensorrt else "-"),
        ("default max_seq", str(t.default_max_seq)),
    ]
    width = max(len(k) for k, _ in fields)
    lines += [f"  {k:<{width}}  {v}" for k, v in fields]
    if t.notes:
        lines += ["", "Notes:", *(f"  - {n}" for n in t.notes)]
    if t.sources:
        lines += ["", "Sources:", *(f"  - {s}" for s in t.sources)]
    return "\n".join(lines)


def _prose(t: Target) -> list[str]:
    out = [f"It runs {', '.join(t.precisions)} (most accurate first) through {t.runtime}."]
    if t.unified_memory:
        out.append(f"Its {t.memory_gb:g} GiB are unified: CPU, GPU and the OS share one pool, so "
                   f"plans set aside {t.os_reserve_gb:g} GiB for the OS before the model.")
    elif t.host_memory:
        out.append("Its memory is the host's own, read when you plan or convert.")
    if t.builds_on_device:
        out.append(
            "Engines are built on the device: a TensorRT engine only runs on the TensorRT "
            f"version and GPU that built it (here TensorRT {t.tensorrt}, JetPack {t.jetpack}, "
            f"SM {t.compute_capability}), so the bundle carries the ONNX graph and the engine "
            "is built on the board itself, and rebuilt after a JetPack upgrade.")
    if "fp8" not in t.precisions and t.compute_capability:
        out.append(f"No fp8: it needs compute capability 8.9 or newer and this GPU is "
                   f"SM {t.compute_capability}.")
    return out


def _memory(t: Target) -> str:
    if t.host_memory:
        return f"host ({t.memory_total_bytes() / GIB:.1f} GiB)"
    return f"{t.memory_gb:g} GiB"


def render_plan(r: PlanResult) -> str:
    """The table of components per precision, the verdict and the warnings."""

    def gib(n: int) -> str:
        return f"{n / GIB:.2f}"

    chunk = f"{r.prefill_chunk}-token" if r.prefill_chunk else "whole-prompt"
    head = (f"{r.model} on {r.target} ({r.runtime}): max_seq {r.max_seq}, batch {r.batch}, "
            f"{chunk} prefill; memory {gib(r.memory_total)} GiB ({r.memory_source})")
    header = ("precision", "format", "weights", "KV cache", "activations", "runtime",
              "OS reserve", "total GiB", "fits", "decode tok/s", f"prefill {r.max_seq} s")
    rows = []
    for row in r.rows:
        c = row.components
        mark = " *" if row.precision == r.precision else ""
        rows.append((row.precision + mark, row.format,
                     gib(c.weights), gib(c.kv_cache), gib(c.activations), gib(c.runtime),
                     gib(c.os_reserve), gib(c.total), "yes" if row.fits else "no",
                     f"{row.speed.decode_tokens_s:.1f}", f"{row.speed.prefill_s:.2f}"))
    verdict = ("FITS" if r.fits else "DOES NOT FIT") + f": {r.explain()}"
    lines = [head, "", table(header, rows), "", verdict]
    lines += [f"warning: {w}" for w in r.warnings]
    lines.append("(* the precision judged; speeds are roofline estimates from the target's "
                 "bandwidth and dense peak; --json lists the formulas)")
    return "\n".join(lines)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
