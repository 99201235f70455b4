"""Ablation switches built from the planner's own parts: a frozen-shape optimizer and a rank-order mapper.

Neither changes spotserve.planner; each subclasses one planner component and is swapped into a
Planner instance, so everything else (migration planner, arranger, cost model) stays the same code.
"""
from __future__ import annotations

import math

import numpy as np

from spotserve.planner.cost import CostModel
from spotserve.planner.mapper import DeviceMapper, Mapping
from spotserve.planner.optimizer import Choice, ConfigOptimizer
from spotserve.planner.types import GPU, ParallelConfig, ReconfigurationPlan, RunningRequest


class FrozenOptimizer(ConfigOptimizer):
    """No optimizer: the replica shape (pp, tp, batch, micro-batches) is fixed; dp follows the GPUs."""

    def __init__(self, cost: CostModel, shape: ParallelConfig):
        super().__init__(cost, allow_extra=False)
        self.shape = ParallelConfig(1, shape.pp, shape.tp, shape.batch, shape.micro_batches)

    def choose(self, n_gpus: int, arrival_rate: float, gpu_memory_bytes: int | None = None, current=None,
               kept_gpus: int | None = None, slo: float | None = None) -> Choice:
        s = self.shape
        dp = n_gpus // (s.pp * s.tp)
        if dp < 1:
            return Choice(None, None, math.inf, math.inf, 0.0, False,
                          cannot_serve=f"fixed shape {s.short()} needs {s.pp * s.tp} GPUs; have {n_gpus}")
        return self.evaluate(ParallelConfig(dp, s.pp, s.tp, s.batch, s.micro_batches), None, arrival_rate)


class RankMapper(DeviceMapper):
    """No device mapper: positions take GPUs in rank order (instance acquisition order, then index)."""

    def assign(self, config: ParallelConfig, extra: ParallelConfig | None, gpus: list[GPU],
               current: ReconfigurationPlan | None = None, requests: list[RunningRequest] = ()) -> Mapping:
        n_pos = config.world_size + (extra.world_size if extra else 0)
        if n_pos > len(gpus):
            raise ValueError(f"assign: {n_pos} positions but only {len(gpus)} GPUs")
        inherits = self.choose_inherits(config, extra, current, gpus, list(requests))
        W, table = self.weight_matrix(config, extra, gpus, current, requests, inherits)
        placement = {p: gpus[i].id for i, p in enumerate(table.positions)}
        reused = float(np.trace(W[:, :len(table)])) if len(table) else 0.0
        return Mapping(placement, inherits, reused)
