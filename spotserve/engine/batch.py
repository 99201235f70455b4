"""The tensors one micro-batch carries through a stage: flattened new tokens plus per-request attention metadata.

Requests that feed one token (decode) are attended by the paged decode kernel in one launch
(DecodeMeta); requests that feed several (prefill, or a resume whose KV is shorter than its
tokens) by scaled_dot_product_attention, one call per request or one for a uniform batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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
class PrefillSlice:
    """Where a multi-token request sits in the flattened batch, and what it may attend to."""

    offset: int  # first row of the request in the flattened tokens
    start: int  # position of its first new token (= cached prefix length)
    length: int  # number of new tokens
    table: torch.Tensor  # block ids covering start + length positions
    mask: torch.Tensor | None  # [length, start + length] causal mask; None when start == 0 (plain causal)


@dataclass
class DecodeMeta:
    """The one-token requests of a batch, in the paged kernel's terms (spotserve/ops.py)."""

    block_tables: torch.Tensor  # int32 [n, max_blocks]
    context_lens: torch.Tensor  # int32 [n], the new token included; 0 marks a padding row
    max_context_len: int  # host bound on context_lens (sizes the kernel's launch, never read back)
    rows: torch.Tensor | None = None  # rows of the batch they occupy; None: every row, in order


@dataclass
class Batch:
    """Flattened new tokens of several requests (varlen), with their cache slots."""

    ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor  # int64 [tokens]; -1 for padding rows
    last_index: torch.Tensor | None  # row of each request's last token; None: every row
    decode: DecodeMeta | None = None
    prefills: list[PrefillSlice] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])

    @property
    def uniform_prefill(self) -> bool:
        """Only fresh prompts of one length: one batched causal attention call serves them all."""
        return (self.decode is None and len(self.prefills) > 0 and
                all(p.start == 0 and p.length == self.prefills[0].length for p in self.prefills))


def build_batch(work: list[Work], cache: KVCache, device) -> Batch:
    """Batch metadata for `work` (every worker builds the same one from the same schedule).

    Built with numpy and moved to the device in one copy: a 4096-token prefill spends
    microseconds here, not milliseconds of per-element Python tensor construction.
    """
    bs = cache.block_size
    lengths = np.array([len(w.tokens) for w in work])
    ends = np.cumsum(lengths)
    packed = np.empty((3, int(ends[-1])), dtype=np.int64)  # ids, positions, slots
    prefills, dec = [], []
    for w, n, end in zip(work, lengths.tolist(), ends.tolist()):
        row = end - n
        pos = np.arange(w.start, w.start + n)
        table = np.asarray(w.table[:cache.block_count(w.start + n)])
        packed[0, row:end] = w.tokens
        packed[1, row:end] = pos
        packed[2, row:end] = table[pos // bs] * bs + pos % bs
        if n == 1:
            dec.append((row, w.start + 1, table))
        else:
            mask = None
            if w.start > 0:
                # Query i (position start + i) sees keys 0 .. start + i.
                q = torch.arange(n, device=device)[:, None] + w.start
                mask = torch.arange(w.start + n, device=device)[None, :] <= q
            prefills.append(PrefillSlice(row, w.start, n, torch.from_numpy(table.astype(np.int32)).to(device), mask))
    flat = torch.from_numpy(np.concatenate([packed.reshape(-1), ends - 1])).to(device)
    t = packed.shape[1]
    decode = None
    if dec:
        width = max(len(tb) for _, _, tb in dec)
        tables = np.zeros((len(dec), width), dtype=np.int32)
        for i, (_, _, tb) in enumerate(dec):
            tables[i, :len(tb)] = tb
        rows = None if len(dec) == t else torch.tensor([r for r, _, _ in dec], dtype=torch.long, device=device)
        lens = [c for _, c, _ in dec]
        decode = DecodeMeta(torch.from_numpy(tables).to(device), torch.tensor(lens, dtype=torch.int32, device=device),
                            max(lens), rows)
    return Batch(flat[:t], flat[t:2 * t], flat[2 * t:3 * t], flat[3 * t:], decode, prefills)
