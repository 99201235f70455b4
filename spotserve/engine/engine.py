"""The engine of one worker, run in lockstep (SPMD) by every worker of a replica.

Every worker holds the same scheduler state (same requests, same block tables) because every
decision depends only on the calls it receives and on the tokens the sampler broadcasts; the
workers differ only in the layers and heads whose weights and KV they hold. The caller feeds all
workers the same calls (add_request, step, commit, export/import) in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from spotserve.engine.batch import Work
from spotserve.engine.block_manager import BlockManager
from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import DistContext
from spotserve.engine.kv_reshard import RequestKV
from spotserve.engine.runner import ModelRunner
from spotserve.engine.scheduler import Scheduler
from spotserve.engine.sequence import SamplingParams, Sequence
from spotserve.models.loader import CheckpointReader
from spotserve.models.spec import ModelSpec


@dataclass
class RequestState:
    """What resuming a request needs besides its KV: prompt, committed output tokens, sampling params."""

    req_id: str
    prompt: list[int]
    committed: list[int] = field(default_factory=list)
    params: SamplingParams = field(default_factory=SamplingParams)


class Engine:
    """Continuous-batching engine of one worker (see module docstring for the lockstep contract)."""

    def __init__(self, config: EngineConfig, ctx: DistContext | None = None, spec: ModelSpec | None = None,
                 weights: dict | None = None):
        self.config = config
        self.ctx = ctx or DistContext.single(config.timeout_s)
        self.spec = spec or CheckpointReader(config.model_dir).spec
        if config.pp > self.spec.num_layers:
            raise ValueError(f"{self.spec.name}: pp={config.pp} exceeds its {self.spec.num_layers} layers")
        if not self.spec.valid_tp(config.tp):
            raise ValueError(f"{self.spec.name}: tp={config.tp} does not split {self.spec.num_heads} heads "
                             f"({self.spec.kv_heads} kv heads) evenly")
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, config.max_batch, config.max_batch_tokens)
        self.runner = ModelRunner(config, self.spec, self.ctx, weights)
        self.finished: dict[str, Sequence] = {}
        self.steps = 0
        self.tokens_fed = 0  # tokens run through the model so far (prefill + decode)
        self.last_step_tokens = 0

    # --- requests ---------------------------------------------------------------------------
    def add_request(self, req_id: str, prompt: list[int], params: SamplingParams | None = None) -> Sequence:
        """Queue a new request; it joins the running batch at the next step."""
        self._check_tokens(req_id, prompt)
        seq = Sequence(req_id, list(prompt), params or SamplingParams())
        self._check_length(seq)
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def get(self, req_id: str) -> Sequence:
        """A live or finished request by id (KeyError when unknown)."""
        seq = self.scheduler.seqs.get(req_id) or self.finished.get(req_id)
        if seq is None:
            raise KeyError(f"unknown request {req_id!r}")
        return seq

    def commit(self, req_id: str, n: int) -> None:
        """The controller made the first n output tokens of `req_id` durable."""
        self.get(req_id).commit(n)

    # --- steps ------------------------------------------------------------------------------
    def step(self) -> dict[str, int]:
        """Run one decode/prefill step; returns {request id: new token} for every request in it."""
        batch = self.scheduler.schedule()
        if not batch:
            return {}
        work = [Work(s.req_id, s.pending, s.num_cached, self.blocks.table(s.req_id), s.params, len(s.output))
                for s in batch]
        tokens = self.runner.step(work)
        self.last_step_tokens = sum(len(w.tokens) for w in work)
        self.tokens_fed += self.last_step_tokens
        for seq in self.scheduler.postprocess(batch, tokens):
            self.finished[seq.req_id] = seq
        self.steps += 1
        return {s.req_id: t for s, t in zip(batch, tokens)}

    def run(self, on_step=None) -> dict[str, list[int]]:
        """Step until no request is left; on_step(engine, new_tokens) runs after each step (may add requests).

        Returns {request id: output tokens} of the requests finished so far.
        """
        while self.has_unfinished():
            new = self.step()
            if on_step is not None:
                on_step(self, new)
        return {rid: list(seq.output) for rid, seq in self.finished.items()}

    def release_graphs(self) -> None:
        """Drop the decode CUDA graphs. Call before destroying the process groups of this engine
        (World.close does it): NCCL >= 2.26 destroys or aborts no communicator that a live graph
        captured and would wait forever. Later decode steps capture again."""
        self.runner.decoder.release()

    @property
    def last_logits(self):
        """Logits [batch, vocab] of the latest step, in batch order (last stage only, else None)."""
        return self.runner.last_logits

    # --- resume and migration ---------------------------------------------------------------
    def export_request(self, req_id: str) -> tuple[RequestState, RequestKV | None]:
        """This worker's view of a live request: its committed state and its KV piece (None without KV).

        The KV piece holds every position the cache has (>= prompt + committed - 1), for this
        worker's layers and kv heads; the request stays in the engine (release() removes it).
        """
        seq = self.scheduler.seqs.get(req_id)
        if seq is None:
            raise KeyError(f"request {req_id!r} is not live in this engine")
        state = RequestState(req_id, list(seq.prompt), list(seq.output[:seq.num_committed]), seq.params)
        if seq.num_cached == 0:
            return state, None
        data = self.runner.cache.export_blocks(self.blocks.table(req_id)[:self.blocks.blocks_for(seq.num_cached)])
        kv = RequestKV(req_id, seq.num_cached, self.config.block_size, self.runner.layers, self.runner.heads, data)
        return state, kv

    def release(self, req_id: str) -> Sequence:
        """Take a live request out (migrated away or aborted), freeing its KV blocks."""
        return self.scheduler.remove(req_id)

    def import_request(self, state: RequestState, kv: RequestKV | None = None) -> Sequence:
        """Resume a request from its committed tokens: with `kv` (this worker's piece, see
        kv_reshard.assemble) it continues without recomputation, without it the next step
        re-prefills prompt + committed tokens. Either way the tokens equal an uninterrupted run.

        Raises ValueError when the KV piece is for another position, request or block size.
        """
        self._check_tokens(state.req_id, state.prompt)
        seq = Sequence(state.req_id, list(state.prompt), state.params, list(state.committed),
                       num_committed=len(state.committed))
        self._check_length(seq)
        if seq.finished:
            raise ValueError(f"request {state.req_id}: already finished ({seq.finish_reason}) at "
                             f"{len(state.committed)} committed tokens")
        keep = 0 if kv is None else min(kv.num_tokens, seq.num_tokens - 1)
        if keep > 0:
            self._check_piece(state.req_id, kv)
            if not self.blocks.can_allocate(state.req_id, keep):
                raise ValueError(f"request {state.req_id}: {self.blocks.blocks_for(keep)} KV blocks needed, "
                                 f"{self.blocks.num_free} free")
            table = self.blocks.allocate(state.req_id, keep)
            self.runner.cache.import_blocks(table, kv.data[:len(table)])
            seq.num_cached = keep
        self.scheduler.add(seq, num_cached_blocks=keep > 0)
        return seq

    def _check_piece(self, req_id: str, kv: RequestKV) -> None:
        if kv.req_id != req_id:
            raise ValueError(f"KV piece of request {kv.req_id!r} given for {req_id!r}")
        if (tuple(kv.layers), tuple(kv.heads)) != (self.runner.layers, self.runner.heads):
            raise ValueError(f"request {req_id}: KV piece holds layers {kv.layers} x kv heads {kv.heads}, this "
                             f"worker needs {self.runner.layers} x {self.runner.heads} (use kv_reshard.assemble)")
        if kv.block_size != self.config.block_size:
            raise ValueError(f"request {req_id}: KV piece uses block size {kv.block_size}, the cache "
                             f"{self.config.block_size} (use kv_reshard.assemble(block_size=...))")

    def _check_tokens(self, req_id: str, tokens: list[int]) -> None:
        bad = [t for t in tokens if not 0 <= int(t) < self.spec.vocab]
        if bad:
            raise ValueError(f"request {req_id}: token ids {bad[:5]} outside the vocab of {self.spec.vocab}")

    def _check_length(self, seq: Sequence) -> None:
        longest = len(seq.prompt) + seq.params.max_new_tokens - 1
        if longest > self.spec.max_positions:
            raise ValueError(f"request {seq.req_id}: prompt {len(seq.prompt)} + {seq.params.max_new_tokens} new "
                             f"tokens exceed the model's {self.spec.max_positions} positions")
        if self.blocks.blocks_for(longest) > self.config.num_blocks:
            raise ValueError(f"request {seq.req_id}: {longest} positions need {self.blocks.blocks_for(longest)} "
                             f"KV blocks, the cache has {self.config.num_blocks}")
