"""Sentence-embedding pooling, applied by the runtime after the encoder graph.

The manifest's Pooling record says how (mode "mean" | "cls" | "max", normalize); the host reads
it from a sentence-transformers folder's modules.json and 1_Pooling/config.json. None: plain
mean pooling without normalisation.
"""

from __future__ import annotations

import numpy as np

from bundle.manifest import Pooling


def pool(hidden: np.ndarray, attention_mask: np.ndarray, pooling: Pooling | None) -> np.ndarray:
    """hidden [B,T,C], attention_mask [B,T] -> embeddings [B,C] float32."""
    mask = attention_mask[..., None].astype(np.float32)  # [B,T,1]
    mode = pooling.mode if pooling else "mean"
    if mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = np.where(mask > 0, hidden, -np.inf).max(axis=1)
    else:  # mean over real tokens only
        out = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    if pooling is not None and pooling.normalize:
        out = out / np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)
    return out.astype(np.float32)
