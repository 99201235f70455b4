"""Replica bookkeeping for the controller, and the rank-order grouping the rerouting baseline uses."""
from __future__ import annotations

from spotserve.planner.types import GPU, ParallelConfig, ReconfigurationPlan, RunningRequest


class Replica:
    """One serving pipeline: its shape (dp=1 config), its GPU ids, the batch it runs, when it can serve."""

    __slots__ = ("index", "shape", "gpus", "batch_id", "requests", "ready_t")

    def __init__(self, index: int, shape: ParallelConfig, gpus: list[str], ready_t: float):
        if shape.dp != 1:
            raise ValueError(f"a replica's shape has dp 1, got {shape}")
        if len(gpus) != shape.pp * shape.tp:
            raise ValueError(f"replica {index}: {len(gpus)} GPUs for shape {shape.short()}")
        self.index = index
        self.shape = shape
        self.gpus = gpus
        self.batch_id: int | None = None
        self.requests: list = []
        self.ready_t = ready_t


def group_by_instance(free: list[GPU], size: int) -> list[list[str]]:
    """Split free GPUs into groups of `size`, filling whole instances first (rank order within each).

    Instances with the most free GPUs are used first so a tensor-parallel group stays inside one
    instance when it can; leftovers that cannot make a full group stay free.
    """
    if size <= 0:
        raise ValueError(f"group size must be positive, got {size}")
    by_inst: dict[str, list[str]] = {}
    for g in free:
        by_inst.setdefault(g.instance, []).append(g.id)
    order = sorted(by_inst.values(), key=lambda ids: -len(ids))
    flat = [gid for ids in order for gid in ids]
    n = len(flat) // size
    return [flat[i * size:(i + 1) * size] for i in range(n)]


def unchanged_replicas(current: ReconfigurationPlan | None, plan: ReconfigurationPlan,
                       running: list[RunningRequest] = ()) -> dict[int, int]:
    """new replica index -> old replica index, for the replicas `plan` leaves as they are.

    A replica is unchanged when it keeps its shape and every position (stage, shard) on the same GPU,
    no transfer of the plan lands on any of its GPUs, and no request it runs is continued by another
    new replica (its requests' KV does not move). It may still be a migration source: the migration
    planner never frees the context of a GPU whose position keeps it (a source only spends
    bandwidth). Such a replica can serve through the reconfiguration. Empty when either plan serves
    nothing.
    """
    if current is None or not current.serving or not plan.serving:
        return {}

    def layouts(p: ReconfigurationPlan) -> dict[int, frozenset]:
        out: dict[int, set] = {}
        for pos, g in p.placement.items():
            out.setdefault(pos.replica, set()).add((pos.stage, pos.shard, g))
        return {r: frozenset(v) for r, v in out.items()}

    old_shapes, new_shapes = dict(current.replica_configs()), dict(plan.replica_configs())
    old_of_layout = {lay: r for r, lay in layouts(current).items()}
    receivers = {t.dst for t in plan.transfers}
    continued_on: dict[int, set[int]] = {}  # old replica -> new replicas continuing its requests
    for q in running:
        if q.request_id in plan.continued:
            continued_on.setdefault(q.replica, set()).add(plan.continued[q.request_id])
    out = {}
    for new, lay in layouts(plan).items():
        old = old_of_layout.get(lay)
        if old is None or old_shapes[old] != new_shapes[new] or any(g in receivers for _, _, g in lay):
            continue
        if continued_on.get(old, {new}) - {new}:
            continue  # the plan moves some of its requests to another replica: they must stop
        out[new] = old
    return out
