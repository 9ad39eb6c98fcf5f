"""What one batched step costs in ONNX Runtime's CPU kernels, by rows: why batching gains less at
int8/int4 than at fp32 on the CPU (issue 20's c=8 / c=1), measured on the kernels alone.

    python bench/kernels.py [--threads 2] [--repeat 30] [--only matmul attention]

matmul     the decoder's product shapes (SmolLM2-135M: K x N = 576 x 1536 and 1536 x 576, 8
           random weights each, so the weights come from memory and not from a warm cache)
           at M = 1 .. 128 rows: fp32 MatMul (MLAS SGEMM), and MatMulNBits with blocks of 32 at
           4 and 8 bits, accuracy_level 4 (int8 compute: what the bundles use,
           quantize/formats.py) and 0 (fp32 compute). Prints ms for the 8 products and each
           M's cost over M = 1's. A kernel that reads its weights once for all rows costs
           little more at M = 8 than at M = 1; one that goes row by row costs ~M times as much.
attention  GroupQueryAttention as the bundles use it (9 query heads, 3 KV heads of 64, packed
           q/k/v, rotary inside, the cache updated in place), 30 layers, rows of one token with
           P tokens of past: B = 1 and 8 rows, a cache of 256 and of 2048 positions a row (the
           default bundle's max_seq), fp32 and fp16. It reads every past key and value of every
           row, once per query head's group: memory-bound, ~B times one row's time.

Times are medians of --repeat runs after 3 warm-ups, in one process; compare ratios within a
table, not absolute times across machines (2 shared cores are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

ROWS = (1, 2, 4, 8, 16, 32, 128)
SHAPES = ((576, 1536), (1536, 576))  # SmolLM2-135M's MLP (hidden, intermediate)
LAYERS = 8  # products per model in the matmul table: 8 x 576 x 1536 fp32 = 28 MB, past the caches
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
ATTENTION_LAYERS = 30


def _session(model: Any, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def product_model(K: int, N: int, bits: int | None, accuracy: int = 4) -> Any:
    """LAYERS independent products of x [M, K]: fp32 MatMul (bits None) or MatMulNBits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for i in range(LAYERS):
        if bits is None:
            inits.append(numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        else:
            blocks, block = (K + 31) // 32, 32
            q = rng.integers(0, 255, size=(N, blocks, block * bits // 8), dtype=np.uint8)
            s = (rng.random(N * blocks, dtype=np.float32) * 0.01).astype(np.float32)
            inits += [numpy_helper.from_array(q, f"q{i}"), numpy_helper.from_array(s, f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"],
                                          domain="com.microsoft", K=K, N=N, bits=bits, block_size=block,
                                          accuracy_level=accuracy))
        outs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["M", N]))
    graph = helper.make_graph(nodes, "products", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["M", K])], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def matmul_table(threads: int, repeat: int) -> list[str]:
    kinds = {"fp32": (None, 4), "4-bit acc4": (4, 4), "4-bit acc0": (4, 0), "8-bit acc4": (8, 4),
             "8-bit acc0": (8, 0)}
    lines = []
    for K, N in SHAPES:
        ms: dict[str, dict[int, float]] = {}
        for kind, (bits, acc) in kinds.items():
            session = _session(product_model(K, N, bits, acc), threads)
            ms[kind] = {}
            for M in ROWS:
                x = np.random.default_rng(1).standard_normal((M, K), dtype=np.float32)
                ms[kind][M] = _median_ms(lambda s=session, x=x: s.run(None, {"x": x}), repeat)
        lines += ["", f"{LAYERS} products {K} x {N}, ms (x: over M = 1)",
                  f"{'M':>5}" + "".join(f"{k:>20}" for k in kinds)]
        for M in ROWS:
            lines.append(f"{M:>5}" + "".join(f"{ms[k][M]:>11.3f} ({ms[k][M] / ms[k][1]:>5.1f}x)"
                                             for k in kinds))
    return lines


def attention_model(S: int, fp16: bool) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    dtype, elem = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    rng = np.random.default_rng(0)
    cos, sin = (numpy_helper.from_array(rng.random((S, HEAD_DIM // 2)).astype(dtype), name)
                for name in ("cos", "sin"))
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    inputs = [helper.make_tensor_value_info("qkv", elem, ["B", "T", width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    nodes, outs = [], []
    for layer in range(ATTENTION_LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_{kv}{layer}", elem, ["B", KV_HEADS, S, HEAD_DIM])
                   for kv in "kv"]
        nodes.append(helper.make_node(
            "GroupQueryAttention", ["qkv", "", "", f"past_k{layer}", f"past_v{layer}", "seqlens_k", "total",
                                    "cos", "sin"], [f"out{layer}", f"present_k{layer}", f"present_v{layer}"],
            domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1,
            scale=HEAD_DIM ** -0.5))
        outs += [helper.make_tensor_value_info(n, elem, None)
                 for n in (f"out{layer}", f"present_k{layer}", f"present_v{layer}")]
    graph = helper.make_graph(nodes, "attention", inputs, outs, [cos, sin])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def attention_ms(S: int, B: int, past: int, fp16: bool, threads: int, repeat: int) -> float:
    """One [B, 1] step of 30 layers, the caches bound in place as the runtime binds them."""
    session = _session(attention_model(S, fp16), threads)
    dtype = np.float16 if fp16 else np.float32
    rng = np.random.default_rng(1)
    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.random((B, 1, (HEADS + 2 * KV_HEADS) * HEAD_DIM)).astype(dtype))
    binding.bind_cpu_input("seqlens_k", np.full(B, past, np.int32))
    binding.bind_cpu_input("total", np.array(past + 1, np.int32))
    caches = []
    for layer in range(ATTENTION_LAYERS):
        for kv in "kv":
            cache = rng.random((B, KV_HEADS, S, HEAD_DIM)).astype(dtype)
            caches.append(cache)
            binding.bind_cpu_input(f"past_{kv}{layer}", cache)
            binding.bind_output(f"present_{kv}{layer}", "cpu", 0, dtype, list(cache.shape), cache.ctypes.data)
        binding.bind_output(f"out{layer}", "cpu")
    return _median_ms(lambda: session.run_with_iobinding(binding), repeat)


def attention_table(threads: int, repeat: int, past: int = 200) -> list[str]:
    lines = ["", f"GroupQueryAttention, {ATTENTION_LAYERS} layers, rows of 1 token over {past} past "
                 "tokens, ms (x: over 1 row)",
             f"{'cache':>8} {'B':>3}{'fp32':>16}{'fp16':>16}"]
    for S in (256, 2048):
        one = {f: attention_ms(S, 1, past, f, threads, repeat) for f in (False, True)}
        for B in (1, 8):
            ms = one if B == 1 else {f: attention_ms(S, B, past, f, threads, repeat) for f in (False, True)}
            lines.append(f"{S:>8} {B:>3}" + "".join(f"{ms[f]:>8.2f} ({ms[f] / one[f]:>4.1f}x)"
                                                    for f in (False, True)))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--only", nargs="+", choices=("matmul", "attention"), default=["matmul", "attention"])
    args = ap.parse_args()
    lines = [f"ONNX Runtime CPU kernels, {args.threads} threads, medians of {args.repeat}"]
    if "matmul" in args.only:
        lines += matmul_table(args.threads, args.repeat)
    if "attention" in args.only:
        lines += attention_table(args.threads, args.repeat)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
