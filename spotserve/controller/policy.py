"""Policy: the one place where the controller meets the planner and the cost model.

It answers the controller's questions (how long a prefill / decode step takes, which layout to
serve next, when migration must start, how long serving pauses) and turns an approach's switches
into the planner's own (PlannerSwitches): one spotserve.planner.Planner per switch combination, so
every approach runs the same planner code.
"""
from __future__ import annotations

import json
from pathlib import Path

from spotserve.controller.approach import Approach
from spotserve.planner.cost import CostModel, stage_layer_ranges
from spotserve.planner.optimizer import Choice, ConfigOptimizer
from spotserve.planner.planner import Planner, PlannerSwitches
from spotserve.planner.types import GPU, ParallelConfig, ReconfigurationPlan


class _ForcedOptimizer(ConfigOptimizer):
    """The optimizer of a forced reconfiguration (Controller.reconfigure): only the forced replica shape,
    dp from the GPUs it is given. The current config neither holds it back (hysteresis) nor prices it
    (with one shape there is nothing to compare)."""

    def choose(self, n_gpus: int, arrival_rate: float, gpu_memory_bytes: int | None = None, current=None,
               kept_gpus: int | None = None, slo: float | None = None) -> Choice:
        return super().choose(n_gpus, arrival_rate, gpu_memory_bytes)


class Policy:
    """Cost-model latencies and planner decisions, with the approach's switches applied."""

    def __init__(self, cost: CostModel, engine_start_s: float = 0.0, pool_gpus: int | None = None,
                 reconfigure_margin_s: float | None = None):
        """``reconfigure_margin_s``: the fixed cost of a reconfiguration (process groups, engine start)
        that the cost model does not price; migration is planned to end that much before a deadline.
        None: the profile's own figure when it carries one (attribute ``reconfigure_margin_s``), else 0."""
        if engine_start_s < 0:
            raise ValueError(f"engine_start_s must be >= 0, got {engine_start_s}")
        if reconfigure_margin_s is None:
            reconfigure_margin_s = float(getattr(cost.profile, "reconfigure_margin_s", None) or 0.0)
        if not reconfigure_margin_s >= 0:
            raise ValueError(f"reconfigure_margin_s must be >= 0, got {reconfigure_margin_s}")
        self.cost = cost
        self.engine_start_s = engine_start_s
        self.reconfigure_margin_s = reconfigure_margin_s
        self.pool_gpus = pool_gpus
        self.optimizer = ConfigOptimizer(cost)
        self._planners: dict = {}
        self._prefill: dict = {}
        self._step: dict = {}

    # --- latencies (cached: the simulator asks once per batch) ---------------------------------
    def prefill_s(self, shape: ParallelConfig, n: int, prompt_len: float) -> float:
        """Seconds to prefill n prompts of prompt_len tokens on one replica of `shape`."""
        key = (shape.pp, shape.tp, n, shape.micro_batches, int(prompt_len))
        v = self._prefill.get(key)
        if v is None:
            m = min(shape.micro_batches, n)
            v = self._prefill[key] = float(self.cost.prefill_seconds(shape.pp, shape.tp, n, m, int(prompt_len)))
        return v

    def step_s(self, shape: ParallelConfig, n: int) -> float:
        """Seconds of one decode round (every request of the batch gets one token)."""
        key = (shape.pp, shape.tp, n, shape.micro_batches)
        v = self._step.get(key)
        if v is None:
            m = min(shape.micro_batches, n)
            v = self._step[key] = float(self.cost.decode_round_seconds(shape.pp, shape.tp, n, m))
        return v

    # --- decisions ----------------------------------------------------------------------------
    def margin_s(self, grace_s: float) -> float:
        """Seconds before a deadline that migration is planned to end: the reconfiguration margin, at
        most half the grace (``grace_s``: notice to deadline) so a short grace still leaves time to move."""
        return min(self.reconfigure_margin_s, 0.5 * max(grace_s, 0.0))

    def planning_deadline(self, notice_t: float, deadline: float) -> float:
        """The deadline the planner works against for a notice at ``notice_t`` (the real one less the margin)."""
        m = self.margin_s(deadline - notice_t)
        return deadline - m if m else deadline

    def planner(self, approach: Approach, frozen: ParallelConfig | None, forced: bool = False) -> Planner:
        """The Planner for this switch combination (built once); ``forced``: ``frozen`` is a config an
        operator asked for (Controller.reconfigure), taken as it is."""
        if forced and frozen is None:
            raise ValueError("a forced plan needs its config (frozen)")
        sw = self.switches(approach, frozen)
        p = self._planners.get((sw, forced))
        if p is None:
            p = self._planners[(sw, forced)] = Planner(self.cost, sw)
            if forced:
                p.optimizer = _ForcedOptimizer(self.cost, fixed_shape=frozen)
        return p

    @staticmethod
    def switches(approach: Approach, frozen: ParallelConfig | None) -> PlannerSwitches:
        """The planner switches of an approach (``frozen``: its fixed replica shape, if any)."""
        return PlannerSwitches(fixed_shape=frozen, rank_mapper=not approach.mapper,
                               memory_aware=approach.migration_planner, move_kv=approach.arranger)

    def plan(self, gpus: list[GPU], rate: float, current, running, leaving: list[GPU], approach: Approach,
             frozen: ParallelConfig | None, forced: bool = False) -> ReconfigurationPlan:
        """The next layout for `gpus` (`leaving`: GPUs under notice, sources only); ``forced``: the
        replica shape ``frozen`` on every GPU given, whatever the current config."""
        return self.planner(approach, frozen, forced).plan(gpus, rate, current=current, requests=running,
                                                           leaving=leaving)

    def arrange(self, now: float, deadline: float, running, plan: ReconfigurationPlan, current,
                approach: Approach, frozen: ParallelConfig | None, forced: bool = False):
        """When migration must start and how each running request's context survives (``forced`` as
        given to the `plan` call that made ``plan``)."""
        return self.planner(approach, frozen, forced).arrange(now, deadline, running, plan, current)

    def fits(self, config: ParallelConfig, gpu_memory_bytes: int | None = None) -> str | None:
        """Why one replica of ``config`` cannot run on this model and profile (None when it can)."""
        c = self.cost
        if config.tp not in c.tps:
            return f"tp {config.tp} is not profiled for {c.spec.name} (have {c.tps})"
        if config.pp > c.spec.num_layers:
            return f"pp {config.pp} exceeds the {c.spec.num_layers} layers of {c.spec.name}"
        if config.batch not in c.batches:
            return f"batch {config.batch} is not profiled (have {c.batches})"
        mem = c.gpu_memory_bytes if gpu_memory_bytes is None else gpu_memory_bytes
        if not bool(c.feasible(config.pp, config.tp, config.batch, config.micro_batches, mem)):
            return f"one replica {config.short()} does not fit {mem / 2**30:.1f} GiB per GPU"
        return None

    def fixed_shape(self, gpus: list[GPU], rate: float) -> ParallelConfig | None:
        """The replica shape chosen once for the full pool (rerouting, no-optimizer)."""
        n = max(len(gpus), self.pool_gpus or 0)
        choice = self.optimizer.choose(n, rate)
        c = choice.config
        return None if c is None else ParallelConfig(1, c.pp, c.tp, c.batch, c.micro_batches)

    def ready_offsets(self, plan: ReconfigurationPlan, approach: Approach, fresh: bool = False) -> dict[int, float]:
        """Seconds after migration starts at which each new replica can serve.

        The migration planner orders transfers stage by stage from the first, so a replica can
        start a batch once its stage 0 context is in place, provided each later stage s is ready
        when the pipeline reaches it (s prefill stage-times tau later): offset = max_s(ready_s - s*tau),
        with ready_s the busiest-link time of the transfer prefix that completes stage s, plus the
        engine start. A replica that receives nothing serves once its engine started (a kept one,
        untouched, at once: the controller's business). Without the migration planner (no overlap), or for a
        restart from disk, every replica waits for the whole plan.
        """
        est = plan.est_seconds + self.engine_start_s
        shapes = dict(plan.replica_configs())
        if fresh or not approach.migration_planner:
            return {r: est for r in shapes}
        where = {g: (p.replica, p.stage) for p, g in plan.placement.items()}
        inst = {g: g.split("/")[0] for g in where}
        bw = self.cost.bandwidth
        loads: dict[tuple, float] = {}
        ready: dict[tuple[int, int], float] = {}
        worst = 0.0
        for t in plan.transfers:  # busiest-link time of every prefix, in one pass
            dst_inst = inst.get(t.dst) or t.dst.split("/")[0]
            if t.src is None:
                keys = ((("disk", dst_inst), bw["disk_bytes_per_s"]),)
            elif t.src.split("/")[0] == dst_inst:
                keys = ((("pcie_out", t.src), bw["intra_bytes_per_s"]), (("pcie_in", t.dst), bw["intra_bytes_per_s"]))
            else:
                keys = ((("nic_out", t.src.split("/")[0]), bw["inter_bytes_per_s"]),
                        (("nic_in", dst_inst), bw["inter_bytes_per_s"]))
            for k, b in keys:
                loads[k] = loads.get(k, 0.0) + t.nbytes / b
                worst = max(worst, loads[k])
            if t.dst in where:
                ready[where[t.dst]] = worst
        out = {}
        for r, sh in shapes.items():
            tau = self.prefill_s(sh, sh.batch, self.cost.workload.prompt_len) / sh.pp
            offs = [ready[(r, s)] - s * tau for s in range(sh.pp) if (r, s) in ready]
            out[r] = max(0.0, max(offs)) + self.engine_start_s if offs else self.engine_start_s
        return out

    def disk_load_s(self, shape: ParallelConfig) -> float:
        """Seconds for a replica to load its weights from disk (GPUs of one instance share its disk)."""
        c = self.cost
        lo, hi = stage_layer_ranges(c.spec.num_layers, shape.pp)[0]
        per_gpu = ((hi - lo) * c.layer_bytes + c.embed_bytes) / shape.tp
        share = min(shape.pp * shape.tp, c.profile.gpus_per_instance or 4)
        return per_gpu * share / c.bandwidth["disk_bytes_per_s"] + self.engine_start_s


def profile_margin_s(path: str | Path) -> float:
    """The optional ``reconfigure_margin_s`` (seconds, >= 0) of a profile JSON file; 0 when absent.
    Raises ValueError naming the file for unreadable JSON or a bad value."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    value = data.get("reconfigure_margin_s", 0.0) if isinstance(data, dict) else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{path}: field 'reconfigure_margin_s' must be a number >= 0, got {value!r}")
    return float(value)
