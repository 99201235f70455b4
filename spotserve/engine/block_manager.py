"""KV block accounting (no torch): a free list of fixed-size blocks and one block table per request.

A block holds `block_size` consecutive token positions of one request. Every worker of a replica
uses the same block ids for its own slice of the cache (its stage's layers, its shard's kv heads),
so one table per request describes the whole replica's cache of that request. A request's blocks
are the unit the context daemon stores and a migration moves.
"""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Raised when an allocation does not fit the free blocks."""


class BlockManager:
    """Allocates KV blocks to requests (deterministic: every worker of a replica computes the same tables)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest ids first so tables are reproducible and easy to read in tests.
        self._free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def missing(self, req_id: str, num_tokens: int) -> int:
        """Blocks `req_id` still needs to cover `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(req_id, ())))

    def can_allocate(self, req_id: str, num_tokens: int) -> bool:
        return self.missing(req_id, num_tokens) <= self.num_free

    def allocate(self, req_id: str, num_tokens: int) -> list[int]:
        """Grow `req_id`'s table to cover `num_tokens` positions; returns the table.

        Raises OutOfBlocks (allocating nothing) when the free blocks do not suffice.
        """
        need = self.missing(req_id, num_tokens)
        if need > self.num_free:
            raise OutOfBlocks(f"request {req_id}: needs {need} more KV blocks, {self.num_free} free")
        table = self.tables.setdefault(req_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def free(self, req_id: str) -> None:
        """Return all blocks of `req_id` (no-op for an unknown request)."""
        for block in reversed(self.tables.pop(req_id, [])):
            self._free.append(block)

    def truncate(self, req_id: str, num_tokens: int) -> None:
        """Keep only the blocks covering the first `num_tokens` positions of `req_id`."""
        table = self.tables.get(req_id, [])
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            self._free.append(table.pop())

    def table(self, req_id: str) -> list[int]:
        """The block table of `req_id` (raises KeyError naming the request when it has none)."""
        if req_id not in self.tables:
            raise KeyError(f"request {req_id!r} holds no KV blocks")
        return self.tables[req_id]
