"""Random inputs for the spotserve._C op tests (CPU and GPU share them)."""
from __future__ import annotations

import torch

# assert_close tolerances of a kernel (float accumulation, one rounding) against a float32 reference.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def randn(*shape, gen, dtype=torch.float32, device="cpu", scale=1.0):
    """Normal samples drawn on the CPU (same values on every device), cast and moved."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def paged_case(seq_lens, heads, kv_heads, head_dim, block_size, dtype, device="cpu", seed=0, strided_q=True):
    """A decode-attention problem with the cache blocks of all sequences shuffled over the pool.

    Returns (query, k_cache, v_cache, block_tables, context_lens, max_context_len). Unused
    block-table entries hold an out-of-range id, so a kernel that reads them fails loudly.
    """
    g = torch.Generator().manual_seed(seed)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    width = max(need + [1]) + 1
    num_blocks = sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.full((len(seq_lens), width), num_blocks + 7, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used:used + n].int()
        used += n
    if strided_q:  # a slice of a fused [seq, 3, heads, head_dim] projection, as the engine has it
        query = randn(len(seq_lens), 3, heads, head_dim, gen=g, dtype=dtype, device=device)[:, 1]
    else:
        query = randn(len(seq_lens), heads, head_dim, gen=g, dtype=dtype, device=device)
    k_cache = randn(num_blocks, block_size, kv_heads, head_dim, gen=g, dtype=dtype, device=device)
    v_cache = randn(num_blocks, block_size, kv_heads, head_dim, gen=g, dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return query, k_cache, v_cache, tables.to(device), lens, max(seq_lens + [1])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 (NaN in got gives NaN, which fails any < check)."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))
