"""Quantization benchmark on SmolLM2-135M: size, perplexity, decode speed and peak RSS per variant.

    python bench/quantize.py [--work DIR] [--rounds 5] [--json out.json] [--plot out.png]

Variants (each measured in a fresh subprocess, so peak RSS is that variant's alone):
  ours P (daemon)              the headline rows: the default bundles (what `toolkit convert
                               smollm2-135m --precision P` writes: target cpu, its default max_seq;
                               made once in ~/.cache/toolkit-bench/ and shared with bench/decode.py
                               and bench/serve.py) served by `toolkit serve BUNDLE` with the
                               daemon's defaults (one slot; prompt-lookup drafting on, output
                               identical to plain greedy), one streamed request; peak RSS is the
                               daemon process's
  ours fp32 / int8 / int4      the same bundles in-process (`generate`, one token a step): the
                               kernels alone, no drafting; int8 also in the other CPU int8 format
                               when the target names another
  ours int4 step i             every step of the int4 ladder (FORMATS[...].ladder) written alone
                               (forced, so failing steps are measured too), with the gate's
                               figures: perplexity increase, top-1 agreement, greedy match
  genai int8 / int4            onnxruntime-genai's model builder (-e cpu) on the same weights: the
                               GGUF dequantized to an fp32 Hugging Face folder with transformers
                               (its builder takes only fp16/fp32 GGUF); bench/peers.py.
  llama.cpp Q4_1 / Q8_0        llama-cpp-python on the packaged Q4_1 GGUF and its Q8_0 requantized
                               by llama-quantize, llama.cpp built from source by bench/peers.py
                               (cached). Skipped, with the reason, when it fails.

Decode: a 128-token prompt from the held-out text, then 128 greedy tokens, 2 threads; tokens/s
over the 127 decode steps after the first token. Several rounds interleave the variants; a
variant's speed is its median round, and a ratio between two variants is the median of their
same-round ratios (the CPU may be shared: never best-of). Perplexity is over the held-out text
(quantize/data/heldout.txt), per token, each runtime scoring its own logits. The Pareto table
(size, perplexity, tok/s) of every point and a size/perplexity/speed plot (bench/pareto.py) end
the report, with whether any peer point is both faster (the median of same-round ratios) and
more accurate than one of ours. Five rounds by default: several points of that table differ by
a few percent in speed, about what one round moves on a shared 2-core machine.
Targets are printed as ratios; they are goals to check, not assertions.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.pareto import Point, paired_ratio, pareto_table, plot  # noqa: E402
from bench.peers import (  # noqa: E402
    Skipped,
    genai_model,
    gguf,
    llama_cpp,
    llama_cpp_python,
    llama_env,
    packaged_gguf,
)
from bundle.errors import ToolkitError  # noqa: E402
from bundle.manifest import read_manifest  # noqa: E402
from device.runtime.procmem import peak_rss  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, THREADS = 128, 128, 2
TOOLKIT = [sys.executable, "-c", "from toolkit.cli import main; main()"]
OURS = ("daemon", "bundle")  # variant kinds that are this project's


@dataclass
class Variant:
    name: str
    kind: str  # "daemon" | "bundle" | "genai" | "llamacpp"
    path: Path
    note: str = ""
    bytes: int = 0
    ppl: float | None = None
    tok_s: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)  # ours: the bundle's gate record

    @property
    def median(self) -> float | None:
        return statistics.median(self.tok_s) if self.tok_s else None

    def point(self) -> Point:
        return Point(self.name, "ours" if self.kind in OURS else "peer", self.bytes, self.ppl,
                     list(self.tok_s))


# --- building the variants --------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], logfile: Path) -> None:
    with open(logfile, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed, see {logfile}")


def size_of(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files)


def build_ours(work: Path) -> list[Variant]:
    """The default bundles through the daemon (the headline), the same in-process, then the
    ladder steps. The defaults are bench/decode.py's (one cache for every bench): the fp32 one
    is also the ladder's source."""
    from bench.decode import default_bundle

    fp32 = default_bundle("fp32")
    inproc = [Variant("ours fp32", "bundle", fp32)]
    for precision, label, dest in quantize_jobs(fp32, work / "smollm2-135m-cpu", default_bundle):
        q = read_manifest(dest).quantization
        assert q is not None  # quantize_bundle wrote it
        gate = ({k: getattr(q.gate, k) for k in ("passed", "ppl_increase", "top1_agreement",
                                                 "greedy_fraction")} if q.gate else {})
        kept = f", {kept_step(q)}" if precision == "int4" and not label else ""
        note = f"{q.format}, gate {'passed' if q.gate and q.gate.passed else 'FAILED'}{kept}"
        inproc.append(Variant(f"ours {precision}{label}", "bundle", dest, note, gate=gate))
    served = [Variant(f"{v.name} (daemon)", "daemon", v.path, "toolkit serve BUNDLE (its defaults)",
                      gate=v.gate) for v in inproc if v.name in ("ours fp32", "ours int8", "ours int4")]
    return served + inproc


def kept_step(q: Any) -> str:
    """The int4 ladder step a default bundle's gate kept: 'kept GRID/BLOCK[ +SHARE 8-bit]'."""
    share = q.options.get("int8_fraction") or 0.0
    return (f"kept {q.options.get('int4_grid')}/{q.options.get('block_size')}"
            f"{f' +{share:.3g} 8-bit' if share else ''}")


def quantize_jobs(fp32: Path, prefix: Path,
                  defaults: Callable[[str], Path] | None = None) -> list[tuple[str, str, Path]]:
    """Every quantized variant of `fp32` this bench measures, written (or found cached) as
    PREFIX-PRECISION[-STEP]: (precision, label suffix, bundle). The first two are what `toolkit
    convert --precision P` writes (int4: the ladder step the gate settles on; `defaults(P)`
    gives them where another bench keeps them); then every int4 ladder step alone, forced, so
    the steps the gate rejects are measured as well."""
    from quantize import quantize_bundle
    from quantize.formats import FORMATS, QuantOptions, format_for
    from targets import load_target

    cpu = load_target("cpu")
    jobs: list[tuple[str, str | None, QuantOptions, str]] = [
        ("int8", None, QuantOptions(), ""), ("int4", None, QuantOptions(), "")]
    if cpu.formats.get("int8") != "ort-matmulnbits":
        jobs.append(("int8", "ort-matmulnbits", QuantOptions(), " (ort-matmulnbits)"))
    ladder = FORMATS[format_for(cpu, "int4").name].ladder
    for i, (grid, block, fraction) in enumerate(ladder):
        mixed = f" +{fraction:.3g} 8-bit" if fraction else ""
        jobs.append(("int4", None, QuantOptions(int4_grid=grid, block_size=block or 32,
                                                int8_fraction=fraction),
                     f" step {i + 1} ({grid}-{block or 32}{mixed})"))
    memo: dict[Any, Any] = {}  # AWQ and the ranking, made once for the ladder steps of one grid
    out = []
    for precision, fmt, options, label in jobs:
        if defaults and not label:  # made there when missing; remade here when stale
            dest = defaults(precision)
        else:
            slug = label.strip(" ()").replace(", ", "-").replace(" ", "-").replace("(", "").replace("+", "")
            dest = prefix.with_name(f"{prefix.name}-{precision}{'-' + slug if slug else ''}")
        if not _built_with(dest, options):
            log(f"quantizing {fp32.name} to {precision}{label} ...")
            quantize_bundle(fp32, precision, out=dest, force=True, fmt=fmt,  # force: keep failures
                            options=options, memo=memo if precision == "int4" else None)
        out.append((precision, label, dest))
    return out


def _built_with(bundle: Path, options: Any) -> bool:
    """A cached bundle counts only if it was quantized with these options (the defaults move)."""
    try:
        q = read_manifest(bundle).quantization
    except ToolkitError:
        return False
    if q is None:
        return False
    want, got = asdict(options), dict(q.options)
    if want["int4_grid"] is None and q.grid_choice:
        # the ladder records the (grid, block) it kept: the cached bundle counts if it walked
        # today's ladder (the default moves with the code)
        from quantize.formats import FORMATS

        ladder = [[g, b or options.block_size, f] for g, b, f in FORMATS[q.format].ladder]
        if q.grid_choice.get("ladder") != ladder:
            return False
        got["int4_grid"], got["block_size"] = None, want["block_size"]
        got["int8_fraction"] = want["int8_fraction"]
    return bool(got == want)


def build_genai() -> list[Variant]:
    out = []
    for precision in ("int8", "int4"):
        dest = genai_model(precision, THREADS)
        if isinstance(dest, Skipped):
            log(f"genai {precision} skipped: {dest.reason}")
            continue
        out.append(Variant(f"genai {precision}", "genai", dest, f"onnxruntime-genai "
                           f"{md.version('onnxruntime-genai')}"))
    return out


def build_llamacpp() -> list[Variant]:
    lc = llama_cpp()
    missing = lc if isinstance(lc, Skipped) else llama_cpp_python(lc)
    if missing or isinstance(lc, Skipped):
        log(f"llama.cpp skipped: {missing.reason if missing else ''}")
        return []
    out = [Variant("llama.cpp Q4_1", "llamacpp", packaged_gguf(), f"llama-cpp-python {lc.version}")]
    q8 = gguf("int8", lc)
    if isinstance(q8, Skipped):
        log(f"llama.cpp Q8_0 skipped: {q8.reason}")
    else:
        out.append(Variant("llama.cpp Q8_0", "llamacpp", q8, f"llama-quantize of the Q4_1, "
                           f"llama-cpp-python {lc.version}"))
    return out


# --- measuring (child process) ----------------------------------------------------------------
def heldout_ids() -> list[int]:
    """The held-out text in SmolLM2's tokens (every variant shares the tokenizer). The child
    imports only what the device runtime imports (no quantize/, onnx or torch), so its peak RSS
    is the runtime's."""
    from device.runtime.tokenizer import BundleTokenizer

    fp32 = Path(os.environ["QBENCH_FP32"])
    tok = BundleTokenizer(fp32 / "tokenizer", read_manifest(fp32).tokenizer)
    text = (REPO / "quantize" / "data" / "heldout.txt").read_text(encoding="utf-8")
    return tok.encode(text, add_special_tokens=False)


def measure(kind: str, path: Path, with_ppl: bool) -> dict[str, Any]:
    ids = heldout_ids()
    prompt = (ids * 2)[:PROMPT_TOKENS]
    if kind == "daemon":  # perplexity: the in-process row of the same bundle has it
        return _daemon_run(path, prompt, ids[-16:])
    fn = {"bundle": _bundle_run, "genai": _genai_run, "llamacpp": _llamacpp_run}[kind]
    tok_s, ppl = fn(path, prompt, ids if with_ppl else None)
    return {"tok_s": tok_s, "ppl": ppl, "rss_mb": peak_rss() / 2**20}


def _daemon_run(path: Path, prompt: list[int], warm: list[int]) -> dict[str, Any]:
    """`toolkit serve BUNDLE` with its defaults, one streamed request after a 4-token warm-up
    (a prompt from the end of the text: no prefix it could reuse); the daemon's peak RSS."""
    from bench.decode import BenchDaemon

    daemon = BenchDaemon(path, THREADS)
    try:
        daemon.generate(warm, 4)
        _, tok_s, tokens, _ = daemon.generate(prompt, NEW_TOKENS)
        assert tokens == NEW_TOKENS, tokens  # ignore_eos: every request runs to max_tokens
        hwm = peak_rss(daemon.proc.pid)
    finally:
        daemon.close()
    return {"tok_s": tok_s, "ppl": None, "rss_mb": hwm / 2**20 if hwm else None}


def _nll(logits: Any, target: int) -> float:
    import numpy as np

    lg = np.asarray(logits, np.float64)
    m = lg.max()
    return float(np.log(np.exp(lg - m).sum()) + m - lg[target])


def _bundle_run(path: Path, prompt: list[int], ppl_ids: list[int] | None) -> tuple[float, float | None]:
    import numpy as np

    from device.runtime.generate import generate
    from device.runtime.runner import load_bundle

    runner = load_bundle(path, threads=THREADS)
    ppl = None
    if ppl_ids:  # the gate's method: windows of 256 tokens, one prefill each
        nll = []
        for start in range(0, len(ppl_ids) - 1, 256):
            w = ppl_ids[start:start + 257]
            T = len(w) - 1
            logits = runner.backend.step(np.asarray([w[:-1]]), np.arange(T)[None], [0], np.arange(T))[0]
            nll += [_nll(logits[i], w[i + 1]) for i in range(T)]
        ppl = float(np.exp(np.mean(nll)))
    it = generate(runner.backend, prompt, NEW_TOKENS)
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t0), ppl


def _genai_run(path: Path, prompt: list[int], ppl_ids: list[int] | None) -> tuple[float, float | None]:
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(str(path))
    ppl = None
    if ppl_ids:  # token by token (the generator exposes the last position's logits)
        nll = []
        for start in range(0, len(ppl_ids) - 1, 256):
            w = ppl_ids[start:start + 257]
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(w) + 1, do_sample=False)
            gen = og.Generator(model, params)
            for i in range(len(w) - 1):
                gen.append_tokens(np.asarray([w[i]], np.int32))
                nll.append(_nll(gen.get_logits()[0, -1], w[i + 1]))
        ppl = float(np.exp(np.mean(nll)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=PROMPT_TOKENS + NEW_TOKENS, min_length=PROMPT_TOKENS + NEW_TOKENS,
                              do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt, np.int32))
    gen.generate_next_token()
    t0 = time.perf_counter()
    n = 0
    while not gen.is_done() and n < NEW_TOKENS - 1:
        gen.generate_next_token()
        n += 1
    return n / (time.perf_counter() - t0), ppl


def _llamacpp_run(path: Path, prompt: list[int], ppl_ids: list[int] | None) -> tuple[float, float | None]:
    import numpy as np
    from llama_cpp import Llama

    n_ctx = read_manifest(Path(os.environ["QBENCH_FP32"])).max_seq  # the cache our bundles hold
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=THREADS, n_batch=256, logits_all=True,
                verbose=False)
    ppl = None
    if ppl_ids:
        nll = []
        for start in range(0, len(ppl_ids) - 1, 256):
            w = ppl_ids[start:start + 257]
            llm.reset()
            llm.eval(w[:-1])
            logits = np.asarray(llm.scores[:len(w) - 1])
            nll += [_nll(logits[i], w[i + 1]) for i in range(len(w) - 1)]
        ppl = float(np.exp(np.mean(nll)))
    del llm  # decode timed on an instance without logits_all (that keeps every row's logits)
    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=THREADS, n_batch=256, verbose=False)
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(NEW_TOKENS - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    return (NEW_TOKENS - 1) / (time.perf_counter() - t0), ppl


def child(kind: str, path: Path, fp32: Path, with_ppl: bool) -> dict[str, Any]:
    lc = llama_cpp(build=False)
    base = llama_env(lc) if not isinstance(lc, Skipped) else dict(os.environ)
    env = {**base, "QBENCH_FP32": str(fp32), "OMP_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, __file__, "--child", kind, str(path)] + (["--ppl"] if with_ppl else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"measuring {path} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- MiniLM ------------------------------------------------------------------------------------
def minilm(work: Path) -> dict[str, Any]:
    """all-MiniLM-L6-v2, the one model here with real float weights that were never 4-bit:
    the same variants as SmolLM2's (int8, the default int4, every int4 ladder step forced),
    each with the gate's embedding cosine to fp32 on held-out sentences and its size."""
    fp32 = work / "all-minilm-l6-v2-cpu-fp32"
    if not (fp32 / "manifest.json").exists():
        run([*TOOLKIT, "convert", "all-minilm-l6-v2", "-o", str(fp32),
             "--force"], work / "convert-minilm.log")
    out, fp32_bytes = {}, size_of(fp32)
    for precision, label, dest in quantize_jobs(fp32, work / "all-minilm-l6-v2-cpu"):
        q = read_manifest(dest).quantization
        assert q is not None and q.gate is not None  # quantize_bundle wrote both
        kept = kept_step(q) if precision == "int4" and not label else ""
        out[f"{precision}{label}"] = {"format": q.format, "cosine_min": q.gate.cosine_min,
                                      "cosine_mean": q.gate.cosine_mean, "passed": q.gate.passed,
                                      "min_cosine": q.gate.thresholds.get("min_cosine"), "kept": kept,
                                      "bytes": size_of(dest), "fp32_bytes": fp32_bytes}
    return out


def minilm_report(mini: dict[str, Any]) -> list[str]:
    if not mini:
        return []
    fp32_mib = next(iter(mini.values()))["fp32_bytes"] / 2**20
    lines = ["", f"all-MiniLM-L6-v2 (real float weights, never 4-bit; fp32 {fp32_mib:.1f} MiB): "
             "embedding cosine to fp32 over the gate's held-out sentences",
             f"  {'variant':42} {'size MiB':>9} {'cos min':>8} {'cos mean':>8}  gate"]
    for name, r in mini.items():
        gate = f"{'passed' if r['passed'] else 'FAILED'} (min >= {r['min_cosine']})"
        lines.append(f"  {name:42} {r['bytes'] / 2**20:9.1f} {r['cosine_min']:8.4f} "
                     f"{r['cosine_mean']:8.4f}  {gate}{', ' + r['kept'] if r['kept'] else ''}")
    return lines


# --- report ------------------------------------------------------------------------------------
def ratio(a: Variant | None, b: Variant | None) -> str:
    """a's decode speed over b's: the median of their same-round ratios."""
    r = paired_ratio(a.tok_s, b.tok_s) if a and b else None
    return f"{r:.2f}x" if r else "n/a"


def _gate_cells(v: Variant) -> str:
    g = v.gate
    if not g or g.get("ppl_increase") is None:
        return f"{'':>8} {'':>6} {'':>6}"
    greedy = g.get("greedy_fraction")
    return (f"{100 * g['ppl_increase']:+7.1f}% {g['top1_agreement']:6.3f} "
            f"{'' if greedy is None else format(greedy, '6.3f'):>6}")


def report(variants: list[Variant], mini: dict[str, Any], plot_path: Path | None) -> str:
    rounds = max(len(v.tok_s) for v in variants)
    lines = [f"SmolLM2-135M, decode {NEW_TOKENS} tokens after a {PROMPT_TOKENS}-token prompt, "
             f"{THREADS} threads, median of {rounds} interleaved rounds; gate columns: perplexity "
             f"increase over fp32, top-1 agreement, greedy match (the bundle's gate record)", "",
             f"{'variant':44} {'size MiB':>9} {'ppl':>8} {'gate +ppl':>8} {'top1':>6} {'greedy':>6} "
             f"{'tok/s':>7} {'peak RSS MiB':>13}  note"]
    for v in variants:
        speed = f"{v.median:.1f}" if v.median else "n/a"
        rss = f"{min(v.rss_mb):.0f}" if v.rss_mb else "n/a"
        ppl = f"{v.ppl:.3f}" if v.ppl else "n/a"
        lines.append(f"{v.name:44} {v.bytes / 2**20:9.1f} {ppl:>8} {_gate_cells(v)} {speed:>7} "
                     f"{rss:>13}  {v.note}")
    by = {v.name: v for v in variants}
    i4 = by.get("ours int4")
    g4 = i4.gate if i4 else {}
    within = (g4.get("ppl_increase") is not None and g4["ppl_increase"] <= 0.05
              and g4.get("top1_agreement", 0.0) >= 0.90)

    def vs(ours: str, peer: str, goal: str) -> str:
        """ours over the peer: through the daemon (the headline), and in-process"""
        served, alone = by.get(f"ours {ours} (daemon)"), by.get(f"ours {ours}")
        return (f"  {ours} decode vs {peer:18} daemon {ratio(served, by.get(peer)):>6}  "
                f"in-process {ratio(alone, by.get(peer)):>6}{f'  (goal {goal})' if goal else ''}")

    i4d = by.get("ours int4 (daemon)")
    rss = [v for v in (i4d, i4) if v and v.rss_mb]
    lines += ["", "targets (decode ratios: median of same-round pairs; daemon: the default bundle "
              "served by `toolkit serve`, in-process: the same bundle's one-token steps):",
              "  int4 accuracy                    "
              + (f"{100 * g4['ppl_increase']:+.1f} % perplexity, top-1 {g4['top1_agreement']:.3f}"
                 f"  (goal <= +5 %, >= 0.90: {'met' if within else 'NOT met'})"
                 if g4.get("ppl_increase") is not None else "n/a"),
              vs("int8", "genai int8", ">= 1.0x"), vs("int4", "genai int4", ">= 1.0x"),
              vs("int4", "llama.cpp Q4_1", ">= 1.2x"), vs("int8", "llama.cpp Q8_0", ""),
              "  int4 peak RSS                    " + (", ".join(
                  f"{'daemon' if v.kind == 'daemon' else 'in-process'} {min(v.rss_mb):.0f} MiB"
                  for v in rss) + "  (goal <= 300 MB)" if rss else "n/a")]
    for name in ("ours int8 (ort-matmulnbits)",):
        if name in by:
            lines.append(f"  {name} vs genai int8  {ratio(by[name], by.get('genai int8'))}")
    if "int8" in mini:
        r = mini["int8"]
        lines.append(f"  all-MiniLM-L6-v2 int8 cosine min  {r['cosine_min']:.4f}  (goal >= 0.99)")
    lines += minilm_report(mini)
    lines += ["", "Pareto (size, perplexity, tok/s):", pareto_table([v.point() for v in variants])]
    if plot_path:
        lines.append(f"plot: {plot_path}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge-toolkit-bench" / "quantize")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None,
                    help="the size/perplexity/speed PNG (default: WORK/quantize-pareto.png)")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    ap.add_argument("--ppl", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--minilm-only", action="store_true",
                    help="only MiniLM's variants and their cosine (about a minute; no peers)")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], Path(args.child[1]), args.ppl)))
        return
    import models  # noqa: F401  (before onnxruntime.transformers: see quantize/graph.py)

    args.work.mkdir(parents=True, exist_ok=True)
    if args.minilm_only:
        print("\n".join(minilm_report(minilm(args.work))[1:]))
        return
    variants = build_ours(args.work) + build_genai() + build_llamacpp()
    fp32 = variants[0].path
    for v in variants:
        v.bytes = size_of(v.path)
    for r in range(args.rounds):
        for v in variants:
            log(f"round {r + 1}/{args.rounds}: {v.name}")
            res = child(v.kind, v.path, fp32, with_ppl=(r == 0))
            v.tok_s.append(res["tok_s"])
            if res["rss_mb"] is not None:
                v.rss_mb.append(res["rss_mb"])
            v.ppl = res["ppl"] if r == 0 else v.ppl
    for v in variants:  # a daemon row's perplexity: its bundle's, scored in-process
        if v.kind == "daemon":
            v.ppl = next((w.ppl for w in variants if w.kind == "bundle" and w.path == v.path), None)
    mini = minilm(args.work)
    written = plot([v.point() for v in variants], args.plot or args.work / "quantize-pareto.png",
                   "SmolLM2-135M on CPU: ours (every int4 ladder step) and the peers")
    if written is None:
        log("matplotlib missing (pip install -e '.[report]'): no plot")
    text = report(variants, mini, written)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"variants": [asdict(v) | {"path": str(v.path)} for v in variants],
                                         "minilm": mini, "report": text}, indent=1, default=str))


if __name__ == "__main__":
    main()
