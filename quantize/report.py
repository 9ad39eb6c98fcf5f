"""report.md for a quantized bundle and the summary `toolkit quantize` prints."""

from __future__ import annotations

import json
from typing import Any

from bundle.manifest import Manifest
from convert.summary import mib


def render(m: Manifest) -> str:
    """The convert report (convert.pipeline.render_report) with a Quantization section."""
    from convert.pipeline import render_report

    base = render_report(m)
    return base.rstrip("\n") + "\n\n" + "\n".join(section(m.quantization or {})) + "\n"


def section(q: dict[str, Any]) -> list[str]:
    gate = q.get("gate", {})
    verdict = "PASSED" if gate.get("passed") else ("FAILED (written with --force)" if q.get("forced")
                                                   else "FAILED")
    lines = ["## Quantization", "",
             f"- {q.get('precision')} as `{q.get('format')}` for {q.get('runtime')}: {q.get('summary')}",
             f"- accuracy gate: **{verdict}** ({gate.get('runtime', '')})"]
    lines += [f"  - {line}" for line in gate_lines(gate)]
    for failure in gate.get("failures", []):
        lines.append(f"  - failure: {failure}")
    for t in (q.get("grid_choice") or {}).get("tried", []):
        figure = (f"ppl {100 * t['ppl_increase']:+.2f} %, top-1 {t['top1_agreement']:.4f}"
                  if t.get("ppl_increase") is not None else f"cosine min {t.get('cosine_min')}")
        block = f" in blocks of {t['block_size']}" if t.get("block_size") else ""
        lines.append(f"- int4 grid tried: {t['grid']}{block}: {figure} -> "
                     f"{'passed' if t['passed'] else 'failed'}")
    cal = q.get("calibration", {})
    if cal.get("samples"):
        lines.append(f"- calibration: {cal['samples']} x {cal['seq_len']} tokens of {cal['source']}")
    else:
        lines.append(f"- calibration: not used ({cal.get('why', 'weight-only')})")
    awq = (q.get("details") or {}).get("awq")
    if awq:
        lines.append(f"- AWQ before the {awq['grid']} grid: {awq['scaled_inputs']} layer inputs "
                     f"rescaled, {awq['plain_inputs']} kept (plain rounding was best), "
                     f"{awq['skipped_inputs']} not rescaled; output error "
                     f"{awq['error_vs_plain_rounding']:.2f}x plain rounding's on the calibration rows")
    if q.get("tensorrt"):
        lines.append(f"- TensorRT: {q['tensorrt']['build']}; {q['tensorrt']['opset_note']}")
    lines += ["", "```json", json.dumps(q.get("details", {}), indent=1, default=str)[:3000], "```"]
    return lines


def gate_lines(gate: dict[str, Any]) -> list[str]:
    t = gate.get("thresholds", {})
    if "cosine_min" in gate:
        return [f"cosine to fp32: min {gate['cosine_min']:.5f}, mean {gate['cosine_mean']:.5f} "
                f"over {gate['sentences']} held-out sentences (min >= {t.get('min_cosine')})"]
    greedy = gate.get("greedy", [])
    return [f"perplexity {gate['ppl_fp32']:.3f} -> {gate['ppl_quantized']:.3f} "
            f"({100 * gate['ppl_increase']:+.2f} %, limit +{100 * t.get('max_ppl_increase', 0):.0f} %) "
            f"over {gate['tokens']} held-out tokens",
            f"top-1 next-token agreement {gate['top1_agreement']:.4f} (min {t.get('min_top1')})",
            f"greedy continuations: {sum(g['matched'] for g in greedy)}/{sum(g['of'] for g in greedy)} "
            f"tokens match before the first divergence (min fraction {t.get('min_greedy')}; per "
            f"prompt {', '.join(str(g['matched']) + '/' + str(g['of']) for g in greedy)})"]


def summary(result: Any) -> str:
    """What `toolkit quantize` prints at the end."""
    m = result.manifest
    q = m.quantization or {}
    gate = q.get("gate", {})
    ratio = result.bytes / result.source_bytes if result.source_bytes else 0.0
    verdict = "passed" if gate.get("passed") else "FAILED (written because of --force)"
    lines = ["", f"bundle  {result.bundle}  ({mib(result.bytes)}, {ratio:.2f}x the fp32 "
                 f"{mib(result.source_bytes)})",
             f"  model      {m.name}  [{m.kind}, {m.precision} as {q.get('format')}, "
             f"target {m.target['name']}]",
             f"  gate       {verdict}"]
    lines += [f"             {line}" for line in gate_lines(gate)]
    details = q.get("details") or {}
    if m.precision == "int4" and details.get("grid"):
        awq = details.get("awq")
        lines.append(f"  int4 grid  {details['grid']} in blocks of {details.get('block_size')}"
                     + (f" after AWQ ({awq['scaled_inputs']} layer inputs rescaled)" if awq else ""))
    if m.kv_cache:
        lines.append(f"  kv cache   {m.kv_cache.get('dtype')}, max_seq {m.max_seq}")
    lines.append("")
    return "\n".join(lines)


def failure_summary(gate: Any) -> str:
    """Printed before the error when the gate fails: the figures that made it fail."""
    return "\n".join(["", "accuracy gate FAILED:"] + [f"  {line}" for line in gate.lines()] + [""])
