"""report.md for a quantized bundle and the summary `toolkit quantize` prints."""

from __future__ import annotations

import json
from typing import Any

from bundle.manifest import GateRecord, Manifest, Quantization
from convert.summary import mib

SHOWN = 6  # 8-bit matrices named in the printed summary (report.md names them all)


def render(m: Manifest) -> str:
    """The convert report (convert.pipeline.render_report) with a Quantization section."""
    from convert.pipeline import render_report

    base = render_report(m)
    if m.quantization is None:
        return base
    return base.rstrip("\n") + "\n\n" + "\n".join(section(m.precision, m.quantization)) + "\n"


def section(precision: str, q: Quantization) -> list[str]:
    gate = q.gate
    verdict = ("PASSED" if gate and gate.passed else
               "FAILED (written with --force)" if q.forced else "FAILED")
    lines = ["## Quantization", "",
             f"- {precision} as `{q.format}` for {q.runtime}: {q.summary}",
             f"- accuracy gate: **{verdict}** ({gate.runtime if gate else ''})"]
    if gate is not None:
        lines += [f"  - {line}" for line in gate_lines(gate)]
        lines += [f"  - failure: {failure}" for failure in gate.failures]
    for t in (q.grid_choice or {}).get("tried", []):
        figure = (f"ppl {100 * t['ppl_increase']:+.2f} %, top-1 {t['top1_agreement']:.4f}"
                  if t.get("ppl_increase") is not None else f"cosine min {t.get('cosine_min')}")
        block = f" in blocks of {t['block_size']}" if t.get("block_size") else ""
        mixed = (f" + {t['int8_units']} most sensitive weight units at 8 bits"
                 if t.get("int8_units") else "")
        size = f", {mib(t['model_bytes'])}" if t.get("model_bytes") else ""
        lines.append(f"- int4 grid tried: {t['grid']}{block}{mixed}: {figure}{size} -> "
                     f"{'passed' if t['passed'] else 'failed'}")
    cal = q.calibration
    if cal.get("samples"):
        lines.append(f"- calibration: {cal['samples']} x {cal['seq_len']} tokens of {cal['source']}")
    else:
        lines.append(f"- calibration: not used ({cal.get('why', 'weight-only')})")
    awq = q.details.get("awq")
    if awq:
        lines.append(f"- AWQ before the {awq['grid']} grid: {awq['scaled_inputs']} layer inputs "
                     f"rescaled, {awq['plain_inputs']} kept (plain rounding was best), "
                     f"{awq['skipped_inputs']} not rescaled; output error "
                     f"{awq['error_vs_plain_rounding']:.2f}x plain rounding's on the calibration rows")
        for why, n in awq.get("not_rescaled", {}).items():
            lines.append(f"  - {n} not rescaled: {why}")
    lines += sensitivity_lines(q)
    if q.tensorrt:
        lines.append(f"- TensorRT: {q.tensorrt['build']}; {q.tensorrt['opset_note']}")
    lines += ["", "```json", json.dumps(q.details, indent=1, default=str)[:3000], "```"]
    return lines


def sensitivity_lines(q: Quantization) -> list[str]:
    """The most sensitive weight units and the 8-bit set of a mixed int4 step."""
    # the kept graph's own ranking, or (an exact grid kept) the last ranking the ladder measured
    sens = q.details.get("sensitivity") or (q.grid_choice or {}).get("sensitivity")
    wide = q.details.get("int8_weights")
    if not sens:
        return []
    lines = [f"- sensitivity on the {sens['grid']} grid in blocks of {sens['block_size']} "
             f"({sens['proxy']}; over {sens['tokens']} calibration tokens; {sens['units']} "
             f"weight units, the most sensitive):"]
    lines += [f"  - {u['divergence']:.4g} {' + '.join(u['layers'])}" for u in sens["top"][:5]]
    if wide and wide["units"]:
        cost = mixed_cost(q)
        lines.append(f"- at 8 bits: the {wide['units']} of {wide['of']} most sensitive weight units "
                     f"({len(wide['layers'])} matrices: {', '.join(wide['layers'])})"
                     + (f"; {cost}" if cost else ""))
    return lines


def mixed_cost(q: Quantization) -> str:
    """What the 8-bit units cost against the same grid all at 4 bits, when the ladder tried it."""
    tried = (q.grid_choice or {}).get("tried", [])
    if not tried or not tried[-1].get("int8_units"):
        return ""
    kept = tried[-1]
    pure = [t for t in tried if (t["grid"], t["block_size"], t.get("int8_units")) ==
            (kept["grid"], kept["block_size"], 0) and t.get("model_bytes")]
    if not pure:
        return ""
    extra = kept["model_bytes"] - pure[0]["model_bytes"]
    return f"+{mib(extra)} ({100 * extra / pure[0]['model_bytes']:+.1f} %) over the all-4-bit graph"


def gate_lines(gate: GateRecord) -> list[str]:
    t = gate.thresholds
    if gate.cosine_min is not None:
        return [f"cosine to fp32: min {gate.cosine_min:.5f}, mean {gate.cosine_mean:.5f} "
                f"over {gate.sentences} held-out sentences (min >= {t.get('min_cosine')})"]
    greedy = gate.greedy or []
    return [f"perplexity {gate.ppl_fp32:.3f} -> {gate.ppl_quantized:.3f} "
            f"({100 * (gate.ppl_increase or 0):+.2f} %, limit "
            f"+{100 * (t.get('max_ppl_increase') or 0):.0f} %) over {gate.tokens} held-out tokens",
            f"top-1 next-token agreement {gate.top1_agreement:.4f} (min {t.get('min_top1')})",
            f"greedy continuations: {sum(g['matched'] for g in greedy)}/{sum(g['of'] for g in greedy)} "
            f"tokens match before the first divergence (min fraction {t.get('min_greedy')}; per "
            f"prompt {', '.join(str(g['matched']) + '/' + str(g['of']) for g in greedy)})"]


def summary(result: Any) -> str:
    """What `toolkit quantize` prints at the end."""
    m = result.manifest
    q, gate = m.quantization, m.quantization.gate
    ratio = result.bytes / result.source_bytes if result.source_bytes else 0.0
    verdict = "passed" if gate.passed else "FAILED (written because of --force)"
    lines = ["", f"bundle  {result.bundle}  ({mib(result.bytes)}, {ratio:.2f}x the fp32 "
                 f"{mib(result.source_bytes)})",
             f"  model      {m.name}  [{m.kind}, {m.precision} as {q.format}, "
             f"target {m.target.name}]",
             f"  gate       {verdict}"]
    lines += [f"             {line}" for line in gate_lines(gate)]
    details = q.details
    if m.precision == "int4" and details.get("grid"):
        awq = details.get("awq")
        lines.append(f"  int4 grid  {details['grid']} in blocks of {details.get('block_size')}"
                     + (f" after AWQ ({awq['scaled_inputs']} layer inputs rescaled)" if awq else ""))
        wide = details.get("int8_weights")
        if wide and wide["units"]:
            cost = mixed_cost(q)
            shown = ", ".join(wide["layers"][:SHOWN]) + (", ..." if len(wide["layers"]) > SHOWN else "")
            lines.append(f"  8-bit      the {wide['units']} of {wide['of']} most sensitive weight "
                         f"units ({len(wide['layers'])} matrices: {shown})" + (f", {cost}" if cost else ""))
    elif m.precision == "int8" and details.get("int8_grid"):  # CPU MatMulNBits
        head = (f", the tied head symmetric in blocks of {details.get('head_block_size')}"
                if details.get("tied_head") else "")
        lines.append(f"  int8 grid  {details['int8_grid']} in blocks of {details.get('block_size')}{head}")
    if m.kind == "decoder":
        lines.append(f"  kv cache   {m.contract.kv_dtype}, max_seq {m.max_seq}")
    lines.append("")
    return "\n".join(lines)


def failure_summary(gate: Any) -> str:
    """Printed before the error when the gate fails: the figures that made it fail."""
    return "\n".join(["", "accuracy gate FAILED:"] + [f"  {line}" for line in gate.lines()] + [""])
