"""The KV cache tensor of one worker, paged into fixed-size blocks.

Layout: data[num_blocks, layers_of_stage, 2, kv_heads_of_shard, block_size, head_dim]; index 0 of
dim 2 is K, 1 is V. One block id therefore addresses one contiguous chunk holding a stretch of
`block_size` positions of one request for all of this worker's layers and heads: exporting a
request copies whole chunks, and re-sharding between configs only re-slices the layer (dim 1)
and head (dim 3) axes.
"""
from __future__ import annotations

import torch


class KVCache:
    """Paged K/V storage of one worker (its stage's layers x its shard's kv heads)."""

    def __init__(self, num_blocks: int, num_layers: int, kv_heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.block_size = block_size
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.data = torch.zeros(num_blocks, num_layers, 2, kv_heads, block_size, head_dim, dtype=dtype, device=device)

    def slots(self, table: list[int], start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets) of positions start..start+count-1 of a request with block table `table`."""
        pos = torch.arange(start, start + count)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return blocks.to(self.data.device), (pos % self.block_size).to(self.data.device)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor) -> None:
        """Store k, v [tokens, kv_heads, head_dim] of local layer `layer` at (blocks, offsets)."""
        for kind, x in ((0, k), (1, v)):
            # [N, H, B, D] viewed as [N, B, H, D]: (block, offset) pairs index one token's heads.
            self.data[:, layer, kind].permute(0, 2, 1, 3)[blocks, offsets] = x.to(self.data.dtype)

    def read(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [kv_heads, length, head_dim] of the first `length` positions of a request."""
        chunk = self.data[table, layer]  # [nb, 2, H, B, D]
        nb = chunk.shape[0]
        kv = chunk.permute(1, 2, 0, 3, 4).reshape(2, self.kv_heads, nb * self.block_size, self.head_dim)
        return kv[0, :, :length], kv[1, :, :length]

    def export_blocks(self, table: list[int]) -> torch.Tensor:
        """A copy of the request's blocks, [len(table), layers, 2, kv_heads, block_size, head_dim]."""
        return self.data[torch.tensor(table, dtype=torch.long, device=self.data.device)].clone()

    def import_blocks(self, table: list[int], blocks: torch.Tensor) -> None:
        """Write `blocks` (as export_blocks returns them) into the blocks of `table`.

        Raises ValueError when the shape does not match this worker's slice of the cache.
        """
        want = (len(table), *self.data.shape[1:])
        if tuple(blocks.shape) != want:
            raise ValueError(f"KV blocks of shape {tuple(blocks.shape)} do not fit this worker's cache slice {want}")
        self.data[torch.tensor(table, dtype=torch.long, device=self.data.device)] = blocks.to(self.data)

    def block_count(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)
