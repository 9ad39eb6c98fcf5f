"""Decoder modules written for export under the static-KV contract (bundle/contract.py).

The weights are the Hugging Face model's own: module names come from the spec's `Layout`, so
the state dict maps one to one and `load_state_dict(strict=True)` proves nothing was dropped.
Only attention is ours, because it must read a fixed-capacity cache it does not own and return
the new keys/values instead of a grown cache. What differs between families (norm kind and
placement, q/k norms, gating, scalars, soft-caps, windows, partial or absent RoPE) is read from
`ArchParams` (models/params.py); no code here names a family.

Two attention forms:
  static  plain ONNX ops (MatMul, Gather, Softmax, Where, Concat, Less/LessOrEqual, Tanh, basic
          arithmetic), all in TensorRT 10.3's ONNX parser and in ONNX Runtime: Jetson bundles.
  gqa     ONNX Runtime's fused com.microsoft.GroupQueryAttention (in-place cache, reads only the
          valid prefix; takes scale, softcap, local window and full-width RoPE): CPU bundles.
          What it cannot express (partial RoPE) is done in plain ops before it, per layer.

Shapes: B batch, T tokens this step, S max_seq (static), H query heads, Hkv kv heads,
G = H / Hkv, D head_dim, R rotary dims (<= D), C hidden, W sliding window.

    input_ids [B,T] ──embed──► x [B,T,C] ──► N × block ──► norm ──► lm_head ──► logits [B,T,V]
    position_ids [B,T] ─► RoPE rows (or learned positions), and the attention mask:
        past  key j   visible iff j < position_ids[b, 0]                   (valid prefix)
        new   key t'  visible iff position_ids[b, t'] <= position_ids[b, t]   (causal)
        and, in a sliding layer, iff position_ids[b, t] - key position < W
    block i:  past_key.{i} [B,Hkv,S,D] ─┐
              k_new [B,Hkv,T,D] ────────┴► concat [B,Hkv,S+T,D] ─► attention ─► new_key.{i}=k_new
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.arch import ArchSpec
from models.dims import ModelDims
from models.params import ArchParams, LayerPlan, resolve

# Added to masked scores. Finite so that fp16 conversion saturates to -inf instead of NaN, and a
# query always sees at least itself, so no row of the softmax is all-masked.
MASKED = -1e9


def attention_mask(position_ids: torch.Tensor, max_seq: int, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, S+T]: which of (cache, new) keys each query may attend to."""
    q = position_ids[:, :, None]  # [B,T,1]
    past_len = position_ids[:, :1, None]  # [B,1,1]
    cache_idx = torch.arange(max_seq, dtype=position_ids.dtype, device=position_ids.device)
    past = cache_idx[None, None, :] < past_len  # [B,1,S]
    new = position_ids[:, None, :] <= q  # [B,T,T]: key t' <= query t
    if window is None:
        past = past.expand(-1, position_ids.shape[1], -1)  # [B,T,S]
    else:  # keys more than W-1 positions back are out of the window
        past = past & (cache_idx[None, None, :] > q - window)  # [B,T,S]
        new = new & (position_ids[:, None, :] > q - window)
    return torch.cat([past, new], dim=2)[:, None]  # [B,1,T,S+T]


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     past_k: torch.Tensor, past_v: torch.Tensor, mask: torch.Tensor,
                     scale: float, softcap: float | None = None) -> torch.Tensor:
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
    scores = torch.matmul(qg, keys.transpose(2, 3)) * scale  # [B,Hkv,G*T,S+T]
    if softcap is not None:  # Gemma 2: cap * tanh(scores / cap), before the mask
        scores = torch.tanh(scores * (1.0 / softcap)) * softcap
    rows = mask.repeat(1, 1, G, 1)  # [B,1,G*T,S+T]: row g*T + t uses query t's mask
    scores = torch.where(rows, scores, torch.full_like(scores, MASKED))
    out = torch.matmul(torch.softmax(scores, dim=-1), vals)  # [B,Hkv,G*T,D]
    return out.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


@dataclass(frozen=True)
class GQASettings:
    """The attributes of one GroupQueryAttention node."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    softcap: float | None = None
    window: int | None = None  # HF: q - k < W visible; the same as local_window_size = W (tested)


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
                past_k: torch.Tensor, past_v: torch.Tensor, seqlens_k: torch.Tensor,
                total: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                s: GQASettings, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = q.shape
        D = s.head_dim
        if k is None or v is None:  # packed QKV [B,T,(H+2Hkv)*D]
            q, k, v = q.split([s.heads * D, s.kv_heads * D, s.kv_heads * D], dim=2)
        q = q.view(B, T, s.heads, D).transpose(1, 2)
        k = k.view(B, T, s.kv_heads, D).transpose(1, 2)
        v = v.view(B, T, s.kv_heads, D).transpose(1, 2)
        if cos is not None and sin is not None:
            c = torch.cat([cos, cos], -1)[position_ids][:, None]
            s_ = torch.cat([sin, sin], -1)[position_ids][:, None]
            q, k = q * c + rotate_half(q) * s_, k * c + rotate_half(k) * s_
        mask = attention_mask(position_ids, past_k.shape[2], s.window)
        out = static_attention(q, k, v, past_k, past_v, mask, s.scale, s.softcap)
        present_k, present_v = past_k.clone(), past_v.clone()
        for b in range(B):
            p0 = int(position_ids[b, 0])
            present_k[b, :, p0:p0 + T], present_v[b, :, p0:p0 + T] = k[b], v[b]
        return out, present_k, present_v

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, past_k: Any, past_v: Any, seqlens_k: Any,
                 total: Any, cos: Any, sin: Any, s: GQASettings, position_ids: Any) -> Any:
        rotary = cos is not None and not (hasattr(cos, "node") and cos.node().mustBeNone())
        if k is None:  # packed QKV: key and value are absent optional inputs ("" in ONNX)
            k = v = g.op("prim::Constant")
            k.setType(torch._C.OptionalType.ofTensor())  # a typed None becomes "" on export
        inputs = [q, k, v, past_k, past_v, seqlens_k, total] + ([cos, sin] if rotary else [])
        extra: dict[str, Any] = {}
        if s.softcap is not None:
            extra["softcap_f"] = s.softcap
        if s.window is not None:
            extra["local_window_size_i"] = s.window
        out, present_k, present_v = g.op("com.microsoft::GroupQueryAttention", *inputs,
                                         num_heads_i=s.heads, kv_num_heads_i=s.kv_heads,
                                         do_rotary_i=int(rotary), scale_f=s.scale, **extra,
                                         outputs=3)
        # the exporter's shape inference has no rule for a contrib op: without these types it
        # warns once per node on stderr (90 lines for SmolLM2) and leaves the outputs untyped
        present_k.setType(past_k.type())
        present_v.setType(past_v.type())
        sizes = q.type().varyingSizes()  # [B, T, H*D] (packed: [B, T, (H+2Hkv)*D])
        if sizes:  # a traced q always has its rank; an untyped one leaves out untyped
            out.setType(q.type().with_sizes([*sizes[:-1], s.heads * s.head_dim]))
        return out, present_k, present_v


def gqa_supported(dims: ModelDims) -> bool:
    return dims.head_dim % 16 == 0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,*,T,D], cos/sin [B,1,T,R]: rotate the leading R dims (partial rotary: R < D)."""
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :R], x[..., R:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)


class RMSNorm(nn.Module):
    """y = w * x_hat, or (1 + w) * x_hat with `plus_one` (Gemma stores w around 0)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.plus_one = eps, plus_one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = 1.0 + self.weight if self.plus_one else self.weight
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps)
    return RMSNorm(dim, eps, plus_one=kind == "rms1")


class Conv1D(nn.Module):
    """GPT-2's linear layer: W stored [in, out], y = x @ W + b."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.weight) + self.bias


def make_linear(p: ArchParams, n_in: int, n_out: int, bias: bool) -> nn.Module:
    return Conv1D(n_in, n_out) if p.spec.layout.conv1d else nn.Linear(n_in, n_out, bias=bias)


ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
       "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class Step:
    """What every layer needs to know about this step, computed once per forward."""

    position_ids: torch.Tensor  # [B,T]
    gqa: bool
    max_seq: int
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]]  # rope kind -> cos, sin [S,R]
    seqlens_k: torch.Tensor | None = None  # gqa: [B] int32, total length - 1 per row
    total: torch.Tensor | None = None  # gqa: scalar int32, longest total length
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:  # [B,1,T,S+T], one per window size
        if window not in self._masks:
            self._masks[window] = attention_mask(self.position_ids, self.max_seq, window)
        return self._masks[window]

    def rows(self, rope: str) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE rows for these positions, broadcast over heads: cos, sin [B,1,T,R]."""
        if rope not in self._rows:
            cos, sin = self.tables[rope]
            self._rows[rope] = cos[self.position_ids][:, None], sin[self.position_ids][:, None]
        return self._rows[rope]

    def cache(self, rope: str) -> tuple[torch.Tensor, torch.Tensor]:
        """GQA's cos/sin caches [S,R/2]: HF tables are cat(freqs, freqs), GQA wants one half."""
        cos, sin = self.tables[rope]
        half = cos.shape[-1] // 2
        return cos[:, :half], sin[:, :half]


class Attention(nn.Module):
    """Projections named as the checkpoint names them; q/k norms where the family has them."""

    def __init__(self, d: ModelDims, p: ArchParams, layer: LayerPlan) -> None:
        super().__init__()
        self.d, self.p, self.layer = d, p, layer
        lay = p.spec.layout
        sizes = [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
        self.qkv_names = lay.qkv
        if len(lay.qkv) == 1:
            self.add_module(lay.qkv[0], make_linear(p, d.hidden, sum(sizes), p.qkv_bias))
        else:
            for name, size in zip(lay.qkv, sizes):
                self.add_module(name, make_linear(p, d.hidden, size, p.qkv_bias))
        self.out_name = lay.out
        self.add_module(lay.out, make_linear(p, d.heads * d.head_dim, d.hidden, p.out_bias))
        qk = p.spec.qk_norm
        if qk:  # "head": over D, shared by the heads; "all": over the whole projection
            q_dim, k_dim = (d.head_dim, d.head_dim) if qk == "head" else (sizes[0], sizes[1])
            self.q_norm = make_norm(p.spec.norm, q_dim, d.norm_eps)
            self.k_norm = make_norm(p.spec.norm, k_dim, d.norm_eps)
        self.sizes = sizes

    def pack_qkv(self) -> None:
        """One [C, (H+2Hkv)*D] MatMul instead of three: a decode step is three GEMVs fewer
        kernel calls, and GroupQueryAttention takes the packed result as it is."""
        if len(self.qkv_names) == 1:
            return
        q, k, v = (getattr(self, n) for n in self.qkv_names)
        packed = nn.Linear(q.in_features, q.out_features + k.out_features + v.out_features,
                           bias=q.bias is not None)
        packed.weight.data = torch.cat([q.weight, k.weight, v.weight]).detach()
        if q.bias is not None:
            packed.bias.data = torch.cat([q.bias, k.bias, v.bias]).detach()
        for n in self.qkv_names:
            delattr(self, n)
        self.qkv_names = ("qkv_packed",)
        self.qkv_packed = packed

    def project(self, x: torch.Tensor, gqa: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [B,T,C] -> q [B,T,H*D], k, v [B,T,Hkv*D]; (packed, None, None) when the fused
        op can take the packed projection as it is."""
        if len(self.qkv_names) == 1:
            qkv = getattr(self, self.qkv_names[0])(x)
            if gqa and self.gqa_takes_packed:
                return qkv, None, None
            q, k, v = qkv.split(self.sizes, dim=2)
        else:
            q, k, v = (getattr(self, n)(x) for n in self.qkv_names)
        if self.p.spec.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.p.spec.qk_norm == "head":
            B, T, _ = q.shape
            q = self.q_norm(q.view(B, T, -1, self.d.head_dim)).reshape(B, T, -1)
            k = self.k_norm(k.view(B, T, -1, self.d.head_dim)).reshape(B, T, -1)
        return q, k, v

    @property
    def rope_in_gqa(self) -> bool:
        """GroupQueryAttention rotates the full head width only; partial RoPE stays outside."""
        return self.layer.rope is not None and self.p.rotary_dim == self.d.head_dim

    @property
    def gqa_takes_packed(self) -> bool:
        return not self.p.spec.qk_norm and (self.layer.rope is None or self.rope_in_gqa)

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                step: Step) -> tuple[Any, ...]:
        """-> (out [B,T,C], new_k, new_v [B,Hkv,T,D], present_k, present_v [B,Hkv,S,D]):
        new_* for the static form (the host writes them), present_* for the in-place form
        (the cache after this step); the other pair is None."""
        d, layer = self.d, self.layer
        q, k, v = self.project(x, step.gqa)
        B, T, _ = q.shape
        if step.gqa:
            cos = sin = None
            if layer.rope is not None and self.rope_in_gqa:
                cos, sin = step.cache(layer.rope)
            elif layer.rope is not None:  # partial rotary: rotate here, in plain ops
                assert k is not None
                c, s_ = step.rows(layer.rope)
                q = apply_rope(q.view(B, T, d.heads, d.head_dim).transpose(1, 2), c, s_)
                k = apply_rope(k.view(B, T, d.kv_heads, d.head_dim).transpose(1, 2), c, s_)
                q = q.transpose(1, 2).reshape(B, T, -1)
                k = k.transpose(1, 2).reshape(B, T, -1)
            settings = GQASettings(d.heads, d.kv_heads, d.head_dim, layer.attn_scale,
                                   self.p.attn_softcap, layer.window)
            out, pk, pv = GroupQueryAttention.apply(q, k, v, past_k, past_v, step.seqlens_k,
                                                    step.total, cos, sin, settings,
                                                    step.position_ids)
            return getattr(self, self.out_name)(out), None, None, pk, pv
        assert k is not None and v is not None
        qh = q.view(B, T, d.heads, d.head_dim).transpose(1, 2)  # [B,H,T,D]
        kh = k.view(B, T, d.kv_heads, d.head_dim).transpose(1, 2)  # [B,Hkv,T,D]
        vh = v.view(B, T, d.kv_heads, d.head_dim).transpose(1, 2)
        if layer.rope is not None:
            c, s_ = step.rows(layer.rope)
            qh, kh = apply_rope(qh, c, s_), apply_rope(kh, c, s_)
        out = static_attention(qh, kh, vh, past_k, past_v, step.mask(layer.window),
                               layer.attn_scale, self.p.attn_softcap)
        return getattr(self, self.out_name)(out), kh, vh, None, None


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)) (gate and up split, or one fused [gate; up] matrix);
    plain: down(act(fc1(x)))."""

    def __init__(self, d: ModelDims, p: ArchParams) -> None:
        super().__init__()
        lay = p.spec.layout
        self.gated, self.act = lay.gated, ACT[p.act]
        self.in_names, self.out_name = lay.mlp_in, lay.mlp_out
        self.intermediate = d.intermediate
        width = 2 * d.intermediate if lay.gated and len(lay.mlp_in) == 1 else d.intermediate
        for name in lay.mlp_in:
            self.add_module(name, make_linear(p, d.hidden, width, p.mlp_bias))
        self.add_module(lay.mlp_out, make_linear(p, d.intermediate, d.hidden, p.mlp_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = getattr(self, self.out_name)
        if not self.gated:
            return down(self.act(getattr(self, self.in_names[0])(x)))
        if len(self.in_names) == 1:
            # a constant split (one Split node); chunk(2) exported the halves' bounds as
            # Shape/Gather/Div ops computed every step
            gate, up = getattr(self, self.in_names[0])(x).split(self.intermediate, dim=-1)
        else:
            gate, up = (getattr(self, n)(x) for n in self.in_names)
        return down(self.act(gate) * up)


class Block(nn.Module):
    """One layer: norms placed as the spec's BlockNorms name them; sequential or parallel."""

    def __init__(self, d: ModelDims, p: ArchParams, layer: LayerPlan) -> None:
        super().__init__()
        lay, self.p = p.spec.layout, p
        self.add_module(lay.attn, Attention(d, p, layer))
        self.add_module(lay.mlp, MLP(d, p))
        self.attn_name, self.mlp_name = lay.attn, lay.mlp
        norms = lay.norms
        names = [norms.pre_attn, norms.post_attn, norms.post_mlp]
        names += [] if p.parallel else [norms.pre_mlp]  # a parallel block reuses pre_attn
        for name in names:
            if name:
                self.add_module(name, make_norm(p.spec.norm, d.hidden, d.norm_eps))
        self.norms = norms

    def _norm(self, name: str | None, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x) if name else x

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.p.residual_scale if self.p.residual_scale != 1.0 else x

    def forward(self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor,
                step: Step) -> tuple[torch.Tensor, ...]:
        n = self.norms
        h = self._norm(n.pre_attn, x)
        a, *kv = getattr(self, self.attn_name)(h, past_k, past_v, step)
        a = self._norm(n.post_attn, a)
        mlp = getattr(self, self.mlp_name)
        if self.p.parallel:  # phi-2: x + attn(ln(x)) + mlp(ln(x))
            return (x + self._scaled(a + self._norm(n.post_mlp, mlp(h))), *kv)
        x = x + self._scaled(a)
        m = self._norm(n.post_mlp, mlp(self._norm(n.pre_mlp, x)))
        return (x + self._scaled(m), *kv)


class Body(nn.Module):
    """The checkpoint's body (`model.*`, `transformer.*`): embeddings, layers, final norm."""

    def __init__(self, d: ModelDims, p: ArchParams) -> None:
        super().__init__()
        lay = p.spec.layout
        self.add_module(lay.embed, nn.Embedding(d.vocab_size, d.hidden))
        if lay.positions:
            self.add_module(lay.positions, nn.Embedding(d.max_positions, d.hidden))
        self.add_module(lay.layers, nn.ModuleList(Block(d, p, layer) for layer in p.layers))
        self.add_module(lay.final_norm, make_norm(p.spec.norm, d.hidden, d.norm_eps))


def attention_summary(p: ArchParams, d: ModelDims, attention: str) -> str:
    """One line for the manifest: how attention is expressed, and what the fused operator
    could not take (done in plain ops beside it)."""
    layers = p.layers
    sliding = [i for i, layer in enumerate(layers) if layer.window]
    nope = [i for i, layer in enumerate(layers) if layer.rope is None]
    if attention == "gqa":
        parts = ["com.microsoft.GroupQueryAttention, cache updated in place"]
        if p.rotary_dim < d.head_dim and len(nope) < len(layers):
            parts.append(f"partial RoPE ({p.rotary_dim} of {d.head_dim} dims) applied in plain "
                         "ops before it (the operator rotates whole heads only)")
        elif len(nope) < len(layers):
            parts.append("RoPE inside it")
        window_how, cap_how = "local_window_size", "its softcap attribute"
    else:
        parts = ["plain ONNX ops (MatMul, Softmax, Where), new keys/values written by the host"]
        if len(nope) < len(layers):
            parts.append(f"RoPE on {p.rotary_dim} of {d.head_dim} dims")
        window_how, cap_how = "the mask", "Tanh"
    if sliding:
        parts.append(f"sliding window {p.window} on {len(sliding)} of {len(layers)} layers "
                     f"({window_how})")
    if nope and p.spec.positions == "rope":
        parts.append(f"no RoPE on layers {', '.join(map(str, nope))}")
    if p.attn_softcap is not None:
        parts.append(f"attention soft-cap {p.attn_softcap:g} ({cap_how})")
    if len({layer.rope for layer in layers} - {None}) > 1:
        parts.append("local and global RoPE tables")
    return "; ".join(parts)


# --- the exported wrapper ------------------------------------------------------------------
class StaticKVDecoder(nn.Module):
    """forward(input_ids, position_ids, logits_index, past_key.0, past_value.0, ...) ->
    (logits, new_key.0, new_value.0, ...) with attention="static", or
    (logits, present_key.0, present_value.0, ...) with attention="gqa" (in-place):
    the static-kv-v1 contract."""

    def __init__(self, spec: ArchSpec, dims: ModelDims, config: Any, max_seq: int,
                 attention: str = "static") -> None:
        super().__init__()
        self.p = resolve(spec, config, dims.num_layers, dims.head_dim)
        self.dims, self.max_seq, self.attention = dims, max_seq, attention
        lay = spec.layout
        self.body = Body(dims, self.p)
        self.blocks: nn.ModuleList = getattr(self.body, lay.layers)
        self.final_norm: nn.Module = getattr(self.body, lay.final_norm)
        self.embedding: nn.Embedding = getattr(self.body, lay.embed)
        self.positions: nn.Embedding | None = getattr(self.body, lay.positions) if lay.positions else None
        # The LM head is stored transposed, [C, V]. With tied embeddings the embedding lookup
        # gathers columns of that same tensor, so the graph holds one copy of the matrix
        # (a plain Gather + MatMul(W^T) would make the exporter fold a second, transposed copy).
        self.lm_head_t = nn.Parameter(torch.empty(dims.hidden, dims.vocab_size))
        self.lm_head_bias = nn.Parameter(torch.zeros(dims.vocab_size)) if lay.lm_head_bias else None
        # the RoPE kinds the layers use ("global", "local"); their tables are the buffers
        # rope_<kind>_cos / _sin that set_rope registers
        self.rope_kinds = sorted({layer.rope for layer in self.p.layers if layer.rope})

    @classmethod
    def from_hf(cls, spec: ArchSpec, dims: ModelDims, hf_model: Any, max_seq: int,
                attention: str = "static") -> StaticKVDecoder:
        """Copy the weights of a transformers model; every tensor must map (strict)."""
        m = cls(spec, dims, hf_model.config, max_seq, attention)
        state = hf_model.state_dict()
        prefix = spec.layout.body + "."
        body = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        body = {k: v for k, v in body.items() if not k.endswith(("rotary_emb.inv_freq", ".attn.bias",
                                                                  ".attn.masked_bias"))}
        m.body.load_state_dict(body, strict=True)
        head = state.get("lm_head.weight", m.embedding.weight)
        m.lm_head_t.data = head.detach().t().contiguous()
        if m.lm_head_bias is not None:
            m.lm_head_bias.data = state["lm_head.bias"].detach().clone()
        m.set_rope(hf_model, max_seq)
        if attention == "gqa":
            for block in m.blocks:
                getattr(block, spec.layout.attn).pack_qkv()
        return m.eval()

    def set_rope(self, hf_model: Any, max_seq: int) -> None:
        """cos/sin rows [S,R] for positions [0, max_seq) from the model's own rotary modules,
        so every RoPE variant transformers implements (llama3, linear, longrope, yarn, partial,
        attention scaling) is reproduced exactly; Gemma 3's sliding layers have their own."""
        modules = {"global": "rotary_emb", "local": self.p.spec.local_rotary}
        pos = torch.arange(max_seq)[None]
        probe = torch.zeros(1, dtype=torch.float32)
        body = getattr(hf_model, self.p.spec.layout.body)
        for kind in self.rope_kinds:
            with torch.no_grad():
                cos, sin = getattr(body, modules[kind] or "rotary_emb")(probe, pos)  # [1,S,R]
            self.register_buffer(f"rope_{kind}_cos", cos[0].float(), persistent=False)
            self.register_buffer(f"rope_{kind}_sin", sin[0].float(), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.dims.tie_embeddings:  # gather columns of the shared [C,V] matrix
            B, T = input_ids.shape
            cols = torch.index_select(self.lm_head_t, 1, input_ids.reshape(-1))  # [C,B*T]
            x = cols.t().reshape(B, T, self.dims.hidden)
        else:
            x = self.embedding(input_ids)
        return x * self.p.embed_scale if self.p.embed_scale != 1.0 else x

    def step_context(self, position_ids: torch.Tensor) -> Step:
        tables = {k: (getattr(self, f"rope_{k}_cos"), getattr(self, f"rope_{k}_sin"))
                  for k in self.rope_kinds}
        step = Step(position_ids, gqa=self.attention == "gqa", max_seq=self.max_seq, tables=tables)
        if step.gqa:
            last = position_ids[:, -1]  # [B]: total length - 1 per row
            step.seqlens_k = last.to(torch.int32)
            step.total = (last.max() + 1).to(torch.int32)
        return step

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                logits_index: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.embed(input_ids)  # [B,T,C]
        if self.positions is not None:
            x = x + self.positions(position_ids)
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
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias
        if self.p.logit_scale != 1.0:
            logits = logits * self.p.logit_scale
        if self.p.final_softcap is not None:  # Gemma 2: cap * tanh(logits / cap)
            logits = torch.tanh(logits * (1.0 / self.p.final_softcap)) * self.p.final_softcap
        return (logits, *new, *present)
