"""A decoder that was never 4-bit: a tiny Llama trained here, for honest int4 fidelity figures.

    python bench/tiny_decoder.py [--out DIR] [--steps 600]     # ~/.cache/toolkit-bench/tiny-llama

SmolLM2's fp32 weights are a dequantized Q4_1 GGUF: every block already sits on a 4-bit grid, so
int4 fidelity measured on it flatters any int4 scheme (the exact offset grid is lossless there).
No real fp16/bf16/fp32 decoder ships in a PyPI package this project can install, so this trains
one: a byte-level BPE tokenizer (TOKENS ids) and a Llama (hidden 128, 4 layers, GQA 4/2 heads of
32, SwiGLU 384, tied head like SmolLM2's; ~1 M parameters) on English prose: the toolkit's
calibration text plus the docstrings of a fixed list of Python standard-library modules (the
calibration text alone, 2 k tokens, is memorised within a hundred steps). The held-out text
(quantize/data/heldout.txt) the gate grades on is never trained on. Deterministic: fixed seed,
fixed corpus order, one thread pool size; about five minutes on 2 (shared) cores. Saved as a Hugging Face
folder that `toolkit convert DIR` reads.

    python bench/tiny_decoder.py --ladder      # then: every int4 ladder step on it, and the default

--ladder converts it (target cpu, fp32), writes every step of the CPU int4 ladder alone (forced,
so rejected steps are measured too) and the default int4 (the gate's choice under the default
budget), and prints each one's size and gate figures: perplexity over fp32, top-1 agreement,
greedy match on the held-out text.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = Path.home() / ".cache" / "toolkit-bench" / "tiny-llama"
TOKENS = 2048  # BPE vocabulary
SEQ, BATCH, SEED = 128, 8, 0
CONFIG = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
              rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# prose-heavy standard-library modules (their docstrings: English sentences about the code)
MODULES = ("argparse", "asyncio/events", "calendar", "collections/__init__", "csv", "dataclasses",
           "datetime", "decimal", "difflib", "email/message", "fractions", "functools", "gettext",
           "heapq", "http/client", "imaplib", "inspect", "logging/__init__", "mailbox",
           "multiprocessing/pool", "optparse", "pathlib", "pdb", "pickle", "pydoc", "random",
           "shutil", "smtplib", "statistics", "string", "subprocess", "tarfile", "tempfile",
           "textwrap", "threading", "turtle", "typing", "unittest/case", "urllib/request",
           "zipfile")


def corpus() -> str:
    """The calibration text, then the docstrings of MODULES in order."""
    from quantize.calibration import builtin_text

    parts = [builtin_text("calibration.txt").text]
    lib = Path(sysconfig.get_paths()["stdlib"])
    for name in MODULES:
        path = lib / f"{name}.py"
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= 8:
                    parts.append(doc)
    return "\n\n".join(parts)


def tokenizer(text: str):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=TOKENS, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def train(out: Path, steps: int, threads: int) -> dict[str, float]:
    import torch
    import transformers

    torch.manual_seed(SEED)
    torch.set_num_threads(threads)
    text = corpus()
    tok = tokenizer(text)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    config = transformers.LlamaConfig(vocab_size=len(tok), **CONFIG)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(SEED)
    t0, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=g)
        batch = torch.stack([ids[s:s + SEQ] for s in starts.tolist()])
        loss_t = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss_t.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss = float(loss_t.detach())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss:.3f}  {time.perf_counter() - t0:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    return {"tokens": float(len(ids)), "params": float(params), "loss": loss,
            "seconds": time.perf_counter() - t0}


def ladder(folder: Path, work: Path) -> list[str]:
    """The int4 ladder on the trained model: one row per step, then the default's choice."""
    from convert.pipeline import convert_model
    from quantize import quantize_bundle
    from quantize.formats import FORMATS, QuantOptions, format_for
    from targets import load_target

    fp32 = work / "tiny-llama-cpu-fp32"
    if not (fp32 / "manifest.json").exists():
        convert_model(str(folder), "cpu", fp32, None, force=True)
    cpu = load_target("cpu")
    steps = [(f"{g}/{b or 32}" + (f" +{f:.3g} 8-bit" if f else ""),
              QuantOptions(int4_grid=g, block_size=b or 32, int8_fraction=f))
             for g, b, f in FORMATS[format_for(cpu, "int4").name].ladder]
    rows = [f"{'int4 step':30} {'MiB':>6} {'+ppl':>8} {'top1':>6} {'greedy':>6}  gate"]
    for i, (label, options) in enumerate([*steps, ("default (the gate's choice)", QuantOptions())]):
        r = quantize_bundle(fp32, "int4", out=work / f"tiny-llama-cpu-int4-{i}", force=True,
                            options=options)
        g, o = r.gate, r.manifest.quantization.options if r.manifest.quantization else {}
        kept = (f" -> kept {o.get('int4_grid')}/{o.get('block_size')}"
                f"{' +' + format(o['int8_fraction'], '.3g') + ' 8-bit' if o.get('int8_fraction') else ''}"
                if options.int4_grid is None else "")
        greedy = "" if g.greedy_fraction is None else f"{g.greedy_fraction:6.3f}"
        rows.append(f"{label:30} {r.bytes / 2**20:6.2f} {100 * (g.ppl_increase or 0):+7.2f}% "
                    f"{g.top1 or 0:6.3f} {greedy:>6}  {'passed' if g.passed else 'FAILED'}{kept}")
    fp = r.gate.ppl_fp32
    rows.append(f"fp32 held-out perplexity {fp:.2f} ({r.source_bytes / 2**20:.2f} MiB)" if fp else "")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ladder", action="store_true",
                    help="quantize the trained model (trained first when --out has none)")
    a = ap.parse_args()
    if a.ladder:
        if not (a.out / "config.json").exists():
            train(a.out, a.steps, a.threads)
        print("\n".join(ladder(a.out, a.out.parent / "tiny-llama-bundles")))
        return
    stats = train(a.out, a.steps, a.threads)
    print(f"{a.out}: {stats['params'] / 1e6:.2f} M parameters, {stats['tokens']:.0f} corpus tokens, "
          f"final training loss {stats['loss']:.3f}, {stats['seconds']:.0f} s")


if __name__ == "__main__":
    main()
