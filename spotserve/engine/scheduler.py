"""Continuous (iteration-level) batching: requests join and leave the running batch between steps (no torch).

Each step every scheduled request feeds its pending tokens (the whole prompt on admission, one
token afterwards) and receives one new token. Admission is first-come first-served under the
batch, token and KV-block budgets; when a running request cannot grow by a block, the most
recently admitted running request is preempted (its blocks freed; it re-prefills later from
prompt + generated tokens, which gives the same tokens as if it had never stopped).
"""
from __future__ import annotations

from collections import deque

from spotserve.engine.block_manager import BlockManager
from spotserve.engine.sequence import Sequence, SeqStatus


class Scheduler:
    """Decides which requests run in the next step and keeps their block tables."""

    def __init__(self, blocks: BlockManager, max_batch: int, max_batch_tokens: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}

    # --- membership ----------------------------------------------------------------------
    def add(self, seq: Sequence, num_cached_blocks: bool = False) -> None:
        """Queue `seq`. With num_cached_blocks its KV (num_cached tokens) is already in the blocks
        the block manager lists for it, and it joins the running batch directly.

        Raises ValueError for a duplicate id or a finished request.
        """
        if seq.req_id in self.seqs:
            raise ValueError(f"request {seq.req_id!r} is already in the engine")
        if seq.finished:
            raise ValueError(f"request {seq.req_id!r} is already finished ({seq.finish_reason})")
        self.seqs[seq.req_id] = seq
        if num_cached_blocks and seq.num_cached > 0:
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
        else:
            seq.num_cached = 0
            seq.status = SeqStatus.WAITING
            self.waiting.append(seq)

    def remove(self, req_id: str) -> Sequence:
        """Take a request out of the engine (finished, migrated away or aborted) and free its blocks."""
        seq = self.seqs.pop(req_id, None)
        if seq is None:
            raise KeyError(f"unknown request {req_id!r}")
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(req_id)
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- one step ------------------------------------------------------------------------
    def schedule(self) -> list[Sequence]:
        """Pick the requests of the next step (running first, then admitted), allocating blocks.

        Raises ValueError when a single request cannot fit the whole KV cache.
        """
        batch: list[Sequence] = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted while making room for an earlier one
                continue
            while not self.blocks.can_allocate(seq.req_id, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.allocate(seq.req_id, seq.num_tokens)
                batch.append(seq)
        budget = self.max_batch_tokens - sum(len(s.pending) for s in batch)
        while self.waiting and len(batch) < self.max_batch:
            seq = self.waiting[0]
            cost = len(seq.pending)
            if cost > budget and batch:
                break
            if not self.blocks.can_allocate(seq.req_id, seq.num_tokens):
                if not batch and not self.running and self.blocks.num_free == self.blocks.num_blocks:
                    raise ValueError(f"request {seq.req_id}: {seq.num_tokens} tokens need "
                                     f"{self.blocks.blocks_for(seq.num_tokens)} KV blocks, "
                                     f"the cache has {self.blocks.num_blocks}")
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.req_id, seq.num_tokens)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(seq)
            budget -= cost
        return batch

    def postprocess(self, batch: list[Sequence], tokens: list[int]) -> list[Sequence]:
        """Append each request's new token; finished requests leave and free their blocks.

        Returns the requests that finished in this step (they stay readable from the caller).
        """
        if len(batch) != len(tokens):
            raise ValueError(f"{len(tokens)} tokens for a batch of {len(batch)}")
        done = []
        for seq, token in zip(batch, tokens):
            seq.append(token)
            if seq.finished:
                self.running.remove(seq)
                self.seqs.pop(seq.req_id, None)
                self.blocks.free(seq.req_id)
                done.append(seq)
        return done

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.req_id)
        seq.num_cached = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
