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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    stats = train(a.out, a.steps, a.threads)
    print(f"{a.out}: {stats['params'] / 1e6:.2f} M parameters, {stats['tokens']:.0f} corpus tokens, "
          f"final training loss {stats['loss']:.3f}, {stats['seconds']:.0f} s")


if __name__ == "__main__":
    main()
