"""spotserve's tensor ops: the native kernels of spotserve._C with their pure-torch references.

Importing this module loads the extension, which registers torch.ops.spotserve.*; each op here
dispatches to the native kernel for the tensor's device and has a `*_ref` twin used by tests
and as the definition of what the kernel must compute. All ops write in place and return None,
so they can be captured in CUDA graphs; argument errors raise ValueError.

KV cache layout (one pair per layer, allocated once so decode steps can be graph-captured):
  k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim], contiguous, the model dtype.
  Token i of a sequence lives in block block_tables[seq][i // block_size] at offset
  i % block_size; its slot is block * block_size + offset, so k_cache.view(-1, kv_heads,
  head_dim)[slot] is its K row for every kv head.
  block_tables: int32 [num_seqs, max_blocks_per_seq]; context_lens: int32 [num_seqs], the
  tokens cached per sequence including the current one (0 marks a padding row: output zeros);
  slot_mapping: int64 [num_tokens], -1 for a padding token that must not be written.
A decode step per layer: write_kv_cache(k, v, k_cache, v_cache, slot_mapping), then
paged_decode_attention(out, q, k_cache, v_cache, block_tables, context_lens, max_len, scale).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spotserve import _C  # noqa: F401  (registers torch.ops.spotserve.*)

WITH_CUDA: bool = bool(_C.with_cuda)
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "gelu_fast", "gelu_new", "silu", "swiglu")


@torch.library.register_fake("spotserve::reslice_copy")
def _reslice_copy_fake(dst, src, dim, src_start, dst_start, length):
    return None


@torch.library.register_fake("spotserve::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    return None


@torch.library.register_fake("spotserve::fused_add_layer_norm")
def _fused_add_layer_norm_fake(x, residual, weight, bias, eps):
    return None


@torch.library.register_fake("spotserve::paged_decode_attention")
def _paged_decode_attention_fake(out, query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale,
                                 partition_size=0):
    return None


@torch.library.register_fake("spotserve::write_kv_cache")
def _write_kv_cache_fake(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.register_fake("spotserve::rotary_embedding")
def _rotary_embedding_fake(query, key, positions, cos_sin_cache, rotary_dim):
    return None


@torch.library.register_fake("spotserve::bias_act")
def _bias_act_fake(out, x, bias, activation):
    return None


@torch.library.register_fake("spotserve::skinny_gemm")
def _skinny_gemm_fake(x, weight, bias=None, split_k=0):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def reslice_copy(dst: torch.Tensor, src: torch.Tensor, dim: int, src_start: int, dst_start: int, length: int) -> None:
    """Copy `src[..., src_start:src_start+length, ...]` (along `dim`) into the same-sized range of `dst`.

    Moves the overlap of two tensor-parallel shards, e.g. a tp=4 column shard into a tp=2 one.
    Raises RuntimeError on mismatched shapes, dtypes, devices or out-of-range slices.
    """
    torch.ops.spotserve.reslice_copy(dst, src, dim, src_start, dst_start, length)


def reslice_copy_ref(dst, src, dim, src_start, dst_start, length) -> None:
    dst.narrow(dim, dst_start, length).copy_(src.narrow(dim, src_start, length))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: `residual += x`, then `x = rms_norm(residual) * weight` over the last dim."""
    torch.ops.spotserve.fused_add_rms_norm(x, residual, weight, eps)


def fused_add_rms_norm_ref(x, residual, weight, eps) -> None:
    residual.add_(x)
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    x.copy_(weight * h.to(x.dtype))


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, eps: float) -> None:
    """In place: `residual += x`, then `x = layer_norm(residual) * weight + bias` over the last dim.

    x, residual: [..., hidden] contiguous, same dtype; weight, bias: [hidden] (bias may be None).
    Statistics in float32; x is rounded once. Raises ValueError on mismatched shapes or dtypes.
    """
    torch.ops.spotserve.fused_add_layer_norm(x, residual, weight, bias, eps)


def fused_add_layer_norm_ref(x, residual, weight, bias, eps) -> None:
    residual.add_(x)
    b = None if bias is None else bias.float()
    x.copy_(F.layer_norm(residual.float(), (x.shape[-1],), weight.float(), b, eps).to(x.dtype))


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int,
                           scale: float, partition_size: int = 0) -> None:
    """Attention of one new token per sequence over its cached context (layout: module docstring).

    query: [num_seqs, num_heads, head_dim] (rows may be strided, heads contiguous); out: the same
    shape, contiguous. num_heads must be a multiple of kv_heads (GQA: head h reads kv head
    h // (num_heads // kv_heads)). max_context_len >= max(context_lens) only sizes the launch
    (split-K partitions); it is a host int so no device value is read (no sync, graph-safe).
    partition_size > 0 forces the split length in tokens (tests, tuning). CUDA: fp16/bf16 and
    head_dim in {8, 16, 32, 64, 80, 96, 128, 256}; CPU: also fp32, any head_dim.
    Raises ValueError on bad shapes, dtypes or (on CPU) out-of-range lengths and block ids.
    """
    torch.ops.spotserve.paged_decode_attention(out, query, k_cache, v_cache, block_tables, context_lens,
                                               max_context_len, scale, partition_size)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached rows of one sequence, [length, kv_heads, head_dim], contiguous."""
    block_size = cache.shape[1]
    blocks = block_table[: (length + block_size - 1) // block_size].long()
    return cache[blocks].reshape(-1, cache.shape[2], cache.shape[3])[:length]


def paged_decode_attention_ref(out, query, k_cache, v_cache, block_tables, context_lens, max_context_len, scale,
                               partition_size=0) -> None:
    heads, kv_heads = query.shape[1], k_cache.shape[2]
    for s in range(query.shape[0]):
        n = int(context_lens[s])
        if n == 0:
            out[s].zero_()
            continue
        k = gather_kv(k_cache, block_tables[s], n).float().repeat_interleave(heads // kv_heads, dim=1)
        v = gather_kv(v_cache, block_tables[s], n).float().repeat_interleave(heads // kv_heads, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", query[s].float(), k) * scale, dim=-1)
        out[s] = torch.einsum("ht,thd->hd", p, v).to(out.dtype)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the K/V rows of new tokens in their cache slots (slot < 0: padding, skipped).

    key, value: [num_tokens, kv_heads, head_dim] (rows may be strided); slot_mapping: int64
    [num_tokens]. Raises ValueError on shape/dtype mismatch or (on CPU) a slot past the cache.
    """
    torch.ops.spotserve.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)


def write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep]


def rotary_cos_sin_cache(max_positions: int, rotary_dim: int, base: float = 10000.0,
                         dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[max_positions, rotary_dim]: cos then sin of position * base^(-2i/rotary_dim), i < rotary_dim/2.

    The frequencies of Hugging Face's GPT-NeoX/LLaMA rotary embedding, computed in float32.
    Raises ValueError for an odd or non-positive rotary_dim.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_cos_sin_cache: rotary_dim must be positive and even, got {rotary_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).float() / rotary_dim))
    freqs = torch.outer(torch.arange(max_positions, device=device).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     rotary_dim: int) -> None:
    """Rotate, in place, the first rotary_dim elements of every head (GPT-NeoX rotate-half form).

    query: [num_tokens, num_heads, head_dim], key: [num_tokens, kv_heads, head_dim] (rows may be
    strided, e.g. slices of a fused qkv); positions: int64 [num_tokens]; cos_sin_cache from
    rotary_cos_sin_cache (float32 or the query dtype). rotary_dim < head_dim is partial rotary
    (GPT-NeoX rotary_pct=0.25). Raises ValueError on bad shapes or (on CPU) positions.
    """
    torch.ops.spotserve.rotary_embedding(query, key, positions, cos_sin_cache, rotary_dim)


def rotary_embedding_ref(query, key, positions, cos_sin_cache, rotary_dim) -> None:
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)
    for x in (query, key):
        x1, x2 = x[..., :rotary_dim].float().chunk(2, dim=-1)
        x[..., :rotary_dim] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def bias_act(out: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str) -> None:
    """out = activation(x + bias) in one pass; "swiglu": x = [gate | up], out = silu(gate) * up.

    activation: none, relu, gelu (erf), gelu_tanh (= gelu_fast, gelu_new), silu, swiglu.
    x, out: contiguous [..., n] ([..., 2n] for x with swiglu); bias: [x.shape[-1]] or None.
    out may be x itself for the elementwise activations. Raises ValueError on bad arguments.
    """
    torch.ops.spotserve.bias_act(out, x, bias, activation)


def bias_act_ref(out, x, bias, activation) -> None:
    v = (x if bias is None else x + bias).float()
    if activation == "swiglu":
        gate, up = v.chunk(2, dim=-1)
        y = F.silu(gate) * up
    elif activation == "relu":
        y = F.relu(v)
    elif activation == "gelu":
        y = F.gelu(v)
    elif activation in ("gelu_tanh", "gelu_fast", "gelu_new"):
        y = F.gelu(v, approximate="tanh")
    elif activation == "silu":
        y = F.silu(v)
    elif activation == "none":
        y = v
    else:
        raise ValueError(f"bias_act_ref: unknown activation {activation!r}")
    out.copy_(y.to(out.dtype))


SKINNY_MAX_ROWS = 8  # rows of x the CUDA skinny GEMM kernel takes (decode batches); more: cuBLAS


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, split_k: int = 0) -> torch.Tensor:
    """y = x @ weight.T (+ bias), the F.linear of a decode batch: x [..., K], weight [N, K], bias [N] -> [..., N].

    On CUDA with fp16/bf16, at most SKINNY_MAX_ROWS rows of x and K % 8 == 0, a memory-bound
    tensor-core kernel reads each weight element once for all rows (float32 accumulation, no
    split-K pass); any other input goes to the library GEMM, so the result is always defined.
    Returns a new contiguous tensor (allocated by torch: CUDA-graph capturable). split_k > 0
    forces the CTAs that share a row tile's K range (tests, benchmarks). Raises ValueError on
    mismatched shapes, dtypes or devices.
    """
    return torch.ops.spotserve.skinny_gemm(x, weight, bias, split_k)


def skinny_gemm_ref(x, weight, bias=None, split_k=0) -> torch.Tensor:
    y = x.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
