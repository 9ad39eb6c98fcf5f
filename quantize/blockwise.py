"""Weight quantization arithmetic in NumPy: block-wise and per-channel, no graph code here.

A MatMul weight W is [K, N] (x[.., K] @ W -> [.., N]); blocks run along K, the input axis, so one
block is `block` consecutive input features of one output column:

    W[k, n] ~= scale[k // block, n] * (code[k, n] - mid) + offset[k // block, n]

    codes    uint8 [K_pad, N] in [0, 2^bits - 1], mid = 2^(bits-1) (so code - mid is the signed
             value a symmetric format stores; K_pad = K rounded up to a whole block)
    scales   float32 [K_pad / block, N], always > 0 (TensorRT rejects non-positive scales)
    offsets  float32 [K_pad / block, N] for the offset ("min-max", llama.cpp Q4_1-like) form,
             None for the symmetric form (zero point 0: what TensorRT and a plain DQ need)

The offset form fits each block's own [min, max] with 2^bits levels, so a block that is not
centred on zero does not waste half of its levels; it is exact on weights that were themselves
stored that way (a Q4_1 GGUF, whose blocks are 32 input features too).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Symmetric scale search: shrink the block range by these factors and keep, per block, the one
# with the least squared error (clipping a rare extreme buys finer steps for everything else).
CLIP_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True)
class BlockWeights:
    codes: np.ndarray  # uint8 [K_pad, N]
    scales: np.ndarray  # float32 [kb, N]
    offsets: np.ndarray | None  # float32 [kb, N], or None (symmetric)
    bits: int
    block: int
    K: int  # rows before padding
    zero_points: np.ndarray | None = None  # uint8 [kb, N] in [0, 2^bits - 1] (zero-point grid)

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)

    @property
    def blocks(self) -> int:
        return int(self.scales.shape[0])

    def signed(self) -> np.ndarray:
        """int8 [K, N]: code - mid, the value a zero-point-0 DequantizeLinear stores."""
        return (self.codes[:self.K].astype(np.int16) - self.mid).astype(np.int8)

    def dequantize(self) -> np.ndarray:
        """float32 [K, N]."""
        s = np.repeat(self.scales, self.block, axis=0)[:self.K]
        zero = (np.repeat(self.zero_points, self.block, axis=0)[:self.K].astype(np.float32)
                if self.zero_points is not None else self.mid)
        w = s * (self.codes[:self.K].astype(np.float32) - zero)
        if self.offsets is not None:
            w = w + np.repeat(self.offsets, self.block, axis=0)[:self.K]
        return w.astype(np.float32)


def _blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """[K, N] -> [kb, block, N] float64, zero-padded along K to a whole block."""
    K, N = w.shape
    kb = -(-K // block)
    padded = np.zeros((kb * block, N), np.float64)
    padded[:K] = w
    return padded.reshape(kb, block, N), K


def _importance(importance: np.ndarray | None, K: int, block: int) -> np.ndarray | float:
    """Per-row weights of the squared error, [kb, block, 1] (padding rows 0), or 1.0 (none).
    AWQ passes E[x_k^2] of the layer's input, so a row's rounding error counts by how much it
    moves the output: sum_k E[x_k^2] (w_k - q_k)^2 is the expected output error of one column
    when the inputs are uncorrelated."""
    if importance is None:
        return 1.0
    kb = -(-K // block)
    h = np.zeros(kb * block, np.float64)
    h[:K] = importance
    return h.reshape(kb, block, 1)


def quantize_symmetric(w: np.ndarray, bits: int, block: int, search: bool = True,
                       importance: np.ndarray | None = None) -> BlockWeights:
    """Zero point 0, codes -mid .. mid-1 (the full signed range). The scale per block is the
    smallest that keeps both extremes representable (max/(mid-1) and -min/mid), then, with
    `search`, shrunk by the CLIP_CANDIDATES factor that minimises the block's squared error
    (weighted per row by `importance` [K] when given)."""
    wb, K = _blocks(w, block)
    h = _importance(importance, K, block)
    mid = 1 << (bits - 1)
    base = np.maximum(wb.max(1) / (mid - 1), -wb.min(1) / mid)  # [kb, N]
    base[base <= 0] = 1.0  # an all-zero block: any positive scale codes it exactly
    best_s, best_err = base, np.full(base.shape, np.inf)
    for c in CLIP_CANDIDATES if search else (1.0,):
        s = base * c
        q = np.clip(np.round(wb / s[:, None]), -mid, mid - 1)
        err = ((q * s[:, None] - wb) ** 2 * h).sum(1)
        better = err < best_err
        best_s, best_err = np.where(better, s, best_s), np.where(better, err, best_err)
    q = np.clip(np.round(wb / best_s[:, None]), -mid, mid - 1) + mid
    codes = q.astype(np.uint8).reshape(-1, w.shape[1])
    return BlockWeights(codes, best_s.astype(np.float32), None, bits, block, K)


def quantize_offset(w: np.ndarray, bits: int, block: int) -> BlockWeights:
    """Min-max per block: scale = (max - min) / (2^bits - 1), codes = round((w - min) / scale);
    stored as scale * (code - mid) + offset with offset = min + mid * scale, so the integer part
    is centred like the symmetric form (ONNX Runtime's int8-compute path quantizes the
    activations per block, and centred weights keep that error from adding up)."""
    wb, K = _blocks(w, block)
    levels = (1 << bits) - 1
    lo, hi = wb.min(1), wb.max(1)
    s = (hi - lo) / levels
    s[s <= 0] = 1.0
    q = np.clip(np.round((wb - lo[:, None]) / s[:, None]), 0, levels)
    codes = q.astype(np.uint8).reshape(-1, w.shape[1])
    offsets = lo + (1 << (bits - 1)) * s
    return BlockWeights(codes, s.astype(np.float32), offsets.astype(np.float32), bits, block, K)


def quantize_zero_point(w: np.ndarray, bits: int, block: int,
                        importance: np.ndarray | None = None) -> BlockWeights:
    """Asymmetric with an integer zero point per block: W ~= scale * (code - zp), zp and codes in
    [0, 2^bits - 1] (MatMulNBits' optional zero_points input; no extra graph nodes, unlike the
    offset form). The zero point is an integer, so a block whose [min, max] is not a whole number
    of steps from zero is shifted by up to half a step; per block we keep the least-squared-error
    of a few shrunk ranges, then refit the scale by least squares for the chosen codes (both
    weighted per row by `importance` [K] when given)."""
    wb, K = _blocks(w, block)
    h = _importance(importance, K, block)
    levels = (1 << bits) - 1
    lo, hi = np.minimum(wb.min(1), 0.0), np.maximum(wb.max(1), 0.0)  # zero representable exactly

    def fit(s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        zp = np.clip(np.round(-lo / s), 0, levels)
        q = np.clip(np.round(wb / s[:, None]) + zp[:, None], 0, levels)
        err = (((q - zp[:, None]) * s[:, None] - wb) ** 2 * h).sum(1)
        return zp, q, err

    base = (hi - lo) / levels
    base[base <= 0] = 1.0
    best_s, (best_zp, best_q, best_err) = base, fit(base)
    for c in CLIP_CANDIDATES[1:]:
        zp, q, err = fit(base * c)
        better = err < best_err
        best_s = np.where(better, base * c, best_s)
        best_zp, best_err = np.where(better, zp, best_zp), np.where(better, err, best_err)
        best_q = np.where(better[:, None], q, best_q)
    # least-squares scale for the chosen integers: s = <w, q - zp> / <q - zp, q - zp>
    d = best_q - best_zp[:, None]
    den = (d * d * h).sum(1)
    s_ls = np.where(den > 0, (wb * d * h).sum(1) / np.where(den > 0, den, 1.0), best_s)
    s_ls = np.where(s_ls > 0, s_ls, best_s)
    codes = best_q.astype(np.uint8).reshape(-1, w.shape[1])
    return BlockWeights(codes, s_ls.astype(np.float32), None, bits, block, K,
                        zero_points=best_zp.astype(np.uint8))


def per_channel_int8(w: np.ndarray, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel ([K, N] weight: axis 1), codes in [-127, 127] (the
    restricted range TensorRT's int8 GEMMs assume). Returns (int8 codes, float32 scales [N])."""
    amax = np.abs(w).max(axis=1 - axis)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    shape = [1, 1]
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def relative_error(w: np.ndarray, approx: np.ndarray) -> float:
    """||w - approx|| / ||w||: a quick per-tensor health figure for reports."""
    norm = float(np.linalg.norm(w))
    return float(np.linalg.norm(w - approx)) / norm if norm else 0.0
