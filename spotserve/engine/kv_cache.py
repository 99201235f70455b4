"""The KV cache tensor of one worker, paged into fixed-size blocks, in the layout of spotserve.ops' kernels.

Layout: data[layers_of_stage, 2, num_blocks, block_size, kv_heads_of_shard, head_dim]; index 0 of
dim 1 is K, 1 is V. data[l, 0] and data[l, 1] are the contiguous [num_blocks, block_size, kv_heads,
head_dim] k_cache / v_cache pair of local layer l that write_kv_cache and paged_decode_attention
take (spotserve/ops.py); the token at position p of a request with block table `table` lives in
slot table[p // block_size] * block_size + p % block_size of every layer.

Moving a request (export/import) uses the block-major layout of kv_reshard.RequestKV,
[n_blocks, layers, 2, kv_heads, block_size, head_dim]: one block id is one chunk of the request,
and re-sharding between configs only re-slices its layer and head axes. export_blocks and
import_blocks convert between the two layouts (a permuted copy, off the decode path).
"""
from __future__ import annotations

import torch

from spotserve import ops


class KVCache:
    """Paged K/V storage of one worker (its stage's layers x its shard's kv heads)."""

    def __init__(self, num_blocks: int, num_layers: int, kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached position takes on this worker (all its layers, K and V)."""
        return self.num_layers * 2 * self.kv_heads * self.head_dim * self.data.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of local layer `layer`, each [num_blocks, block_size, kv_heads, head_dim]."""
        return self.data[layer, 0], self.data[layer, 1]

    def slots(self, table: list[int], start: int, count: int) -> list[int]:
        """Cache slots of positions start..start+count-1 of a request with block table `table`."""
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, start + count)]

    def read(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [length, kv_heads, head_dim] of the first `length` positions of a request."""
        k_cache, v_cache = self.layer(layer)
        return ops.gather_kv(k_cache, table, length), ops.gather_kv(v_cache, table, length)

    def _index(self, table: list[int]) -> torch.Tensor:
        return torch.tensor(table, dtype=torch.long, device=self.data.device)

    def export_blocks(self, table: list[int]) -> torch.Tensor:
        """A copy of the request's blocks in RequestKV layout [len(table), layers, 2, kv_heads, block_size, head_dim]."""
        return self.data[:, :, self._index(table)].permute(2, 0, 1, 4, 3, 5).contiguous()

    def import_blocks(self, table: list[int], blocks: torch.Tensor) -> None:
        """Write `blocks` (RequestKV layout, as export_blocks returns them) into the blocks of `table`.

        Raises ValueError when the shape does not match this worker's slice of the cache.
        """
        want = (len(table), self.num_layers, 2, self.kv_heads, self.block_size, self.head_dim)
        if tuple(blocks.shape) != want:
            raise ValueError(f"KV blocks of shape {tuple(blocks.shape)} do not fit this worker's cache slice {want}")
        self.data[:, :, self._index(table)] = blocks.to(self.data).permute(1, 2, 0, 4, 3, 5)

    def block_count(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)
