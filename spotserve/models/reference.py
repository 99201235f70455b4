"""A plain, unsharded forward pass of the three families over HF-named tensors: the yardstick for loader and engine.

Readable as the math, no cache, no parallelism; matches transformers' OPT / GPT-NeoX / LLaMA
(pre-norm, OPT's position offset 2, GPT-NeoX's fused [heads, 3, head_dim] qkv, partial rotary
and parallel residual, LLaMA's RMSNorm, SwiGLU and grouped kv heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spotserve.models import hf
from spotserve.models.spec import ModelSpec


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activation `name` (HF naming) applied to x; ValueError for an unknown name."""
    if name == "relu":
        return F.relu(x)
    if name == "silu":
        return F.silu(x)
    if name == "gelu":
        return F.gelu(x)
    if name in ("gelu_fast", "gelu_new", "gelu_pytorch_tanh"):
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {name!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotary_tables(spec: ModelSpec, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, rotary_dims] for `positions` (HF's half-split layout)."""
    dims = int(spec.head_dim * spec.rotary_pct)
    inv_freq = 1.0 / (spec.rotary_base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D] by position; the rest pass through."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, T, D] (kv heads repeated), causal.

    Returns [B, T, H * D].
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    t = q.shape[2]
    mask = torch.ones(t, t, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    out = probs @ v
    return out.transpose(1, 2).reshape(q.shape[0], t, -1)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)


def _opt_layer(spec, w, x):
    h = F.layer_norm(x, (spec.hidden,), w("self_attn_layer_norm.weight"), w("self_attn_layer_norm.bias"),
                     spec.norm_eps)
    q, k, v = (_heads(F.linear(h, w(f"self_attn.{p}_proj.weight"), w(f"self_attn.{p}_proj.bias")), spec.num_heads)
               for p in "qkv")
    x = x + F.linear(causal_attention(q, k, v), w("self_attn.out_proj.weight"), w("self_attn.out_proj.bias"))
    h = F.layer_norm(x, (spec.hidden,), w("final_layer_norm.weight"), w("final_layer_norm.bias"), spec.norm_eps)
    h = activation(spec.activation, F.linear(h, w("fc1.weight"), w("fc1.bias")))
    return x + F.linear(h, w("fc2.weight"), w("fc2.bias"))


def _neox_layer(spec, w, x, cos, sin):
    h = F.layer_norm(x, (spec.hidden,), w("input_layernorm.weight"), w("input_layernorm.bias"), spec.norm_eps)
    qkv = _heads(F.linear(h, w("attention.query_key_value.weight"), w("attention.query_key_value.bias")),
                 spec.num_heads)
    q, k, v = qkv.chunk(3, dim=-1)  # per head: [q | k | v], each head_dim wide
    attn = causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
    attn = F.linear(attn, w("attention.dense.weight"), w("attention.dense.bias"))
    m = F.layer_norm(x, (spec.hidden,), w("post_attention_layernorm.weight"), w("post_attention_layernorm.bias"),
                     spec.norm_eps)
    m = activation(spec.activation, F.linear(m, w("mlp.dense_h_to_4h.weight"), w("mlp.dense_h_to_4h.bias")))
    return x + attn + F.linear(m, w("mlp.dense_4h_to_h.weight"), w("mlp.dense_4h_to_h.bias"))


def _llama_layer(spec, w, x, cos, sin):
    h = rms_norm(x, w("input_layernorm.weight"), spec.norm_eps)
    q = _heads(F.linear(h, w("self_attn.q_proj.weight")), spec.num_heads)
    k = _heads(F.linear(h, w("self_attn.k_proj.weight")), spec.kv_heads)
    v = _heads(F.linear(h, w("self_attn.v_proj.weight")), spec.kv_heads)
    attn = causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
    x = x + F.linear(attn, w("self_attn.o_proj.weight"))
    h = rms_norm(x, w("post_attention_layernorm.weight"), spec.norm_eps)
    gate = activation(spec.activation, F.linear(h, w("mlp.gate_proj.weight")))
    return x + F.linear(gate * F.linear(h, w("mlp.up_proj.weight")), w("mlp.down_proj.weight"))


@torch.no_grad()
def reference_logits(spec: ModelSpec, tensors: dict[str, torch.Tensor], input_ids: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [B, T, vocab] (or [T, vocab] for 1-D input_ids) of the full model over a whole sequence.

    tensors: HF name -> full tensor (a tied LM head may be absent); computed in `dtype`.
    Raises KeyError naming a missing tensor.
    """
    squeeze = input_ids.dim() == 1
    ids = input_ids[None] if squeeze else input_ids
    t = ids.shape[1]

    def get(name: str) -> torch.Tensor:
        if name not in tensors:
            raise KeyError(f"reference_logits: tensor {name!r} missing")
        return tensors[name].to(dtype)

    x = get(hf.token_embedding_name(spec))[ids]
    positions = torch.arange(t)
    if spec.family == "opt":
        x = x + get("model.decoder.embed_positions.weight")[positions + 2]
    else:
        cos, sin = rotary_tables(spec, positions, dtype)
    for i in range(spec.num_layers):
        pre = hf.layer_prefix(spec, i)

        def w(rel: str, pre=pre) -> torch.Tensor:
            return get(pre + rel)

        if spec.family == "opt":
            x = _opt_layer(spec, w, x)
        elif spec.family == "gpt_neox":
            x = _neox_layer(spec, w, x, cos, sin)
        else:
            x = _llama_layer(spec, w, x, cos, sin)
    norm = hf.final_norm_names(spec)
    if spec.norm == "rmsnorm":
        x = rms_norm(x, get(norm[0]), spec.norm_eps)
    else:
        x = F.layer_norm(x, (spec.hidden,), get(norm[0]), get(norm[1]), spec.norm_eps)
    head = hf.lm_head_name(spec) if hf.lm_head_name(spec) in tensors else hf.head_source(spec)
    logits = x @ get(head).T
    return logits[0] if squeeze else logits
