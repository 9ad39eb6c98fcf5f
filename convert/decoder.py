"""Decoder modules written for export under the static-KV contract (toolkit/contract.py).

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


# --- llama family: llama, mistral, qwen2 ----------------------------------------------------
class LlamaAttention(nn.Module):
    def __init__(self, d: ModelDims, qkv_bias: bool, out_bias: bool) -> None:
        super().__init__()
        self.d = d
        self.q_proj = nn.Linear(d.hidden, d.heads * d.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(d.hidden, d.kv_heads * d.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d.hidden, d.kv_heads * d.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(d.heads * d.head_dim, d.hidden, bias=out_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        d = self.d
        q = self.q_proj(x).view(B, T, d.heads, d.head_dim).transpose(1, 2)  # [B,H,T,D]
        k = self.k_proj(x).view(B, T, d.kv_heads, d.head_dim).transpose(1, 2)  # [B,Hkv,T,D]
        v = self.v_proj(x).view(B, T, d.kv_heads, d.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin  # cos/sin [B,1,T,D]
        k = k * cos + rotate_half(k) * sin
        out = static_attention(q, k, v, past_k, past_v, mask)
        return self.o_proj(out), k, v


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

    def forward(self, x: torch.Tensor, pos: tuple[torch.Tensor, torch.Tensor], past_k: torch.Tensor,
                past_v: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, k, v = self.self_attn(self.input_layernorm(x), *pos, past_k, past_v, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


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
                mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, C = x.shape
        d = self.d
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, d.heads, d.head_dim).transpose(1, 2) for t in (q, k, v))
        out = static_attention(q, k, v, past_k, past_v, mask)
        return self.c_proj(out), k, v


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

    def forward(self, x: torch.Tensor, pos: Any, past_k: torch.Tensor, past_v: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, k, v = self.attn(self.ln_1(x), past_k, past_v, mask)
        x = x + h
        return x + self.mlp(self.ln_2(x)), k, v


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
    """forward(input_ids, position_ids, past_key.0, past_value.0, ...) ->
    (logits, new_key.0, new_value.0, ...), exactly the static-kv-v1 contract."""

    def __init__(self, spec: ArchSpec, dims: ModelDims, config: Any, max_seq: int) -> None:
        super().__init__()
        self.spec, self.dims, self.max_seq = spec, dims, max_seq
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
    def from_hf(cls, spec: ArchSpec, dims: ModelDims, hf_model: Any, max_seq: int) -> StaticKVDecoder:
        """Copy the weights of a transformers model; every tensor must map (strict)."""
        m = cls(spec, dims, hf_model.config, max_seq)
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

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.embed(input_ids)  # [B,T,C]
        pos: Any = None
        if self.spec.positions == "learned":
            x = x + self.body.wpe(position_ids)
        else:  # RoPE rows for these positions, broadcast over heads: [B,1,T,D]
            pos = (self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None])
        mask = attention_mask(position_ids, self.max_seq)
        new: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, pos, past[2 * i], past[2 * i + 1], mask)
            new += [k, v]
        logits = torch.matmul(self.final_norm(x), self.lm_head_t)  # [B,T,V]
        return (logits, *new)
