"""Planner: one call from the GPUs now available to a ReconfigurationPlan (optimizer -> mapper -> migration)."""
from __future__ import annotations

from spotserve.planner.arranger import InterruptionArranger
from spotserve.planner.cost import CostModel
from spotserve.planner.mapper import DeviceMapper
from spotserve.planner.migration import MigrationPlanner, estimate_seconds
from spotserve.planner.optimizer import Choice, ConfigOptimizer
from spotserve.planner.types import GPU, InterruptionDecision, ReconfigurationPlan, RunningRequest


class Planner:
    """Runs ConfigOptimizer, DeviceMapper and MigrationPlanner in turn; see types.py for the call sequence."""

    def __init__(self, cost: CostModel, optimizer: ConfigOptimizer | None = None):
        self.cost = cost
        self.optimizer = optimizer or ConfigOptimizer(cost)
        self.mapper = DeviceMapper(cost)
        self.migration = MigrationPlanner(cost)
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
