"""Parity: the exported graph against the PyTorch model it came from, run by every convert.

Decoder checks, all through the device's own backend and generation loop (device/), so the
graph is tested together with the static-cache code that will run it:
  1. logits   prefill at several prompt lengths (shapes the export never saw), then decode
              steps through the cache, then one batched decode step over two slots;
              max |logits - transformers| must stay under the tolerance.
  2. greedy   32 new tokens from the exported graph must equal transformers' greedy
              generate token for token.
Encoder check: last_hidden_state over padded batches, and the pooled embeddings' cosine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bundle.contract import KVCacheLayout
from bundle.manifest import Parity, Pooling
from device.runtime.generate import generate
from device.runtime.ort_backend import OrtDecoderBackend, OrtEncoderBackend

LOGITS_ATOL = 2e-3  # fp32 graph vs fp32 PyTorch: reordered sums differ by ~1e-5 relative
GREEDY_TOKENS = 32
ENCODER_ATOL = 1e-3


def prompt_lengths(max_seq: int) -> list[int]:
    return sorted({n for n in (1, 7, 33, 130) if n + 4 < max_seq} or {1})


def decoder_parity(model_path: Path, hf_model: Any, layout: KVCacheLayout, vocab: int,
                   greedy_prompt: list[int], threads: int | None = None) -> Parity:
    import torch

    backend = OrtDecoderBackend(model_path, layout, vocab, slots=2, threads=threads)
    rng = np.random.default_rng(0)
    res = Parity(passed=True, tolerance=LOGITS_ATOL)
    worst = 0.0
    prompts = {}
    for n in prompt_lengths(layout.max_seq):
        ids = rng.integers(0, vocab, size=n + 3).tolist()
        prompts[n] = ids
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].numpy()  # [n+3, V]
        got = [backend.step(np.array([ids[:n]]), np.arange(n)[None], [0])[0].copy()]
        for t in range(n, n + 3):  # three decode steps through the cache
            got.append(backend.step(np.array([[ids[t]]]), np.array([[t]]), [0])[0].copy())
        diff = float(np.abs(np.concatenate(got) - ref).max())
        worst = max(worst, diff)
        res.check(f"logits prompt={n} (+3 decode)", diff <= LOGITS_ATOL, f"max |diff| {diff:.2e}")
    # Two slots at different positions in one batched decode step: rows must not interact.
    (n1, a), (n2, b) = list(prompts.items())[0], list(prompts.items())[-1]
    backend.step(np.array([a[:n1]]), np.arange(n1)[None], [0])
    backend.step(np.array([b[:n2]]), np.arange(n2)[None], [1])
    got = backend.step(np.array([[a[n1]], [b[n2]]]), np.array([[n1], [n2]]), [0, 1])[:, 0]
    with torch.no_grad():
        ref_a = hf_model(torch.tensor([a[:n1 + 1]])).logits[0, -1].numpy()
        ref_b = hf_model(torch.tensor([b[:n2 + 1]])).logits[0, -1].numpy()
    diff = float(max(np.abs(got[0] - ref_a).max(), np.abs(got[1] - ref_b).max()))
    worst = max(worst, diff)
    res.check("batched decode, 2 slots", diff <= LOGITS_ATOL, f"max |diff| {diff:.2e}")
    res.max_abs_logits_diff = worst

    n_new = min(GREEDY_TOKENS, layout.max_seq - len(greedy_prompt))
    ours = list(generate(backend, greedy_prompt, n_new))
    theirs = hf_greedy(hf_model, greedy_prompt, n_new)
    first_diff = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), None)
    res.greedy_match = ours == theirs
    res.greedy_tokens = n_new
    res.check(f"greedy {n_new} tokens", res.greedy_match,
           "identical" if res.greedy_match else f"first difference at token {first_diff}")
    backend.close()
    return res


def hf_greedy(hf_model: Any, prompt: list[int], n_new: int) -> list[int]:
    """transformers' own greedy generate, never stopping early (no EOS), n_new tokens."""
    import torch
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=0,
                           eos_token_id=None, pad_token_id=0, num_beams=1)
    # generate() refills unset fields from the model's own generation_config (EOS included),
    # so clear EOS there too for the duration: both sides must produce exactly n_new tokens.
    saved = getattr(hf_model.generation_config, "eos_token_id", None)
    hf_model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), generation_config=cfg,
                                    attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    finally:
        hf_model.generation_config.eos_token_id = saved
    return out[0, len(prompt):].tolist()


def encoder_parity(model_path: Path, hf_model: Any, tokenizer: Any, pooling: Pooling | None,
                   threads: int | None = None) -> Parity:
    import torch

    from device.runtime.pooling import pool

    backend = OrtEncoderBackend(model_path, threads=threads)
    res = Parity(passed=True, tolerance=ENCODER_ATOL)
    batches = [["edge inference"],
               ["A short one.", "A much longer sentence that forces padding in the batch.",
                "Jetson Orin Nano has eight gigabytes of unified memory."]]
    worst, worst_cos = 0.0, 1.0
    for texts in batches:
        enc = tokenizer(texts, padding=True, return_tensors="np")
        feeds = {k: v for k, v in enc.items()}
        got = backend.encode(feeds)
        with torch.no_grad():
            ref = hf_model(**{k: torch.tensor(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        mask = feeds["attention_mask"][..., None].astype(bool)
        diff = float(np.abs(np.where(mask, got - ref, 0)).max())
        mask_ids = feeds["attention_mask"]
        e_got, e_ref = pool(got, mask_ids, pooling), pool(ref, mask_ids, pooling)
        cos = float(np.min(np.sum(e_got * e_ref, -1) / (np.linalg.norm(e_got, axis=-1)
                                                         * np.linalg.norm(e_ref, axis=-1))))
        worst, worst_cos = max(worst, diff), min(worst_cos, cos)
        res.check(f"last_hidden_state batch={len(texts)} seq={feeds['input_ids'].shape[1]}",
               diff <= ENCODER_ATOL, f"max |diff| {diff:.2e}, min cosine {cos:.6f}")
    res.max_abs_logits_diff = worst
    res.note = f"min embedding cosine {worst_cos:.6f}"
    backend.close()
    return res
