"""The decoder of the three families (OPT, GPT-NeoX, LLaMA) for one pipeline stage and one tp shard.

Plain torch; the family switches are few: learned positions (OPT) or rotary (GPT-NeoX on part of
each head, LLaMA on all of it); LayerNorm or RMSNorm; sequential residual (OPT, LLaMA) or the
parallel attention + MLP residual (GPT-NeoX); ReLU/GELU MLP or SwiGLU. Attention reads K/V from
the paged cache through each request's block table (batch.Batch lists the requests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spotserve.engine.batch import Batch
from spotserve.engine.kv_cache import KVCache
from spotserve.engine.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                     VocabParallelEmbedding)
from spotserve.models import hf, sharding
from spotserve.models.spec import ModelSpec

# Per-layer HF names (relative to hf.layer_prefix) of each role.
_NAMES = {
    "opt": dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
                ln1="self_attn_layer_norm", ln2="final_layer_norm", up="fc1", down="fc2"),
    "gpt_neox": dict(qkv="attention.query_key_value", o="attention.dense", ln1="input_layernorm",
                     ln2="post_attention_layernorm", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"),
    "llama": dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                  ln1="input_layernorm", ln2="post_attention_layernorm", gate="mlp.gate_proj",
                  up="mlp.up_proj", down="mlp.down_proj"),
}


def activation(name: str):
    """The elementwise activation HF names `name`; raises ValueError for an unknown one."""
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unsupported activation {name!r}")


class Norm(nn.Module):
    """LayerNorm (weight + bias) or LLaMA's RMSNorm (weight only, computed in fp32)."""

    def __init__(self, spec: ModelSpec, weights: dict, prefix: str):
        super().__init__()
        self.rms = spec.norm == "rmsnorm"
        self.eps = spec.norm_eps
        self.weight = nn.Parameter(weights[prefix + ".weight"], requires_grad=False)
        self.bias = None if self.rms else nn.Parameter(weights[prefix + ".bias"], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) on the first cos.shape[-1] dims of each head.

    x: [tokens, heads, head_dim]; cos, sin: [tokens, rotary_dim].
    """
    rd = cos.shape[-1]
    xr, xp = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos[:, None] + rotated * sin[:, None]
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


class DecoderLayer(nn.Module):
    """One decoder layer of any family, tensor-parallel over `comm`."""

    def __init__(self, spec: ModelSpec, index: int, weights: dict, comm):
        super().__init__()
        self.spec = spec
        self.comm = comm
        n = {role: hf.layer_prefix(spec, index) + rel for role, rel in _NAMES[spec.family].items()}
        bias = spec.has_bias
        self.ln1 = Norm(spec, weights, n["ln1"])
        self.ln2 = Norm(spec, weights, n["ln2"])
        if "qkv" in n:
            self.qkv = ColumnParallelLinear(spec, weights, n["qkv"], comm, bias)
        else:
            self.q = ColumnParallelLinear(spec, weights, n["q"], comm, bias)
            self.k = ColumnParallelLinear(spec, weights, n["k"], comm, bias)
            self.v = ColumnParallelLinear(spec, weights, n["v"], comm, bias)
        self.o = RowParallelLinear(spec, weights, n["o"], comm, bias)
        self.gate = ColumnParallelLinear(spec, weights, n["gate"], comm, bias) if "gate" in n else None
        self.up = ColumnParallelLinear(spec, weights, n["up"], comm, bias)
        self.down = RowParallelLinear(spec, weights, n["down"], comm, bias)
        self.act = activation(spec.activation)
        self.heads = spec.num_heads // comm.size
        self.kv_heads = spec.kv_heads // comm.size
        self.scale = spec.head_dim ** -0.5

    def attention(self, x: torch.Tensor, batch: Batch, cache: KVCache, layer: int) -> torch.Tensor:
        """Self-attention of the batch's new tokens over their cached prefixes; returns [tokens, local heads*D]."""
        t, d = x.shape[0], self.spec.head_dim
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).view(t, self.heads, 3, d).unbind(2)  # GPT-NeoX: [heads, 3, head_dim]
        else:
            q = self.q(x).view(t, self.heads, d)
            k = self.k(x).view(t, self.kv_heads, d)
            v = self.v(x).view(t, self.kv_heads, d)
        if batch.cos is not None:
            q, k = rotate(q, batch.cos, batch.sin), rotate(k, batch.cos, batch.sin)
        cache.write(layer, k, v, batch.slot_blocks, batch.slot_offsets)
        out = torch.empty(t, self.heads, d, dtype=x.dtype, device=x.device)
        group = self.heads // self.kv_heads
        for r in batch.requests:
            keys, values = cache.read(layer, r.table, r.start + r.length)  # [kv_heads, ctx, D]
            if group > 1:
                keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            qr = q[r.offset:r.offset + r.length].transpose(0, 1)  # [heads, length, D]
            mask = r.mask
            o = F.scaled_dot_product_attention(qr, keys.to(qr.dtype), values.to(qr.dtype), attn_mask=mask,
                                               scale=self.scale)
            out[r.offset:r.offset + r.length] = o.transpose(0, 1)
        return out.reshape(t, self.heads * d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return h

    def forward(self, h: torch.Tensor, batch: Batch, cache: KVCache, layer: int) -> torch.Tensor:
        if self.spec.family == "gpt_neox":
            # Parallel residual: both branches read h; one all-reduce sums both partial outputs.
            partial = self.o(self.attention(self.ln1(h), batch, cache, layer), reduce=False)
            partial = partial + self.down(self.mlp(self.ln2(h)), reduce=False)
            return h + self.comm.all_reduce(partial) + self.o.bias + self.down.bias
        h = h + self.o(self.attention(self.ln1(h), batch, cache, layer))
        return h + self.down(self.mlp(self.ln2(h)))


class StageModel(nn.Module):
    """The layers of pipeline stage `stage` of `pp` (+ embeddings on the first, norm + LM head on the last)."""

    def __init__(self, spec: ModelSpec, pp: int, stage: int, weights: dict, comm):
        super().__init__()
        self.spec = spec
        self.layer_ids = sharding.stage_layers(spec.num_layers, pp, stage)
        self.first, self.last = stage == 0, stage == pp - 1
        self.layers = nn.ModuleList(DecoderLayer(spec, i, weights, comm) for i in self.layer_ids)
        if self.first:
            self.embed = VocabParallelEmbedding(spec, weights, hf.token_embedding_name(spec), comm)
            pos = "model.decoder.embed_positions.weight"
            self.positions = nn.Parameter(weights[pos], requires_grad=False) if spec.family == "opt" else None
        if self.last:
            self.final_norm = Norm(spec, weights, hf.final_norm_names(spec)[0].rsplit(".", 1)[0])
            self.lm_head = ParallelLMHead(spec, weights, hf.head_source(spec), comm)
        if spec.rotary:
            rd = int(spec.head_dim * spec.rotary_pct)
            inv = 1.0 / (spec.rotary_base ** (torch.arange(0, rd, 2, dtype=torch.int64).float() / rd))
            self.register_buffer("inv_freq", inv, persistent=False)
        else:
            self.inv_freq = None

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """cos, sin [tokens, rotary_dim] for the positions (None, None without rotary)."""
        if self.inv_freq is None:
            return None, None
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [tokens, hidden] entering the first layer."""
        h = self.embed(ids)
        if self.positions is not None:
            h = h + F.embedding(positions + 2, self.positions)  # OPT's learned positions start at offset 2
        return h

    def forward(self, h: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        for local, layer in enumerate(self.layers):
            h = layer(h, batch, cache, local)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits [n, vocab] of the hidden states of the tokens that get a next token."""
        return self.lm_head(self.final_norm(h))
