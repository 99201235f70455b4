"""Which moves are dense boxes of the tensor they leave or land in (those travel with no staging copy).

Decided from the layouts alone (every worker must agree on the schedule without talking), for
the tensors as the executor holds them: weight shards contiguous with their box shape, KV pieces
contiguous [blocks, layers, 2, kv heads, block size, head dim] in the old block size.
"""
from __future__ import annotations

from typing import Sequence

from spotserve.daemon.layout import Layout, box_shape
from spotserve.daemon.resolve import Move
from spotserve.models.spec import ModelSpec


def is_dense(shape: Sequence[int], lengths: Sequence[int]) -> bool:
    """True when a box of `lengths` (per dim) inside a contiguous tensor of `shape` is one contiguous
    run of memory: every dim outside the innermost partial one has length 1."""
    partial = [d for d, (n, k) in enumerate(zip(shape, lengths)) if k != n]
    if not partial:
        return True
    return all(lengths[d] == 1 for d in range(partial[-1]))


class DenseSides:
    """dense(move) -> (dense in its source tensor, dense in its destination tensor)."""

    def __init__(self, spec: ModelSpec, old: Layout | None, new: Layout, requests, block_size: int):
        self.spec, self.old, self.new, self.bs = spec, old, new, block_size
        self.tokens = {r.request_id: r.num_tokens for r in requests}
        self._w: dict[tuple[str, str, bool], object] = {}
        self._kv: dict[tuple[str, bool], object] = {}

    def __call__(self, m: Move) -> tuple[bool, bool]:
        if m.src is None or self.old is None:
            return False, self._side(m, m.dst, False)
        return self._side(m, m.src, True), self._side(m, m.dst, False)

    def _side(self, m: Move, gpu: str, old: bool) -> bool:
        layout = self.old if old else self.new
        if m.kind == "w":
            key = (gpu, m.name, old)
            if key not in self._w:
                self._w[key] = layout.weight_ranges(self.spec, gpu).get(m.name)
            r = self._w[key]
            if r is None or r.dim != m.dim:
                return False
            shape = box_shape(self.spec, m.name, r.dim, r.end - r.start)
            lengths = list(shape)
            lengths[m.dim] = m.end - m.start
            return is_dense(shape, lengths)
        if (gpu, old) not in self._kv:
            self._kv[(gpu, old)] = layout.kv_ranges(self.spec, gpu)
        held = self._kv[(gpu, old)]
        if held is None:
            return False
        _, layers, heads = held
        nb = -(-self.tokens[m.name] // self.bs)
        shape = (nb, layers[1] - layers[0], 2, heads[1] - heads[0], self.bs, self.spec.head_dim)
        blocks = -(-m.t1 // self.bs) - m.t0 // self.bs
        return is_dense(shape, (blocks, m.layer_end - m.layer, 2, m.end - m.start, self.bs, self.spec.head_dim))
