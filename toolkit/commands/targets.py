"""toolkit targets [show T]: what each deployment target is and can run (targets/*.toml)."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from targets import GIB, Target, list_targets, load_target


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Every target's fields as JSON.")
@click.pass_context
def targets(ctx: click.Context, as_json: bool) -> None:
    """List the deployment targets: runtime, memory, bandwidth, precisions, TensorRT.

    \b
    Examples:
      toolkit targets
      toolkit targets show jetson-orin-nano-8gb
    """
    if ctx.invoked_subcommand is not None:
        return
    all_targets = list_targets()
    if as_json:
        click.echo(json.dumps([t.to_json() for t in all_targets], indent=2))
        return
    header = ("name", "runtime", "memory", "bandwidth", "precisions", "TensorRT")
    rows = [(t.name, t.runtime, _memory(t), f"{t.memory_bandwidth_gbs:g} GB/s",
             ", ".join(t.precisions), t.tensorrt or "-") for t in all_targets]
    click.echo(table(header, rows))
    click.echo("\n`toolkit targets show NAME` explains one; `toolkit plan MODEL --target NAME` "
               "says whether a model fits.")


@targets.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The target's fields as JSON.")
def show(name: str, as_json: bool) -> None:
    """Explain one target: what it is, its facts, and where they come from."""
    t = load_target(name)  # an unknown name is a ToolkitError listing the known ones
    if as_json:
        click.echo(json.dumps(t.to_json(), indent=2))
        return
    click.echo(describe(t))


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


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, with a rule under the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
