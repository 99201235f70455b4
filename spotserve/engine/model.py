"""The decoder of the three families (OPT, GPT-NeoX, LLaMA) for one pipeline stage and one tp shard.

The family switches are few: learned positions (OPT) or rotary (GPT-NeoX on part of each head,
LLaMA on all of it); LayerNorm or RMSNorm; sequential residual (OPT, LLaMA) or the parallel
attention + MLP residual (GPT-NeoX); ReLU/GELU MLP or SwiGLU. Matrix products go to cuBLAS
(through F.linear); the memory-bound steps between them are spotserve.ops kernels (native CUDA on
the GPU, their C++ twins on the CPU): residual add + norm in one pass, rotary in place, bias +
activation in one pass, KV cache write and paged decode attention (engine/attention.py).

Residual stream: each layer returns its output `x` without adding it; the next layer's first
norm adds it into `residual` and normalises in the same pass (ops.fused_add_*_norm), so the
stream is read and written once per norm instead of three times. q/k/v (and LLaMA's gate/up)
are fused into one projection at load time: one GEMM, q/k/v are strided views of its output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spotserve import ops
from spotserve.engine.attention import attend
from spotserve.engine.batch import Batch
from spotserve.engine.kv_cache import KVCache
from spotserve.engine.layers import (ColumnParallelLinear, ParallelLMHead, RowParallelLinear,
                                     VocabParallelEmbedding, linear)
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
# HF activation names -> spotserve.ops.bias_act names.
_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu", "swish": "silu"}


def activation_op(name: str) -> str:
    """The bias_act activation computing HF's `name`; raises ValueError for an unknown one."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}")
    return _ACTIVATIONS[name]


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


class Norm(nn.Module):
    """LayerNorm (weight + bias) or LLaMA's RMSNorm (weight only, statistics in fp32)."""

    def __init__(self, spec: ModelSpec, weights: dict, prefix: str):
        super().__init__()
        self.rms = spec.norm == "rmsnorm"
        self.eps = spec.norm_eps
        self.weight = _frozen(weights[prefix + ".weight"])
        self.bias = None if self.rms else _frozen(weights[prefix + ".bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_norm(self, x: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
        """residual += x, then the norm of residual, written over x (one pass); x None: just the norm."""
        if x is None:
            return self(residual)
        if self.rms:
            ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        else:
            ops.fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)
        return x


class Rotary(nn.Module):
    """Rotary embedding on the first rotary_dim dims of each head, applied in place from a cos/sin table."""

    def __init__(self, spec: ModelSpec, device):
        super().__init__()
        self.rotary_dim = int(spec.head_dim * spec.rotary_pct)
        table = ops.rotary_cos_sin_cache(spec.max_positions, self.rotary_dim, spec.rotary_base, device=device)
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> None:
        ops.rotary_embedding(q, k, positions, self.cos_sin, self.rotary_dim)


class QKVProjection(nn.Module):
    """The q, k and v projections as one column-parallel GEMM whose output is [q | k | v]."""

    def __init__(self, spec: ModelSpec, weights: dict, names: dict, comm, bias: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = spec.num_heads // comm.size, spec.kv_heads // comm.size, spec.head_dim
        if "qkv" in names:
            # GPT-NeoX stores rows as [heads, 3, head_dim]; reorder them to [3, heads, head_dim].
            fused = ColumnParallelLinear(spec, weights, names["qkv"], comm, bias)
            order = lambda t: t.unflatten(0, (self.heads, 3, -1)).transpose(0, 1).flatten(0, 2).contiguous()  # noqa: E731
            w, b = order(fused.weight), (order(fused.bias) if bias else None)
        else:
            parts = [ColumnParallelLinear(spec, weights, names[r], comm, bias) for r in "qkv"]
            w = torch.cat([p.weight for p in parts])
            b = torch.cat([p.bias for p in parts]) if bias else None
        self.weight, self.bias = _frozen(w), _frozen(b)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [t, heads, D], k and v [t, kv_heads, D]: strided views into one [t, (heads + 2 kv_heads) D] output."""
        t, d = x.shape[0], self.head_dim
        y = linear(x, self.weight, self.bias)
        q, k, v = y.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=1)
        return q.view(t, self.heads, d), k.view(t, self.kv_heads, d), v.view(t, self.kv_heads, d)


class MLP(nn.Module):
    """up (+ gate) projection, bias + activation in one pass, down projection (row-parallel, not applied here)."""

    def __init__(self, spec: ModelSpec, weights: dict, names: dict, comm, bias: bool):
        super().__init__()
        self.act = "swiglu" if "gate" in names else activation_op(spec.activation)
        roles = ["gate", "up"] if "gate" in names else ["up"]
        parts = [ColumnParallelLinear(spec, weights, names[r], comm, bias) for r in roles]
        self.weight = _frozen(torch.cat([p.weight for p in parts]) if len(parts) > 1 else parts[0].weight)
        self.bias = _frozen(torch.cat([p.bias for p in parts]) if len(parts) > 1 and bias else parts[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act == "swiglu":
            y = linear(x, self.weight)
            out = torch.empty(x.shape[0], y.shape[1] // 2, dtype=x.dtype, device=x.device)
            ops.bias_act(out, y, self.bias, "swiglu")
            return out
        if x.is_cuda and x.shape[0] > ops.SKINNY_MAX_ROWS and self.bias is not None and self.act in ("relu", "gelu_tanh"):
            # Bias and activation in the cuBLASLt epilogue: no extra pass over the [t, ffn] output.
            return torch._addmm_activation(self.bias, x, self.weight.t(), use_gelu=self.act == "gelu_tanh")
        y = linear(x, self.weight)
        ops.bias_act(y, y, self.bias, self.act)
        return y


class DecoderLayer(nn.Module):
    """One decoder layer of any family, tensor-parallel over `comm`."""

    def __init__(self, spec: ModelSpec, index: int, weights: dict, comm, rotary: Rotary | None):
        super().__init__()
        self.spec = spec
        self.comm = comm
        n = {role: hf.layer_prefix(spec, index) + rel for role, rel in _NAMES[spec.family].items()}
        bias = spec.has_bias
        self.parallel = spec.family == "gpt_neox"
        self.ln1 = Norm(spec, weights, n["ln1"])
        self.ln2 = Norm(spec, weights, n["ln2"])
        self.qkv = QKVProjection(spec, weights, n, comm, bias)
        self.o = RowParallelLinear(spec, weights, n["o"], comm, bias)
        self.mlp = MLP(spec, weights, n, comm, bias)
        self.down = RowParallelLinear(spec, weights, n["down"], comm, bias)
        self.rotary = rotary
        if self.parallel:
            # Both row-parallel biases are added once, after the single all-reduce.
            self.register_buffer("out_bias", self.o.bias + self.down.bias, persistent=False)
        self.scale = spec.head_dim ** -0.5

    def attention(self, h: torch.Tensor, batch: Batch, cache: KVCache, layer: int) -> torch.Tensor:
        """Self-attention of the batch's new tokens over their cached prefixes; returns [tokens, local heads*D]."""
        q, k, v = self.qkv(h)
        if self.rotary is not None:
            self.rotary(q, k, batch.positions)
        out = attend(q, k, v, batch, *cache.layer(layer), self.scale)
        return out.reshape(h.shape[0], -1)

    def forward(self, x: torch.Tensor | None, residual: torch.Tensor, batch: Batch, cache: KVCache,
                layer: int) -> torch.Tensor:
        """Add the previous layer's output x into residual (in place) and return this layer's output."""
        h = self.ln1.add_norm(x, residual)
        if self.parallel:
            # GPT-NeoX: residual + attn(ln1(residual)) + mlp(ln2(residual)), one all-reduce for both.
            mlp_in = self.ln2(residual)
            lone = self.comm.size == 1
            partial = linear(self.attention(h, batch, cache, layer), self.o.weight, self.out_bias if lone else None)
            partial = self.down.accumulate(partial, self.mlp(mlp_in))
            return partial if lone else self.comm.all_reduce(partial).add_(self.out_bias)
        h = self.ln2.add_norm(self.o(self.attention(h, batch, cache, layer)), residual)
        return self.down(self.mlp(h))


class StageModel(nn.Module):
    """The layers of pipeline stage `stage` of `pp` (+ embeddings on the first, norm + LM head on the last)."""

    def __init__(self, spec: ModelSpec, pp: int, stage: int, weights: dict, comm):
        super().__init__()
        self.spec = spec
        self.layer_ids = sharding.stage_layers(spec.num_layers, pp, stage)
        self.first, self.last = stage == 0, stage == pp - 1
        device = next(iter(weights.values())).device
        self.rotary = Rotary(spec, device) if spec.rotary else None
        self.layers = nn.ModuleList(DecoderLayer(spec, i, weights, comm, self.rotary) for i in self.layer_ids)
        if self.first:
            self.embed = VocabParallelEmbedding(spec, weights, hf.token_embedding_name(spec), comm)
            pos = "model.decoder.embed_positions.weight"
            self.positions = _frozen(weights[pos]) if spec.family == "opt" else None
        if self.last:
            self.final_norm = Norm(spec, weights, hf.final_norm_names(spec)[0].rsplit(".", 1)[0])
            self.lm_head = ParallelLMHead(spec, weights, hf.head_source(spec), comm)

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [tokens, hidden] entering the first layer."""
        h = self.embed(ids)
        if self.positions is not None:
            h += F.embedding(positions + 2, self.positions)  # OPT's learned positions start at offset 2
        return h

    def forward(self, h: torch.Tensor, batch: Batch, cache: KVCache) -> torch.Tensor:
        """Run this stage's layers over h [tokens, hidden] (updated in place as the residual stream)."""
        return h.add_(self.run_layers(None, h, batch, cache, 0, len(self.layers)))

    def run_layers(self, x: torch.Tensor | None, h: torch.Tensor, batch: Batch, cache: KVCache, start: int,
                   stop: int) -> torch.Tensor:
        """Local layers start..stop-1 over residual h (in place) and pending output x; returns the new x."""
        for local in range(start, stop):
            x = self.layers[local](x, h, batch, cache, local)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits [n, vocab] of the hidden states of the tokens that get a next token."""
        return self.lm_head(self.final_norm(h))
