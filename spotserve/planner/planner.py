"""Planner: one call from the GPUs now available to a ReconfigurationPlan (optimizer -> mapper -> migration).

The ablations and baselines are switches of the planner itself (PlannerSwitches), so every approach
runs the same components: a frozen replica shape (no optimizer), rank-order placement (no device
mapper), no memory-aware migration order, and no KV-cache migration (requests in flight are not
context: without the interruption arranger they restart).
"""
from __future__ import annotations

from dataclasses import dataclass

from spotserve.planner.arranger import InterruptionArranger
from spotserve.planner.cost import CostModel
from spotserve.planner.mapper import DeviceMapper
from spotserve.planner.migration import MigrationPlanner, estimate_seconds
from spotserve.planner.optimizer import Choice, ConfigOptimizer
from spotserve.planner.types import GPU, InterruptionDecision, ParallelConfig, ReconfigurationPlan, RunningRequest


@dataclass(frozen=True)
class PlannerSwitches:
    """Which planner mechanisms are on (all on = SpotServe)."""

    fixed_shape: ParallelConfig | None = None  # replica shape frozen (dp follows the GPUs, no extra replica)
    rank_mapper: bool = False  # positions take GPUs in rank order instead of the max-reuse matching
    memory_aware: bool = True  # memory-aware migration order (else full GPUs free their old context first)
    move_kv: bool = True  # KV caches of requests in flight are context to keep and move

    def __post_init__(self):
        if self.fixed_shape is not None and not isinstance(self.fixed_shape, ParallelConfig):
            raise ValueError(f"PlannerSwitches: fixed_shape must be a ParallelConfig, got {self.fixed_shape!r}")


class Planner:
    """Runs ConfigOptimizer, DeviceMapper and MigrationPlanner in turn; see types.py for the call sequence."""

    def __init__(self, cost: CostModel, switches: PlannerSwitches = PlannerSwitches(), **optimizer_options):
        """``optimizer_options`` go to ConfigOptimizer (headroom, min_gain, horizon_s, allow_extra)."""
        self.cost, self.switches = cost, switches
        self.optimizer = ConfigOptimizer(cost, fixed_shape=switches.fixed_shape, **optimizer_options)
        self.mapper = DeviceMapper(cost, by_rank=switches.rank_mapper)
        self.migration = MigrationPlanner(cost, memory_aware=switches.memory_aware)
        self.arranger = InterruptionArranger(cost)
        self.instance_of: dict[str, str] = {}
        self.last_choice: Choice | None = None

    def plan(self, gpus: list[GPU], arrival_rate: float, current: ReconfigurationPlan | None = None,
             requests: list[RunningRequest] = (), leaving: list[GPU] = (), slo: float | None = None
             ) -> ReconfigurationPlan:
        """Plan the layout for ``gpus`` at ``arrival_rate`` req/s, migrating from ``current``.

        ``leaving``: GPUs under notice, usable only as migration sources. Returns a plan whose
        ``cannot_serve`` is set (and config None) when no config fits the GPUs.
        Raises ValueError on duplicate GPU ids or a GPU both usable and leaving.
        """
        if not self.switches.move_kv:
            requests = ()
        ids = [g.id for g in gpus]
        if len(set(ids)) != len(ids):
            raise ValueError("plan: duplicate GPU ids")
        if set(ids) & {g.id for g in leaving}:
            raise ValueError("plan: a GPU cannot be both usable and leaving")
        self.instance_of = {g.id: g.instance for g in list(gpus) + list(leaving)}
        cur = current if current is not None and current.config is not None else None
        kept = len(set(ids) & set(cur.placement.values())) if cur else None
        mem = min((g.memory_bytes for g in gpus), default=self.cost.gpu_memory_bytes)
        choice = self.optimizer.choose(len(gpus), arrival_rate, mem,
                                       (cur.config, cur.extra) if cur else None, kept, slo)
        self.last_choice = choice
        if choice.config is None:
            return ReconfigurationPlan(None, {}, [], 0.0, cannot_serve=choice.cannot_serve,
                                       est_throughput=0.0)
        mapping = self.mapper.assign(choice.config, choice.extra, list(gpus), cur, list(requests))
        mig = self.migration.migrate(choice.config, choice.extra, mapping.placement, mapping.inherits, list(gpus),
                                     cur, list(requests), {g.id: g.instance for g in leaving})
        weights = [t for t in mig.transfers if t.tensor != "kv"]
        kv_total = {}
        for t in mig.transfers:
            if t.tensor == "kv":
                kv_total[t.request] = kv_total.get(t.request, 0) + t.nbytes
        by_id = {q.request_id: q for q in requests}
        kv_moved = {r: b / max(1, self.cost.kv_bytes(by_id[r].tokens)) for r, b in kv_total.items()}
        return ReconfigurationPlan(
            choice.config, mapping.placement, mig.transfers, mig.est_seconds, extra=choice.extra,
            inherits=mapping.inherits, est_latency=choice.latency, est_throughput=choice.throughput,
            reused_bytes=int(mapping.reused_bytes), disk_bytes=mig.disk_bytes,
            weights_seconds=estimate_seconds(weights, self.instance_of, self.cost.bandwidth),
            continued=mig.continued, kv_moved=kv_moved, lost_kv=frozenset(mig.lost_kv))

    def arrange(self, now: float, deadline: float | None, requests: list[RunningRequest],
                plan: ReconfigurationPlan, current: ReconfigurationPlan | None) -> InterruptionDecision:
        """InterruptionArranger.arrange with the GPU -> instance map of the last ``plan`` call."""
        return self.arranger.arrange(now, deadline, requests, plan, current, self.instance_of)
