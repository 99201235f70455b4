"""Self-attention of a batch's new tokens over the paged KV cache (one layer, one tp shard).

New K/V rows go into the cache first (ops.write_kv_cache); one-token requests then read their
whole context through the paged decode kernel in a single launch, multi-token requests attend
with torch's scaled_dot_product_attention (flash attention on the GPU): a fresh prompt over its
own new K/V with a causal mask, a request with a cached prefix over K/V gathered from the cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spotserve import ops
from spotserve.engine.batch import Batch


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """q [b, Tq, H, D], k/v [b, Tk, KH, D] -> [b, Tq, H, D]; causal when mask is None.

    Always 4-D: torch's flash and memory-efficient kernels take only batched inputs, 3-D ones
    fall back to the math kernel (materialised scores, ~2x slower prefill at batch 1).
    """
    gqa = q.shape[-2] != k.shape[-2]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, k_cache: torch.Tensor,
           v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention output [tokens, heads, head_dim] of the batch's new tokens (rows contiguous per token).

    q: [tokens, heads, head_dim], k, v: [tokens, kv_heads, head_dim] (rows may be strided slices of
    a fused qkv projection); k_cache, v_cache: this layer's pair from KVCache.layer.
    """
    ops.write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    if batch.uniform_prefill:
        b, n = len(batch.prefills), batch.prefills[0].length
        shape = lambda x: x.view(b, n, *x.shape[1:])  # noqa: E731
        # flash attention writes [b, n, heads, D] memory: the reshape is a view, not a copy
        return _sdpa(shape(q), shape(k), shape(v), scale).reshape(q.shape)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    d = batch.decode
    if d is not None:
        if d.rows is None:
            ops.paged_decode_attention(out, q, k_cache, v_cache, d.block_tables, d.context_lens,
                                       d.max_context_len, scale)
        else:
            part = torch.empty((d.rows.shape[0], *q.shape[1:]), dtype=q.dtype, device=q.device)
            ops.paged_decode_attention(part, q.index_select(0, d.rows), k_cache, v_cache, d.block_tables,
                                       d.context_lens, d.max_context_len, scale)
            out.index_copy_(0, d.rows, part)
    for p in batch.prefills:
        rows = slice(p.offset, p.offset + p.length)
        if p.start == 0:
            out[rows] = _sdpa(q[None, rows], k[None, rows], v[None, rows], scale)[0]
        else:
            keys = ops.gather_kv(k_cache, p.table, p.start + p.length)
            values = ops.gather_kv(v_cache, p.table, p.start + p.length)
            out[rows] = _sdpa(q[None, rows], keys[None], values[None], scale, p.mask)[0]
    return out
