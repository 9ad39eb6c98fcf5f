"""Closing summaries the CLI prints: what was made, sizes, figures, where it is, what next."""

from __future__ import annotations

from typing import Any

from bundle.manifest import Manifest, Parity


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def convert_summary(result: Any) -> str:
    m: Manifest = result.manifest
    engine, t = m.target.engine, m.target
    lines = ["", f"bundle  {result.bundle}  ({mib(result.bytes)})",
             f"  model      {m.name}  [{m.kind}, {m.precision}, target {t.name}]"]
    if m.kind == "decoder":
        lines.append(f"  kv cache   max_seq {m.max_seq} x {m.batch} slot(s), "
                     f"{mib(m.kv_layout().bytes_for(m.batch))}")
    p = m.parity or Parity(passed=True)
    if p.max_abs_logits_diff is not None:
        what = "max |logits diff|" if m.kind == "decoder" else "max |hidden diff|"
        lines.append(f"  parity     {'passed' if p.passed else 'FAILED'}: {what} "
                     f"{p.max_abs_logits_diff:.2e} (tolerance {p.tolerance or 0:.0e})")
    if p.greedy_tokens:
        lines.append(f"             greedy {p.greedy_tokens} tokens identical to transformers: "
                     f"{'yes' if p.greedy_match else 'NO'}")
    if p.note:
        lines.append(f"             {p.note}")
    if engine.status == "build-on-device":
        lines.append(f"  engine     not built here: TensorRT {t.tensorrt} engine is built "
                     "on the device at first load")
    lines.append("")
    if engine.status == "build-on-device":
        lines.append(f"next: toolkit deploy {result.bundle} --device NAME  "
                     f"(or toolkit compile {result.bundle} on a host with a matching GPU)")
    else:
        lines.append(f"next: toolkit serve {result.bundle}")
    return "\n".join(lines)
