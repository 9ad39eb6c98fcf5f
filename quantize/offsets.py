"""The per-block offset term of the TensorRT int4 Q/DQ format, as separate graph nodes.

(The CPU format carries the same offsets in the zero points and extra rows of one MatMulNBits: see
quantize/cpu.py, OffsetRows. TensorRT's INT4 DQ has no such trick, so it gets these nodes.)

Both runtimes take zero-point-free ("symmetric") block weights in their fastest paths (TensorRT's
INT4 DQ only those; ONNX Runtime's one-row CPU kernel for blocks of 32), yet a
block of 32 weights is rarely centred on zero, and a symmetric 4-bit grid then spends half its 16
levels on values the block never has. The offset form (quantize/blockwise.py) fits each block's
[min, max] and splits the weight into an integer part and one float per block:

    W[k, n] = s[b, n] * (q[k, n] - 8) + c[b, n]          b = k // block

    x @ W   = x @ (s * (q - 8))        + (x @ E) @ C
              zero-point-free weights    E [K, kb]: E[k, b] = 1 if k // block == b (block sums)
              (MatMulNBits / INT4 DQ)    C [kb, N]: the offsets

so the graph gains, per weight, one small MatMul [.., kb] @ [kb, N] (1/32 of the layer's work
at block 32) and an Add; the block sums x @ E are computed once per input tensor. Every op is
plain ONNX (MatMul, Add), so TensorRT parses it as it parses the rest of the graph.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from quantize import graph as g


class OffsetTerms:
    """Adds the `(x @ E) @ C` nodes, sharing x @ E between the weights that read the same x."""

    def __init__(self, graph: onnx.GraphProto, block: int) -> None:
        self.graph, self.block = graph, block
        self.sums: dict[str, str] = {}  # x -> x @ E
        self.indicators: dict[int, str] = {}  # K -> E initializer

    def nodes(self, x: str, K: int, offsets: np.ndarray, main: str, out: str,
              name: str) -> list[onnx.NodeProto]:
        """Nodes computing out = main + (x @ E) @ C, where C = offsets [kb, N]."""
        new: list[onnx.NodeProto] = []
        if x not in self.sums:
            self.sums[x] = g.unique_name(self.graph, f"{x}_blocksum")
            new.append(helper.make_node("MatMul", [x, self._indicator(K)], [self.sums[x]],
                                        name=f"{self.sums[x]}_MatMul"))
        c = g.add_initializer(self.graph, offsets.astype(np.float32),
                              g.unique_name(self.graph, f"{name}_offsets"))
        corr = g.unique_name(self.graph, f"{name}_offset_term")
        new += [helper.make_node("MatMul", [self.sums[x], c], [corr], name=f"{corr}_MatMul"),
                helper.make_node("Add", [main, corr], [out], name=f"{name}_AddOffset")]
        return new

    def _indicator(self, K: int) -> str:
        if K not in self.indicators:
            kb = -(-K // self.block)
            e = np.zeros((K, kb), np.float32)
            e[np.arange(K), np.arange(K) // self.block] = 1.0
            self.indicators[K] = g.add_initializer(self.graph, e, g.unique_name(self.graph, f"block_sum_{K}"))
        return self.indicators[K]
