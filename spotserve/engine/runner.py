"""One worker's model runner: its stage's weights and KV cache, and a pipelined forward of one step.

A step's requests are split into micro-batches; stage s receives micro-batch m from stage s-1,
runs its layers and sends it on (asynchronously, so it can start m+1 while s+1 works on m). The
last stage computes logits of each request's last new token and samples; the sampled tokens are
broadcast to every worker of the replica, so all of them see the same new token per request.
Decode-only steps run on static buffers (graphs.StaticDecoder: padded to a batch bucket, each
stage's share replayed from CUDA graphs on the GPU, tp all-reduces inside the graphs, stage-to-stage
sends between replays); the sole host synchronisation of a step is reading its new tokens at the
end, after the eager broadcast from the sampler (which also keeps the step visible to the NCCL
watchdog).
"""
from __future__ import annotations

import torch

from spotserve.engine.batch import Work, build_batch
from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import DistContext
from spotserve.engine.graphs import StaticDecoder
from spotserve.engine.kv_cache import KVCache
from spotserve.engine.model import StageModel
from spotserve.engine.sampling import sample
from spotserve.models import sharding
from spotserve.models.loader import TORCH_DTYPES, load_shard
from spotserve.models.spec import ModelSpec


class ModelRunner:
    """Executes steps for position (stage, shard) of a replica."""

    def __init__(self, config: EngineConfig, spec: ModelSpec, ctx: DistContext,
                 weights: dict[str, torch.Tensor] | None = None):
        if (ctx.pp, ctx.tp) != (config.pp, config.tp):
            raise ValueError(f"process layout pp={ctx.pp} tp={ctx.tp} differs from config pp={config.pp} tp={config.tp}")
        self.config, self.spec, self.ctx = config, spec, ctx
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        if weights is None:
            weights = load_shard(config.model_dir, config.pp, ctx.stage, config.tp, ctx.shard, dtype=self.dtype)
        weights = {k: v.to(self.device, self.dtype) for k, v in weights.items()}
        self.model = StageModel(spec, config.pp, ctx.stage, weights, ctx.comm).eval()
        del weights
        layers = sharding.stage_layers(spec.num_layers, config.pp, ctx.stage)
        self.layers = (layers.start, layers.stop)
        self.heads = sharding.partition(spec.kv_heads, config.tp, ctx.shard)
        self.cache = KVCache(config.num_blocks, len(layers), self.heads[1] - self.heads[0], config.block_size,
                             spec.head_dim, self.dtype, self.device)
        self.decoder = StaticDecoder(self.model, self.cache, ctx, config.max_batch, spec.max_positions,
                                     config.micro_batches, use_graphs=config.cuda_graphs)
        self._logits: torch.Tensor | None = None

    @property
    def last_logits(self) -> torch.Tensor | None:
        """Float logits [batch, vocab] of the latest step (last stage only, else None)."""
        return None if self._logits is None else self._logits.float()

    def micro_batches(self, work: list[Work]) -> list[list[Work]]:
        """Contiguous, balanced split of a step's requests into at most config.micro_batches parts."""
        m = min(self.config.micro_batches, len(work))
        return [work[slice(*sharding.partition(len(work), m, i))] for i in range(m)]

    @torch.inference_mode()
    def step(self, work: list[Work]) -> list[int]:
        """Run one step for `work` (the same list on every worker); returns the new token of each request."""
        if not work:
            return []
        ctx = self.ctx
        if all(len(w.tokens) == 1 for w in work):
            tokens, self._logits = self.decoder.run(work)
        else:
            tokens, self._logits = self._pipelined_step(work)
        if ctx.is_last and not all(w.params.greedy for w in work):
            picked = sample(self._logits.float(), [w.params for w in work], [w.index for w in work])
            tokens = torch.tensor(picked, dtype=torch.long, device=self.device)
        ctx.broadcast_replica(tokens, ctx.sampler_rank)
        return tokens.tolist()

    def _pipelined_step(self, work: list[Work]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """General step (prefill or mixed prefill + decode): greedy tokens and logits (last stage)."""
        ctx, model = self.ctx, self.model
        sends, logits = [], []
        for mb in self.micro_batches(work):
            batch = build_batch(mb, self.cache, self.device)
            if ctx.is_first:
                h = model.embed_tokens(batch.ids, batch.positions)
            else:
                h = ctx.recv_prev(torch.empty(batch.num_tokens, self.spec.hidden, dtype=self.dtype, device=self.device))
            h = model(h, batch, self.cache)
            if ctx.is_last:
                logits.append(model.logits(h[batch.last_index]))
            else:
                sends.append((ctx.send_next(h), h))  # keep h alive until the send completes
        ctx.wait([handle for handle, _ in sends])
        if not ctx.is_last:
            return torch.zeros(len(work), dtype=torch.long, device=self.device), None
        out = torch.cat(logits) if len(logits) > 1 else logits[0]
        return torch.argmax(out, dim=-1), out
