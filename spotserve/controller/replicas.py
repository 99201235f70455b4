"""Replica bookkeeping for the controller, and the rank-order grouping the rerouting baseline uses."""
from __future__ import annotations

from spotserve.planner.types import GPU, ParallelConfig


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
