"""Will it fit? Memory and speed of a decoder on a target, from its dimensions alone (no weights).

    result = plan_fit(dims, load_target("jetson-orin-nano-8gb"), "int4", max_seq=2048, batch=1)
    result.fits, result.explain()      # False, "does not fit at int4 with max_seq 2048: ..."

Memory is the sum of five components, compared with the target's memory (memory_gb, or the host's
MemTotal for the cpu target). Sizes are binary: 1 GiB = 2**30 bytes (how DRAM is sold);
bandwidth is decimal GB/s (how it is quoted).

  weights      every matmul (all layers and the LM head) at the precision's bytes per parameter,
               scales included; plus the input-embedding table, counted at the engine's float
               precision: it is read by a Gather, which neither MatMulNBits / MatMulInteger (ORT)
               nor TensorRT's weight-only Q/DQ matmuls quantize. Tied embeddings: on TensorRT the
               head stays at the float dtype, the one tensor serving both (quantize/trt_qdq.py);
               on ORT CPU one 8-bit copy serves both (shared_head_bits); unquantized, one tensor.
               Untied on ORT CPU: the head and the Gather table are each 8-bit (quantize/cpu.py).
               Norms, biases and learned position tables are left out (< 1 %).
  kv_cache     the runtime's static cache, KVCacheLayout.bytes_for(batch): 2 * L * Hkv * D *
               max_seq * batch * itemsize (fp32 on cpu, fp16 on jetson: target.kv_dtype); on
               TensorRT with batch > 1 also its batch - 1 staging rows (resident_bytes), where a
               step gathers slots that are not one contiguous run.
  activations  the peak of one prefill step of `chunk` tokens (see activation_bytes).
  runtime      the process before any model tensor: RUNTIME_OVERHEAD_GIB.
  os_reserve   on unified memory the OS shares the pool: target.os_reserve_gb (documented per
               target file: firmware carveouts + kernel + headless userland).

Speed is a roofline on the target's bandwidth and dense peak. A decode step reads every matmul
weight once and, because the graph attends over the whole static capacity (masked tail,
../shared/notes/static-kv-cost.md), the KV cache of all max_seq positions of every row.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundle.contract import KVCacheLayout
from bundle.errors import ToolkitError
from bundle.manifest import Components, PlanRecord, PlanRow, Speed
from models.dims import ModelDims
from targets import GIB, Target, load_target

SEQ_STEP = 256  # the max_seq search walks multiples of this
CHUNK_STEP = 64  # and the prefill-chunk search multiples of this
MAX_BATCH_SEARCH = 1024

# Bytes the runtime process holds before any model tensor is allocated.
#   onnxruntime 0.25 GiB: measured here (ORT 1.32, x86-64): python 15 MiB, + numpy 29, + import
#     onnxruntime 49, + one CPU InferenceSession run 73, + tokenizers 76 MiB RSS; rounded up to
#     cover the daemon's own imports, the thread pool's stacks and the arena's slack.
#   tensorrt 1.0 GiB: CUDA context ~0.3 GiB with lazy module loading (CUDA >= 11.7; it was > 1 GiB
#     before, pytorch/pytorch#107667) + TensorRT and the CUDA libraries it loads, ~0.6 GiB
#     (NVIDIA's answer on the forum thread "Very large CPU RAM usage in TensorRT": ~0.8 GB to load
#     cuBLAS/cuDNN/TensorRT; TensorRT 10 loads cuBLAS/cuDNN only for tactics that need them)
#     + the Python host process with pycuda ~0.1 GiB. On Jetson all of it comes out of the same
#     unified pool. ollama uses a 1 GiB minimum CUDA overhead for the same reason (ollama#2114).
#     An estimate: measure it on the board (RSS + tegrastats RAM) and correct it here.
#   Re-measured against the daemon (tests/targets/test_plan_memory.py, SmolLM2-135M, 2 slots, ORT 1.32):
#     peak RSS (VmHWM) - weights - KV cache - activations is ~175-180 MiB at int8/int4 and ~210 MiB
#     at fp32, so 0.17 GiB (174 MiB); the 0.25 above over-counted by ~80 MiB (+20-25 % at int8/int4).
RUNTIME_OVERHEAD_GIB = {"onnxruntime": 0.17, "tensorrt": 1.0}

FLOAT_BYTES = {"fp32": 4, "fp16": 2}
# untied Gather tables smaller than this (position, token-type) stay float on ORT CPU: the rule
# quantize/cpu.py applies (it imports this), counted here
EMBEDDING_MIN = 1 << 16
DTYPE_BYTES = {"float32": 4, "float16": 2}


@dataclass(frozen=True)
class WeightFormat:
    """How a quantized format stores a matmul weight: `bits` per value plus one scale per group.

    group: "block" (block_size values along the input axis share a scale), "channel" (one per
    output channel: the group is the input width, ~hidden), "tensor" (one per matrix: ~0 bytes).
    """

    bits: int | None  # None: the precision's own bits (one kernel serving int8 and int4)
    group: str
    scale_bytes: int
    block_size: int = 32
    offset_bytes: int = 0  # per group, 4-bit only: the per-block offset term (quantize/offsets.py)
    zero_point_bytes: int = 0  # per group, 8-bit layers only (not the shared head): a uint8 zero point
    # The tied LM head is stored ONCE at this many bits (same grouping) and the embedding Gather
    # reads that copy (GatherBlockQuantized): no float table. None: the head is quantized like
    # the other matmuls and the Gather keeps a float copy.
    shared_head_bits: int | None = None
    # A tied LM head left at the engine's float dtype: the one float table serves the Gather and
    # the head's MatMul, so there is no quantized copy and a decode step reads the head in float
    # (TensorRT formats: quantize/trt_qdq.py keeps a tied head fp16, tied_head_weights).
    tied_head_float: bool = False

    def bits_for(self, precision: str) -> int:
        return self.bits if self.bits is not None else int(precision.removeprefix("int"))

    def bytes_per_param(self, in_features: int, precision: str = "",
                        bits: int | None = None, head: bool = False) -> float:
        b = bits if bits is not None else self.bits_for(precision)
        per_group = {"block": self.block_size, "channel": in_features, "tensor": math.inf}
        extra = 0 if head else self.offset_bytes if b == 4 else self.zero_point_bytes if b == 8 else 0
        return b / 8 + (self.scale_bytes + extra) / per_group[self.group]


# The formats the target files name (targets/*.toml `formats`).
WEIGHT_FORMATS = {
    # ONNX Runtime CPU: block-32 with fp32 scales. MatMulNBits serves int8 and int4 (the bits come
    # from the precision); as quantize/cpu.py writes it, int4 adds one fp32 offset per block
    # (0.5 + 4/32 + 4/32 = 0.75 B/param; int8 adds a uint8 zero point per block: 1 + 4/32 + 1/32
    # = 1.156 B/param) and the tied head is one symmetric int8 copy shared with the embedding's
    # GatherBlockQuantized (1.125 B/param).
    "ort-matmul-integer": WeightFormat(8, "block", 4),
    "ort-matmulnbits": WeightFormat(None, "block", 4, offset_bytes=4, zero_point_bytes=1,
                                    shared_head_bits=8),
    # TensorRT: block quantization is INT4-only (tensorrt_jetson.md §2.2, [S18]), so int8 weights
    # carry per-channel scales; scales are fp16 because DequantizeLinear's output type is its
    # scale's type and the engine computes in fp16 (fp32 scales would add 0.06 B/param at int4).
    # A tied head stays fp16 in all three (quantize/trt_qdq.py): the Gather needs the float table.
    "qdq-int8-symmetric": WeightFormat(8, "channel", 2, tied_head_float=True),
    "qdq-int4-block-weight-only": WeightFormat(4, "block", 2, tied_head_float=True),
    "qdq-fp8": WeightFormat(8, "tensor", 4, tied_head_float=True),
}


# --- records -------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightBytes:
    matmul_params: int  # every layer's matmuls + the LM head
    matmul_bytes: int  # at the precision, scales included
    embedding_bytes: int  # the Gather table (0 when it is the same tensor as an fp head)
    bytes_per_param: float
    read_per_token: int  # what one decode step reads: the matmuls + one embedding row

    @property
    def total(self) -> int:
        return self.matmul_bytes + self.embedding_bytes


@dataclass(frozen=True)
class PrecisionPlan:
    precision: str
    format: str
    weights: WeightBytes
    components: Components
    memory_total: int
    speed: Speed

    @property
    def fits(self) -> bool:
        return self.components.total <= self.memory_total

    @property
    def headroom(self) -> int:
        """Bytes left after everything (negative: short by that much)."""
        return self.memory_total - self.components.total

    def to_json(self) -> dict[str, Any]:
        return {"precision": self.precision, "format": self.format, "fits": self.fits,
                "bytes_per_param": round(self.weights.bytes_per_param, 4),
                "components": {**asdict(self.components), "total": self.components.total},
                "weights_detail": asdict(self.weights), "headroom": self.headroom,
                "speed": asdict(self.speed)}


@dataclass(frozen=True)
class PlanResult:
    model: str
    dims: ModelDims
    target: str
    runtime: str
    memory_total: int
    memory_source: str  # "target" | "host MemTotal"
    max_seq: int
    batch: int
    prefill_chunk: int | None  # None: the whole prompt in one step
    precision: str  # the precision the verdict is about
    precision_requested: bool
    rows: tuple[PrecisionPlan, ...]  # every precision the target runs, most accurate first
    best_precision: str | None  # the most accurate precision that fits max_seq and batch
    max_seq_fit: int | None  # the largest max_seq (multiple of 256) that fits at `precision`
    batch_fit: int | None  # the largest batch that fits at `precision` and max_seq
    chunk_fit: int | None  # when whole-prompt prefill does not fit: the largest chunk that does
    # when no precision fits max_seq: the most accurate one that fits a shorter max_seq, and it
    fallback: tuple[str, int] | None = None
    warnings: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = field(default=())

    @property
    def chosen(self) -> PrecisionPlan:
        return next(r for r in self.rows if r.precision == self.precision)

    @property
    def fits(self) -> bool:
        return self.chosen.fits

    def explain(self) -> str:
        """One actionable paragraph: the verdict and what to change."""
        c = self.chosen
        need, have = c.components.total, self.memory_total
        where = f"{self.precision} with max_seq {self.max_seq}" + (
            f", batch {self.batch}" if self.batch > 1 else "")
        if c.fits:
            text = (f"fits at {where}: {_gib(need)} of {_gib(have)} GiB "
                    f"({_gib(c.headroom)} GiB spare); ~{c.speed.decode_tokens_s:.1f} tokens/s "
                    f"decode ({c.speed.decode_bound}-bound)")
            more = []
            if self.max_seq_fit and self.max_seq_fit > self.max_seq:
                more.append(f"max_seq up to {self.max_seq_fit}")
            if self.batch_fit and self.batch_fit > self.batch:
                more.append(f"batch up to {_batch(self.batch_fit)} at this max_seq")
            if more:
                text += f"; room for {' or '.join(more)}"
            better = [r.precision for r in self.rows if r.fits]
            if self.precision_requested and better and better[0] != self.precision:
                text += f"; {better[0]} would also fit (more accurate)"
            return text + "."
        options = []
        if self.best_precision:
            options.append(f"use {self.best_precision}")
        elif self.fallback and self.fallback[0] != self.precision:
            options.append(f"use {self.fallback[0]} with max_seq <= {self.fallback[1]}")
        if self.max_seq_fit:
            options.append(f"max_seq <= {self.max_seq_fit}")
        if self.batch > 1 and self.batch_fit:
            options.append(f"batch <= {self.batch_fit}")
        if self.chunk_fit:
            options.append(f"prefill in chunks of <= {self.chunk_fit} tokens "
                           f"(--prefill-chunk {self.chunk_fit})")
        text = (f"does not fit at {where}: needs {_gib(need)} GiB, {self.target} has "
                f"{_gib(have)} GiB ({_gib(-c.headroom, up=True)} GiB short)")
        if options:
            return f"{text}: {', or '.join(options)}."
        return (f"{text}, and no precision, max_seq >= {SEQ_STEP} or prefill chunk fits: the "
                f"weights alone need {_gib(_smallest(self.rows).weights.total)} GiB; choose a "
                "target with more memory.")

    def record(self) -> PlanRecord:
        """What a bundle keeps of its plan (the dims, target, max_seq and batch are the
        manifest's own fields, stored there once)."""
        return PlanRecord(
            precision=self.precision, memory_total=self.memory_total,
            memory_source=self.memory_source, fits=self.fits,  # type: ignore[arg-type]
            explanation=self.explain(),
            rows=[PlanRow(r.precision, r.format, round(r.weights.bytes_per_param, 4), r.components,
                          r.speed) for r in self.rows],
            prefill_chunk=self.prefill_chunk, best_precision=self.best_precision,
            max_seq_fit=self.max_seq_fit, batch_fit=self.batch_fit, chunk_fit=self.chunk_fit,
            fallback_precision=self.fallback[0] if self.fallback else None,
            fallback_max_seq=self.fallback[1] if self.fallback else None,
            warnings=list(self.warnings), assumptions=list(self.assumptions))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "dims": self.dims.to_json(), "target": self.target,
            "runtime": self.runtime, "memory_total": self.memory_total,
            "memory_source": self.memory_source, "max_seq": self.max_seq, "batch": self.batch,
            "prefill_chunk": self.prefill_chunk, "precision": self.precision,
            "fits": self.fits, "best_precision": self.best_precision,
            "max_seq_fit": self.max_seq_fit, "batch_fit": self.batch_fit,
            "chunk_fit": self.chunk_fit,
            "fallback": list(self.fallback) if self.fallback else None,
            "explanation": self.explain(),
            "rows": [r.to_json() for r in self.rows],
            "warnings": list(self.warnings), "assumptions": list(self.assumptions),
        }


ASSUMPTIONS = (
    "GiB = 2**30 bytes; bandwidth in 10**9 bytes/s",
    "weights: matmuls (layers + LM head) at the precision incl. scales; the embedding Gather "
    "table at the engine's float precision; a tied head is that one table (TensorRT: float; "
    "ORT CPU: one 8-bit copy); ORT CPU keeps an untied head and its table at 8 bits each",
    "KV cache: static, 2 * layers * kv_heads * head_dim * max_seq * batch * kv itemsize",
    "activations: one prefill step of `chunk` tokens (the whole context unless --prefill-chunk): "
    "fp32 logits [batch, chunk, vocab] + every layer's new K/V + one layer's peak "
    "(attention scores over max_seq + chunk, or the MLP)",
    "decode: bytes per step = matmul weights + the KV of all max_seq positions per row "
    "(the graph attends over the whole static cache); tokens/s = 1 / max(bytes / bandwidth, "
    "FLOPs / peak)",
    "prefill: FLOPs = 2 * matmul params * tokens + 4 * layers * heads * head_dim * tokens * "
    "(max_seq + chunk) over dense peak: a lower bound on the time",
)


# --- components ----------------------------------------------------------------------------
def _embedding_params(dims: ModelDims) -> int:
    return dims.vocab_size * dims.hidden


def _attn_params(dims: ModelDims) -> int:
    return dims.hidden * dims.head_dim * (2 * dims.heads + 2 * dims.kv_heads)


def matmul_params(dims: ModelDims) -> int:
    """Every layer's matmuls + the LM head. ModelDims.params counts the embedding once when tied
    (it is the head) and twice when not; the head is a matmul, the input table is not."""
    return dims.params - (0 if dims.tie_embeddings else _embedding_params(dims))


def _mlp_matrices(dims: ModelDims) -> int:
    """3 for gated MLPs (gate, up, down), 2 otherwise; read back from ModelDims.params so that
    rule lives in one place."""
    tables = _embedding_params(dims) * (1 if dims.tie_embeddings else 2)
    per_layer = (dims.params - tables) // dims.num_layers - _attn_params(dims)
    return max(1, round(per_layer / (dims.hidden * dims.intermediate)))


def float_bytes(target: Target, precision: str) -> int:
    """Item size of what stays unquantized: the precision itself when it is a float precision,
    else the engine's compute dtype (fp32 on ORT CPU, fp16 in TensorRT)."""
    return FLOAT_BYTES.get(precision, DTYPE_BYTES[target.compute_dtype])


def bytes_per_param(dims: ModelDims, target: Target, precision: str) -> float:
    if precision in FLOAT_BYTES:
        return float(FLOAT_BYTES[precision])
    fmt = target.formats.get(precision)
    if fmt not in WEIGHT_FORMATS:
        raise ToolkitError(f"target {target.name}: no weight layout known for {precision} "
                           f"(format {fmt!r})", hint="add it to WEIGHT_FORMATS in targets/plan.py")
    return WEIGHT_FORMATS[fmt].bytes_per_param(in_features=dims.hidden, precision=precision)


def weight_bytes(dims: ModelDims, target: Target, precision: str) -> WeightBytes:
    bpp = bytes_per_param(dims, target, precision)
    mm = matmul_params(dims)
    emb_item = float_bytes(target, precision)
    fmt = None if precision in FLOAT_BYTES else WEIGHT_FORMATS[target.formats[precision]]
    if fmt is not None and fmt.shared_head_bits is not None:
        # ORT CPU (quantize/cpu.py head_weights): the LM head, tied or not, at shared_head_bits;
        # tied, that one copy also serves the Gather; untied, the input table gets its own copy
        # at the same bits (GatherBlockQuantized) unless it is under EMBEDDING_MIN elements
        head = _embedding_params(dims)
        head_bpp = fmt.bytes_per_param(dims.hidden, bits=fmt.shared_head_bits, head=True)
        mm_bytes = math.ceil((mm - head) * bpp + head * head_bpp)
        row = dims.hidden * head_bpp
        emb = 0 if dims.tie_embeddings else math.ceil(head * head_bpp)
        if not dims.tie_embeddings and head < EMBEDDING_MIN:
            emb, row = head * emb_item, dims.hidden * emb_item
        return WeightBytes(matmul_params=mm, matmul_bytes=mm_bytes, embedding_bytes=emb,
                           bytes_per_param=mm_bytes / mm, read_per_token=mm_bytes + math.ceil(row))
    if dims.tie_embeddings and fmt is not None and fmt.tied_head_float:
        # the head is the float table itself: counted once, read in float by every decode step
        head = _embedding_params(dims)
        mm_bytes = math.ceil((mm - head) * bpp) + head * emb_item
        return WeightBytes(matmul_params=mm, matmul_bytes=mm_bytes, embedding_bytes=0,
                           bytes_per_param=mm_bytes / mm,
                           read_per_token=mm_bytes + dims.hidden * emb_item)
    shared = dims.tie_embeddings and precision in FLOAT_BYTES  # one tensor for Gather and head
    emb = 0 if shared else _embedding_params(dims) * emb_item
    return WeightBytes(matmul_params=mm, matmul_bytes=math.ceil(mm * bpp), embedding_bytes=emb,
                       bytes_per_param=bpp,
                       read_per_token=math.ceil(mm * bpp) + dims.hidden * emb_item)


def kv_layout(dims: ModelDims, target: Target, max_seq: int) -> KVCacheLayout:
    return dims.kv_layout(max_seq, target.kv_dtype)


def activation_bytes(dims: ModelDims, target: Target, precision: str, max_seq: int,
                     batch: int, chunk: int) -> int:
    """Peak transient memory of one step of `chunk` tokens against a cache of max_seq.

    B batch, T chunk, S max_seq, C hidden, H/Hkv heads, D head_dim, I intermediate, L layers:
      logits   B*V fp32: the contract's logits_index asks a prefill for its last position only
      new K/V  2*L*B*Hkv*T*D at the KV dtype: every layer's outputs live until the step returns
      layer    2*B*T*C (residual, normed) + max(attention, mlp), at the compute dtype, where
               attention = B*T*(H+2Hkv)*D (q, k, v) + 2*B*Hkv*(S+T)*D (past ++ new keys/values)
                           + 2*B*H*T*(S+T) (scores, softmax) + B*T*H*D (context)
               mlp       = m*B*T*I, m = 3 gated (gate, up, product) or 2 (fc, activation)
    One layer's worth, because ORT's arena and TensorRT's activation memory are reused from
    layer to layer. A fused attention kernel would not materialise the scores; this assumes
    the graph's own MatMul/Softmax (convert/decoder.py) does.
    """
    B, T, S = batch, chunk, max_seq
    C, H, Hkv, D = dims.hidden, dims.heads, dims.kv_heads, dims.head_dim
    item = float_bytes(target, precision) if precision in FLOAT_BYTES else DTYPE_BYTES[
        target.compute_dtype]
    logits = B * dims.vocab_size * 4
    if target.runtime == "onnxruntime":
        # ORT CPU, as the daemon runs it (measured: tests/targets/test_plan_memory.py, SmolLM2-135M peak
        # RSS within 15 %): the scheduler and bench prefill ONE slot at a time
        # (device/generate.prefill, B=1), ORT's arena grows only to what a step uses, and the
        # cpu graph's fused GroupQueryAttention (convert/decoder.py) writes the new K/V straight
        # into the bound static cache (no new_kv), concatenates nothing, and holds one fp32
        # probability matrix [H, T, S] over the static capacity (softmax in place).
        B = 1
        new_kv = 0
        attention = B * T * (H + 2 * Hkv) * D + B * H * T * S + B * T * H * D
    else:
        new_kv = 2 * dims.num_layers * B * Hkv * T * D * DTYPE_BYTES[target.kv_dtype]
        attention = (B * T * (H + 2 * Hkv) * D + 2 * B * Hkv * (S + T) * D
                     + 2 * B * H * T * (S + T) + B * T * H * D)
    mlp = _mlp_matrices(dims) * B * T * dims.intermediate
    layer = 2 * B * T * C + max(attention, mlp)
    return logits + new_kv + layer * item


def runtime_bytes(target: Target) -> int:
    return int(RUNTIME_OVERHEAD_GIB[target.runtime] * GIB)


def components(dims: ModelDims, target: Target, precision: str, max_seq: int, batch: int,
               chunk: int | None) -> Components:
    step = min(chunk or max_seq, max_seq)
    return Components(
        weights=weight_bytes(dims, target, precision).total,
        kv_cache=kv_layout(dims, target, max_seq).resident_bytes(batch, target.runtime),
        activations=activation_bytes(dims, target, precision, max_seq, batch, step),
        runtime=runtime_bytes(target),
        os_reserve=target.os_reserve_bytes())


# --- speed ---------------------------------------------------------------------------------
def _attention_flops(dims: ModelDims, queries: int, keys: int) -> int:
    """QK^T and PV: 2 * D FLOPs each per (query, key, head), every layer."""
    return 4 * dims.num_layers * dims.heads * dims.head_dim * queries * keys


def speed(dims: ModelDims, target: Target, precision: str, max_seq: int, batch: int,
          chunk: int | None) -> Speed:
    w = weight_bytes(dims, target, precision)
    bw = target.memory_bandwidth_gbs * 1e9
    peak = target.peak_tflops[precision] * 1e12
    kv_read = kv_layout(dims, target, max_seq).bytes_for(batch)  # the whole static capacity
    # Decode: one step yields one token per row and reads the weights once for the batch.
    step_bytes = w.read_per_token + kv_read
    step_flops = batch * (2 * w.matmul_params + _attention_flops(dims, 1, max_seq + 1))
    t_mem, t_math = step_bytes / bw, step_flops / peak
    # Prefill of a prompt that fills the context, `chunk` tokens per step; every step reads the
    # weights and the cache once and attends over the static cache plus its own tokens.
    tokens, step = max_seq, min(chunk or max_seq, max_seq)
    prefill_s = 0.0
    for start in range(0, tokens, step):
        t = min(step, tokens - start)
        flops = batch * (2 * w.matmul_params * t + _attention_flops(dims, t, max_seq + t))
        prefill_s += max(flops / peak, step_bytes / bw)
    return Speed(decode_tokens_s=1.0 / max(t_mem, t_math),
                 decode_bound="memory" if t_mem >= t_math else "compute",
                 decode_bytes_per_step=step_bytes, prefill_tokens=tokens, prefill_s=prefill_s)


# --- searches ------------------------------------------------------------------------------
def _largest(lo: int, hi: int, ok: Any) -> int | None:
    """The largest k in [lo, hi] with ok(k), for ok monotone (true, then false); None if none."""
    if hi < lo or not ok(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
    return lo


def largest_max_seq(dims: ModelDims, target: Target, precision: str, batch: int,
                    chunk: int | None, memory_total: int) -> int | None:
    """The largest multiple of SEQ_STEP up to dims.max_positions that fits (memory grows with
    max_seq: the cache, and the attention scores of a step)."""
    if dims.max_positions < SEQ_STEP:  # a tiny model: its own limit is the only candidate
        fits = components(dims, target, precision, dims.max_positions, batch, chunk).total
        return dims.max_positions if fits <= memory_total else None
    k = _largest(1, dims.max_positions // SEQ_STEP, lambda k: components(
        dims, target, precision, k * SEQ_STEP, batch, chunk).total <= memory_total)
    return k * SEQ_STEP if k else None


def largest_batch(dims: ModelDims, target: Target, precision: str, max_seq: int,
                  chunk: int | None, memory_total: int) -> int | None:
    return _largest(1, MAX_BATCH_SEARCH, lambda b: components(
        dims, target, precision, max_seq, b, chunk).total <= memory_total)


def largest_chunk(dims: ModelDims, target: Target, precision: str, max_seq: int, batch: int,
                  memory_total: int) -> int | None:
    k = _largest(1, max_seq // CHUNK_STEP, lambda k: components(
        dims, target, precision, max_seq, batch, k * CHUNK_STEP).total <= memory_total)
    return k * CHUNK_STEP if k else None


# --- the plan ------------------------------------------------------------------------------
def plan_fit(dims: ModelDims, target: Target, precision: str | None, max_seq: int, batch: int,
             *, prefill_chunk: int | None = None, memory_bytes: int | None = None,
             model_name: str | None = None) -> PlanResult:
    """Plan `dims` on `target`. precision None: the most accurate precision that fits (or, when
    none does, the smallest, to show how far off it is). prefill_chunk None: the whole prompt in
    one step, as device/generate.prefill does by default and as a TensorRT profile whose max
    seq is max_seq allocates. memory_bytes overrides the target's memory (tests, what-ifs)."""
    _check_ints(max_seq=max_seq, batch=batch, prefill_chunk=prefill_chunk)
    if max_seq > dims.max_positions:
        raise ToolkitError(
            f"max_seq {max_seq} is beyond the model's {dims.max_positions} positions",
            hint=f"use --max-seq {dims.max_positions} or less")
    if precision is not None:
        target.check_precision(precision)
    total = memory_bytes if memory_bytes is not None else target.memory_total_bytes()

    rows = tuple(_row(dims, target, p, max_seq, batch, prefill_chunk, total)
                 for p in target.precisions)
    fitting = [r.precision for r in rows if r.fits]
    best = fitting[0] if fitting else None
    chosen = precision or best or _smallest(rows).precision
    fits = next(r for r in rows if r.precision == chosen).fits
    chunk_fit = fallback = None
    if not fits and prefill_chunk is None:
        chunk_fit = largest_chunk(dims, target, chosen, max_seq, batch, total)
    if best is None:
        fallback = next(((p, s) for p in target.precisions
                         if (s := largest_max_seq(dims, target, p, batch, prefill_chunk, total))),
                        None)
    return PlanResult(
        model=model_name or dims.model_type, dims=dims, target=target.name,
        runtime=target.runtime, memory_total=total,
        memory_source="host MemTotal" if target.host_memory and memory_bytes is None
        else "target",
        max_seq=max_seq, batch=batch, prefill_chunk=prefill_chunk, precision=chosen,
        precision_requested=precision is not None, rows=rows, best_precision=best,
        max_seq_fit=largest_max_seq(dims, target, chosen, batch, prefill_chunk, total),
        batch_fit=largest_batch(dims, target, chosen, max_seq, prefill_chunk, total),
        chunk_fit=chunk_fit, fallback=fallback,
        warnings=tuple(_warnings(dims, target, chosen, max_seq, total, rows)),
        assumptions=ASSUMPTIONS)


def _row(dims: ModelDims, target: Target, precision: str, max_seq: int, batch: int,
         chunk: int | None, total: int) -> PrecisionPlan:
    return PrecisionPlan(
        precision=precision, format=target.formats.get(precision, precision),
        weights=weight_bytes(dims, target, precision),
        components=components(dims, target, precision, max_seq, batch, chunk),
        memory_total=total, speed=speed(dims, target, precision, max_seq, batch, chunk))


def _smallest(rows: tuple[PrecisionPlan, ...]) -> PrecisionPlan:
    return min(rows, key=lambda r: r.components.total)


def _warnings(dims: ModelDims, target: Target, precision: str, max_seq: int, total: int,
              rows: tuple[PrecisionPlan, ...]) -> list[str]:
    out = []
    row = next(r for r in rows if r.precision == precision)
    # Loading holds the weights twice for a moment: TensorRT deserializes a plan read into host
    # memory into device memory (one pool on Jetson), ORT reads initializers and prepacks them;
    # building an engine on the device holds the ONNX weights and the engine it builds
    # (anchors.md pain point 3: "Killed" on Orin Nano during build or first load).
    peak = 2 * row.weights.total + row.components.runtime + row.components.os_reserve
    if peak > total:
        what = ("building the engine on the device (TensorRT holds the ONNX weights and the "
                "engine) and loading it" if target.builds_on_device else "creating the session")
        out.append(f"{what} may transiently need ~{_gib(peak)} GiB (2 x weights + runtime + "
                   f"reserve) of {_gib(total)}: add swap for the build or load step")
    if target.host_memory:
        out.append(f"memory is this host's MemTotal ({_gib(total)} GiB); plan on the machine "
                   "that will run the bundle")
    return out


def _check_ints(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ToolkitError(f"{name.replace('_', '-')} must be at least 1 (got {value})")


def _gib(n: int, up: bool = False) -> str:
    """n bytes in GiB, 2 decimals; up=True rounds up (a shortfall never shows as 0.00)."""
    return f"{math.ceil(n / GIB * 100) / 100:.2f}" if up else f"{n / GIB:.2f}"


def _batch(n: int) -> str:
    return f"{n}+" if n >= MAX_BATCH_SEARCH else str(n)


# --- from a model argument -----------------------------------------------------------------
# What each normalised field means, for the missing-field error.
_FIELD_MEANING = {"num_layers": "the number of decoder layers", "hidden": "the hidden width",
                  "heads": "the number of attention heads", "intermediate": "the MLP width",
                  "max_positions": "the longest context the model was trained for",
                  "vocab": "the vocabulary size"}


def plan_from_model(model_arg: str, target_name: str, precision: str | None = None,
                    max_seq: int | None = None, batch: int = 1, *,
                    prefill_chunk: int | None = None) -> PlanResult:
    """Plan from a MODEL argument: a Hugging Face folder (weights not needed: a folder with
    only config.json, or the config.json itself, is enough), a .gguf file or a packaged name.
    max_seq None: Target.max_seq_for (the default, capped by positions and the RoPE limit)."""
    from models.dims import dims_from_config
    from models.params import static_rope_limit
    from models.registry import DECODER, get_spec

    target = load_target(target_name)  # an unknown target fails before any file is read
    name, config = load_model_config(model_arg)
    spec = get_spec(getattr(config, "model_type", None))
    if spec.task != DECODER:
        raise ToolkitError(f"{name} is a {spec.model_type} encoder; `toolkit plan` sizes "
                           "decoders (weights, KV cache, decode speed)",
                           hint="an encoder's memory is about its weights: "
                                "parameters x bytes per parameter")
    dims = dims_from_config(spec, config)
    seq = target.max_seq_for(dims.max_positions, static_rope_limit(config), max_seq)
    return plan_fit(dims, target, precision, seq, batch, prefill_chunk=prefill_chunk,
                    model_name=name)


def load_model_config(model_arg: str) -> tuple[str, Any]:
    """(name, transformers config). A config.json is read as written and checked for the fields
    the plan needs first: transformers would silently fill a missing one with its class
    default (LlamaConfig's hidden_size 4096...), and the plan would be for another model."""
    path = Path(model_arg).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.name, _config_from_json(path / "config.json")
    if path.is_file() and path.suffix == ".json":
        return path.parent.name or path.stem, _config_from_json(path)
    from models.sources import resolve

    src = resolve(model_arg)
    if src.kind == "onnx":
        raise ToolkitError(f"{src.path} is an ONNX file: it carries no model config to plan from",
                           hint="give the Hugging Face folder (or its config.json) it came from")
    if src.kind == "hf":
        return src.name, _config_from_json(src.path / "config.json")
    return src.name, src.load_config()  # GGUF: transformers maps its metadata


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    from models.registry import get_spec

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"cannot read {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ToolkitError(f"{path} is not a JSON object")
    spec = get_spec(raw.get("model_type"))
    names = spec.names
    needed = {"num_layers": names.num_layers, "hidden": names.hidden, "heads": names.heads,
              "vocab": names.vocab, "max_positions": names.max_positions}
    if names.intermediate != "n_inner":  # gpt2's n_inner null means 4 * n_embd, by design
        needed["intermediate"] = names.intermediate
    missing = [f"{key!r} ({_FIELD_MEANING[field_]})" for field_, key in needed.items()
               if raw.get(key) is None]
    if missing:
        raise ToolkitError(f"{path}: the {spec.model_type} config has no {', '.join(missing)}; "
                           "the plan needs it",
                           hint="the config.json is incomplete: copy the model's own "
                                "config.json from its Hugging Face repository")
    try:
        return AutoConfig.for_model(**raw)
    except (TypeError, ValueError) as e:
        raise ToolkitError(f"{path}: transformers cannot read this {spec.model_type} config: "
                           f"{e}") from e
