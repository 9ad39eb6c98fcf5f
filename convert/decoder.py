"""Decoder modules written for export under the static-KV contract (bundle/contract.py).

The weights are the Hugging Face model's own (module names mirror the checkpoint, so
`load_state_dict(strict=True)` maps them one to one); only attention is ours, because it must
read a fixed-capacity cache it does not own and return the new keys/values instead of a grown
cache. Every op used (MatMul, Gather, Softmax, Where, Concat, Less/LessOrEqual, basic
arithmetic) is in TensorRT 10.3's ONNX parser and in ONNX Runtime.

Shapes: B batch, T tokens this step, S max_seq (static), H query heads, Hkv kv heads,
G = H / Hkv, D head_dim, C hidden.

    input_ids [B,T] ──embed──► x [B,T,C] ──► N × block ──► norm ──► lm_head ──► logits [B,T,V]
    position_ids [B,T] ─► RoPE rows (or learned positions), and the attention mask:
        past  key j   visible iff j < position_ids[b, 0]            (valid prefix of the cache)
        new   key t'  visible iff position_ids[b, t'] <= position_ids[b, t]   (causal)
    block i:  past_key.{i} [B,Hkv,S,D] ─┐
              k_new [B,Hkv,T,D] ────────┴► concat [B,Hkv,S+T,D] ─► attention ─► new_key.{i}=k_new
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.dims import ModelDims
from models.registry import ArchSpec

# Added to masked scores. Finite so that fp16 conversion saturates to -inf instead of NaN, and a
# query always sees at least itself, so no row of the softmax is all-masked.
MASKED = -1e9


def attention_mask(position_ids: torch.Tensor, max_seq: int) -> torch.Tensor:
    """Boolean [B, 1, T, S+T]: which of (cache, new) keys each query may attend to."""
    past_len = position_ids[:, :1]  # [B,1]
    cache_idx = torch.arange(max_seq, dtype=position_ids.dtype, device=position_ids.device)
    past = cache_idx[None, None, :] < past_len[:, :, None]  # [B,1,S]
    past = past.expand(-1, position_ids.shape[1], -1)  # [B,T,S]
    new = position_ids[:, None, :] <= position_ids[:, :, None]  # [B,T,T]: key t' <= query t
    return torch.cat([past, new], dim=2)[:, None]  # [B,1,T,S+T]


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """q [B,H,T,D], k/v [B,Hkv,T,D], past [B,Hkv,S,D], mask [B,1,T,S+T] -> [B,T,H*D].

    Grouped-query attention without materialising repeated K/V: the G query heads that share
    a kv head are folded into the row axis ([B,Hkv,G*T,D]), so each MatMul stays 4-D.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    keys = torch.cat([past_k, k], dim=2)  # [B,Hkv,S+T,D]
    vals = torch.cat([past_v, v], dim=2)
    qg = q.reshape(B, Hkv, G * T, D)  # head h = kv * G + g, as HF's repeat_kv
    scores = torch.matmul(qg, keys.transpose(2, 3)) * (1.0 / math.sqrt(D))  # [B,Hkv,G*T,S+T]
    rows = mask.repeat(1, 1, G, 1)  # [B,1,G*T,S+T]: row g*T + t uses query t's mask
    scores = torch.where(rows, scores, torch.full_like(scores, MASKED))
    out = torch.matmul(torch.softmax(scores, dim=-1), vals)  # [B,Hkv,G*T,D]
    return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


class GroupQueryAttention(torch.autograd.Function):
    """ONNX Runtime's fused com.microsoft.GroupQueryAttention, for CPU bundles only.

    It reads just the valid prefix of the cache (per-row seqlens_k), applies RoPE itself and,
    when the runtime binds present_key to the same buffer as past_key, writes the new keys in
    place: no full-capacity reads, no concat copies. TensorRT's parser does not know it, so
    Jetson bundles keep `static_attention`. CPU kernel limits (onnxruntime 1.32): head_dim a
    multiple of 16; a multi-token step with past only for batch 1 (prefill runs per slot).

    forward() is the reference computation (used only while tracing); symbolic() is the node.
    q [B,T,H*D], k/v [B,T,Hkv*D] (or q packed [B,T,(H+2Hkv)*D] and k = v = None),
    past [B,Hkv,S,D], position_ids [B,T], cos/sin [S,D/2] or None
    -> out [B,T,H*D], present_k/v [B,Hkv,S,D]
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                past_k: torch.Tensor,
                past_v: torch.Tensor, seqlens_k: torch.Tensor, total: torch.Tensor,
                cos: torch.Tensor | None, sin: torch.Tensor | None, heads: int, kv_heads: int,
                head_dim: int, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = q.shape
        D = head_dim
        if k is None or v is None:  # packed QKV [B,T,(H+2Hkv)*D]
            q, k, v = q.split([heads * D, kv_heads * D, kv_heads * D], dim=2)
        q = q.view(B, T, heads, D).transpose(1, 2)
        k = k.view(B, T, kv_heads, D).transpose(1, 2)
        v = v.view(B, T, kv_heads, D).transpose(1, 2)
        if cos is not None and sin is not None:
            c = torch.cat([cos, cos], -1)[position_ids][:, None]
            s_ = torch.cat([sin, sin], -1)[position_ids][:, None]
            q, k = q * c + rotate_half(q) * s_, k * c + rotate_half(k) * s_
        out = static_attention(q, k, v, past_k, past_v, attention_mask(position_ids, past_k.shape[2]))
        present_k, present_v = past_k.clone(), past_v.clone()
        for b in range(B):
            p0 = int(position_ids[b, 0])
            present_k[b, :, p0:p0 + T], present_v[b, :, p0:p0 + T] = k[b], v[b]
        return out, present_k, present_v

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, seqlens_k: Any,
                 total: Any, cos: Any, sin: Any, heads: int, kv_heads: int, head_dim: int,
                 position_ids: Any) -> Any:
        rotary = cos is not None and not (hasattr(cos, "node") and cos.node().mustBeNone())
        if k is None:  # packed QKV: key and value are absent optional inputs ("" in ONNX)
            k = v = g.op("prim::Constant")
            k.setType(torch._C.OptionalType.ofTensor())  # a typed None becomes "" on export
        inputs = [q, k, v, past_k, past_v, seqlens_k, total] + ([cos, sin] if rotary else [])
        return g.op("com.microsoft::GroupQueryAttention", *inputs, num_heads_i=heads,
                    kv_num_heads_i=kv_heads, do_rotary_i=int(rotary),
                    scale_f=1.0 / math.sqrt(head_dim), outputs=3)


def gqa_supported(dims: ModelDims) -> bool:
    return dims.head_dim % 16 == 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


@dataclass
class Step:
    """What every layer needs to know about this step, computed once per forward."""

    position_ids: torch.Tensor  # [B,T]
    gqa: bool
    mask: torch.Tensor | None = None  # static: [B,1,T,S+T]
    cos: torch.Tensor | None = None  # static: [B,1,T,D] rows for these positions
    sin: torch.Tensor | None = None
    seqlens_k: torch.Tensor | None = None  # gqa: [B] int32, total length - 1 per row
    total: torch.Tensor | None = None  # gqa: scalar int32, longest total length
    cos_cache: torch.Tensor | None = None  # gqa: [S,D/2]
    sin_cache: torch.Tensor | None = None


def attend(d: ModelDims, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
           past_k: torch.Tensor, past_v: torch.Tensor, step: Step) -> tuple[Any, ...]:
    """q [B,T,H*D], k/v [B,T,Hkv*D] (before RoPE) -> (out [B,T,H*D], new_k, new_v [B,Hkv,T,D],
    present_k, present_v [B,Hkv,S,D]): new_* for the static form (the host writes them), present_*
    for the in-place form (the cache after this step); the other pair is None."""
    B, T, _ = q.shape
    if step.gqa:
        out, pk, pv = GroupQueryAttention.apply(q, k, v, past_k, past_v, step.seqlens_k, step.total,
                                                step.cos_cache, step.sin_cache, d.heads, d.kv_heads,
                                                d.head_dim, step.position_ids)
        return out, None, None, pk, pv  # the cache itself is the output: no new_* slices
    if k is None or v is None:  # packed QKV
        q, k, v = q.split([d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim], 2)
    q = q.view(B, T, d.heads, d.head_dim).transpose(1, 2)  # [B,H,T,D]
    k = k.view(B, T, d.kv_heads, d.head_dim).transpose(1, 2)  # [B,Hkv,T,D]
    v = v.view(B, T, d.kv_heads, d.head_dim).transpose(1, 2)
    if step.cos is not None and step.sin is not None:
        q = q * step.cos + rotate_half(q) * step.sin
        k = k * step.cos + rotate_half(k) * step.sin
    return static_attention(q, k, v, past_k, past_v, step.mask), k, v, None, None  # type: ignore[arg-type]


# --- llama family: llama, mistral, qwen2 ----------------------------------------------------
class LlamaAttention(nn.Module):
    def __init__(self, d: ModelDims, qkv_bias: bool, out_bias: bool) -> None:
        super().__init__()
        self.d = d
        self.q_proj = nn.Linear(d.hidden, d.heads * d.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d.hidden, d.kv_heads * d.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d.hidden, d.kv_heads * d.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(d.heads * d.head_dim, d.hidden, bias=out_bias)

    def pack_qkv(self) -> None:
        """One [C, (H+2Hkv)*D] MatMul instead of three: a decode step is three GEMVs fewer
        kernel calls, and GroupQueryAttention takes the packed result as it is."""
        q, k, v = self.q_proj, self.k_proj, self.v_proj
        packed = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features,
                           bias=q.bias is not None)
        packed.weight.data = torch.cat([q.weight, k.weight, v.weight]).detach()
        if q.bias is not None:
            packed.bias.data = torch.cat([q.bias, k.bias, v.bias]).detach()
        self.qkv_proj = packed
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                step: Step) -> tuple[torch.Tensor, ...]:
        if hasattr(self, "qkv_proj"):
            out, *kv = attend(self.d, self.qkv_proj(x), None, None, past_k, past_v, step)
        else:
            out, *kv = attend(self.d, self.q_proj(x), self.k_proj(x), self.v_proj(x), past_k, past_v,
                              step)
        return (self.o_proj(out), *kv)


class LlamaMLP(nn.Module):
    def __init__(self, d: ModelDims, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d.hidden, d.intermediate, bias=bias)
        self.up_proj = nn.Linear(d.hidden, d.intermediate, bias=bias)
        self.down_proj = nn.Linear(d.intermediate, d.hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, d: ModelDims, spec: ArchSpec, config: Any) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(d, spec.flag(spec.qkv_bias, config),
                                        spec.flag(spec.out_bias, config))
        self.mlp = LlamaMLP(d, spec.flag(spec.mlp_bias, config))
        self.input_layernorm = RMSNorm(d.hidden, d.norm_eps)
        self.post_attention_layernorm = RMSNorm(d.hidden, d.norm_eps)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                step: Step) -> tuple[torch.Tensor, ...]:
        h, *kv = self.self_attn(self.input_layernorm(x), past_k, past_v, step)
        x = x + h
        return (x + self.mlp(self.post_attention_layernorm(x)), *kv)


class LlamaBody(nn.Module):
    """`model.*` of a LlamaForCausalLM-like checkpoint."""

    def __init__(self, d: ModelDims, spec: ArchSpec, config: Any) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(d.vocab_size, d.hidden)
        self.layers = nn.ModuleList(LlamaBlock(d, spec, config) for _ in range(d.num_layers))
        self.norm = RMSNorm(d.hidden, d.norm_eps)


# --- gpt2 family: learned positions, LayerNorm, fused c_attn (Conv1D: y = x @ W + b) --------
class Conv1D(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, d: ModelDims) -> None:
        super().__init__()
        self.d = d
        self.c_attn = Conv1D(d.hidden, 3 * d.hidden)
        self.c_proj = Conv1D(d.hidden, d.hidden)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                step: Step) -> tuple[torch.Tensor, ...]:
        out, *kv = attend(self.d, self.c_attn(x), None, None, past_k, past_v, step)  # packed QKV
        return (self.c_proj(out), *kv)


class GPT2MLP(nn.Module):
    def __init__(self, d: ModelDims) -> None:
        super().__init__()
        self.c_fc = Conv1D(d.hidden, d.intermediate)
        self.c_proj = Conv1D(d.intermediate, d.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # gelu_new


class GPT2Block(nn.Module):
    def __init__(self, d: ModelDims) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d.hidden, eps=d.norm_eps)
        self.attn = GPT2Attention(d)
        self.ln_2 = nn.LayerNorm(d.hidden, eps=d.norm_eps)
        self.mlp = GPT2MLP(d)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                step: Step) -> tuple[torch.Tensor, ...]:
        h, *kv = self.attn(self.ln_1(x), past_k, past_v, step)
        x = x + h
        return (x + self.mlp(self.ln_2(x)), *kv)


class GPT2Body(nn.Module):
    """`transformer.*` of a GPT2LMHeadModel checkpoint."""

    def __init__(self, d: ModelDims) -> None:
        super().__init__()
        self.wte = nn.Embedding(d.vocab_size, d.hidden)
        self.wpe = nn.Embedding(d.max_positions, d.hidden)
        self.h = nn.ModuleList(GPT2Block(d) for _ in range(d.num_layers))
        self.ln_f = nn.LayerNorm(d.hidden, eps=d.norm_eps)


# --- the exported wrapper ------------------------------------------------------------------
class StaticKVDecoder(nn.Module):
    """forward(input_ids, position_ids, logits_index, past_key.0, past_value.0, ...) ->
    (logits, new_key.0, new_value.0, ...) with attention="static", or
    (logits, present_key.0, present_value.0, ...) with attention="gqa" (in-place):
    the static-kv-v1 contract."""

    def __init__(self, spec: ArchSpec, dims: ModelDims, config: Any, max_seq: int,
                 attention: str = "static") -> None:
        super().__init__()
        self.spec, self.dims, self.max_seq, self.attention = spec, dims, max_seq, attention
        self.body: nn.Module
        if spec.family == "gpt2":
            self.body = GPT2Body(dims)
            self.blocks = self.body.h
            self.final_norm = self.body.ln_f
        else:
            self.body = LlamaBody(dims, spec, config)
            self.blocks = self.body.layers
            self.final_norm = self.body.norm
        # The LM head is stored transposed, [C, V]. With tied embeddings the embedding lookup
        # gathers columns of that same tensor, so the graph holds one copy of the matrix
        # (a plain Gather + MatMul(W^T) would make the exporter fold a second, transposed copy).
        self.lm_head_t = nn.Parameter(torch.empty(dims.hidden, dims.vocab_size))
        self.register_buffer("rope_cos", torch.zeros(1), persistent=False)
        self.register_buffer("rope_sin", torch.zeros(1), persistent=False)

    @classmethod
    def from_hf(cls, spec: ArchSpec, dims: ModelDims, hf_model: Any, max_seq: int,
                attention: str = "static") -> StaticKVDecoder:
        """Copy the weights of a transformers model; every tensor must map (strict)."""
        m = cls(spec, dims, hf_model.config, max_seq, attention)
        state = hf_model.state_dict()
        prefix = "transformer." if spec.family == "gpt2" else "model."
        body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        body = {k: v for k, v in body.items() if not k.endswith(("rotary_emb.inv_freq", ".attn.bias",
                                                                  ".attn.masked_bias"))}
        m.body.load_state_dict(body, strict=True)
        head = state.get("lm_head.weight", m.embedding_weight())
        m.lm_head_t.data = head.detach().t().contiguous()
        if spec.positions == "rope":
            m.set_rope(hf_model, max_seq)
        if attention == "gqa" and spec.family == "llama":
            for block in m.blocks:
                block.self_attn.pack_qkv()
        return m.eval()

    def embedding_weight(self) -> torch.Tensor:
        emb = self.body.wte if self.spec.family == "gpt2" else self.body.embed_tokens
        return emb.weight

    def set_rope(self, hf_model: Any, max_seq: int) -> None:
        """cos/sin rows for positions [0, max_seq) from the model's own rotary module, so every
        RoPE variant transformers implements (llama3, linear, yarn...) is reproduced exactly."""
        rotary = hf_model.model.rotary_emb
        pos = torch.arange(max_seq)[None]
        probe = torch.zeros(1, dtype=torch.float32)
        with torch.no_grad():
            cos, sin = rotary(probe, pos)  # [1,S,D]
        self.rope_cos, self.rope_sin = cos[0].float(), sin[0].float()  # [S,D]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.dims.tie_embeddings:  # gather columns of the shared [C,V] matrix
            B, T = input_ids.shape
            cols = torch.index_select(self.lm_head_t, 1, input_ids.reshape(-1))  # [C,B*T]
            return cols.t().reshape(B, T, self.dims.hidden)
        emb = self.body.wte if self.spec.family == "gpt2" else self.body.embed_tokens
        return emb(input_ids)

    def step_context(self, position_ids: torch.Tensor) -> Step:
        rope = self.spec.positions == "rope"
        if self.attention == "gqa":
            last = position_ids[:, -1]  # [B]: total length - 1 per row
            half = self.dims.head_dim // 2  # HF tables are cat(freqs, freqs): GQA wants one half
            return Step(position_ids, gqa=True, seqlens_k=last.to(torch.int32),
                        total=(last.max() + 1).to(torch.int32),
                        cos_cache=self.rope_cos[:, :half] if rope else None,
                        sin_cache=self.rope_sin[:, :half] if rope else None)
        step = Step(position_ids, gqa=False, mask=attention_mask(position_ids, self.max_seq))
        if rope:  # RoPE rows for these positions, broadcast over heads: [B,1,T,D]
            step.cos = self.rope_cos[position_ids][:, None]
            step.sin = self.rope_sin[position_ids][:, None]
        return step

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                logits_index: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.embed(input_ids)  # [B,T,C]
        if self.spec.positions == "learned":
            x = x + self.body.wpe(position_ids)
        step = self.step_context(position_ids)
        new: list[torch.Tensor] = []
        present: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, k, v, pk, pv = block(x, past[2 * i], past[2 * i + 1], step)
            new += [k, v] if k is not None else []
            present += [pk, pv] if pk is not None else []
        # Logits only where asked ([K] step-relative indices): the last position for a prefill,
        # all of them for perplexity. The LM head is a quarter of SmolLM2's prefill FLOPs.
        h = torch.index_select(self.final_norm(x), 1, logits_index)  # [B,K,C]
        logits = torch.matmul(h, self.lm_head_t)  # [B,K,V]
        return (logits, *new, *present)
