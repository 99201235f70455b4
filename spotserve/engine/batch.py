"""The tensors one micro-batch carries through a stage: flattened new tokens plus per-request attention metadata."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from spotserve.engine.kv_cache import KVCache
from spotserve.engine.sequence import SamplingParams


@dataclass
class Work:
    """One request's share of a step: feed `tokens` at positions start.. and produce output token `index`."""

    req_id: str
    tokens: list[int]
    start: int
    table: list[int]
    params: SamplingParams
    index: int


@dataclass
class RequestSlice:
    """Where a request's new tokens sit in the flattened batch, and what they may attend to."""

    offset: int  # first row of the request in the flattened tokens
    start: int  # position of its first new token (= cached prefix length)
    length: int  # number of new tokens
    table: torch.Tensor  # block ids covering start + length positions
    mask: torch.Tensor | None  # [length, start + length] causal mask; None when length == 1


@dataclass
class Batch:
    """Flattened new tokens of several requests (varlen), with cache slots and rotary tables."""

    ids: torch.Tensor
    positions: torch.Tensor
    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    last_index: torch.Tensor  # row of each request's last token (the one whose logits give the next token)
    requests: list[RequestSlice] = field(default_factory=list)
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])


def build_batch(work: list[Work], cache: KVCache, device) -> Batch:
    """Batch metadata for `work` (every worker builds the same one from the same schedule)."""
    ids, positions, blocks, offsets, last, slices = [], [], [], [], [], []
    row = 0
    for w in work:
        n = len(w.tokens)
        ids += w.tokens
        positions += range(w.start, w.start + n)
        b, o = cache.slots(w.table, w.start, n)
        blocks.append(b)
        offsets.append(o)
        mask = None
        if n > 1:
            # Query i (position start + i) sees keys 0 .. start + i.
            q = torch.arange(n, device=device)[:, None] + w.start
            mask = torch.arange(w.start + n, device=device)[None, :] <= q
        nb = cache.block_count(w.start + n)
        slices.append(RequestSlice(row, w.start, n, torch.tensor(w.table[:nb], dtype=torch.long, device=device), mask))
        row += n
        last.append(row - 1)
    return Batch(torch.tensor(ids, dtype=torch.long, device=device),
                 torch.tensor(positions, dtype=torch.long, device=device),
                 torch.cat(blocks), torch.cat(offsets),
                 torch.tensor(last, dtype=torch.long, device=device), slices)
