"""The rerouting baseline's replica bookkeeping, mixed into the Controller.

Shape fixed for the full pool; a replica that loses a GPU is dropped (its requests restart on
other replicas) and free GPUs are grouped into new replicas that load their weights from disk.
"""
from __future__ import annotations

from spotserve.controller.replicas import Replica, group_by_instance
from spotserve.planner.types import ParallelConfig


class ReroutingMixin:
    """Needs the Controller's replicas, policy, backend, log, _gpus, _frozen_shape, _abort_replica, dispatch."""

    def _reroute_fill(self) -> None:
        """Build replicas of the fixed shape from free GPUs of ready (or noticed) instances."""
        now = self.backend.now()
        gpus = self._gpus(noticed=False) + self._gpus(noticed=True)
        shape = self._frozen_shape(gpus)
        if shape is None:
            return
        used = {g for r in self.replicas.values() for g in r.gpus}
        free = [g for g in gpus if g.id not in used]
        one = ParallelConfig(1, shape.pp, shape.tp, shape.batch, shape.micro_batches)
        for group in group_by_instance(free, shape.pp * shape.tp):
            # never reuse an index: a late load report must not wake a newer replica
            self._next_replica = idx = max(getattr(self, "_next_replica", -1), max(self.replicas, default=-1)) + 1
            # Warm: loaded before the run starts (t=0 in the simulator; a live cluster's start set
            # joins a little later, up to warm_until, and only its first fill is warm).
            warm = self.warm_start and (now == 0.0 or (not getattr(self, "_rerouted", False) and now <= self.warm_until))
            secs = 0.0 if warm else self.policy.disk_load_s(one)
            self.replicas[idx] = Replica(idx, one, group, float("inf"))
            self.log.emit(now, "replica_load", replica=idx, gpus=len(group), seconds=round(secs, 4), warm=warm)
            if not warm:
                self.reconfigurations += 1
                self.stall_s += secs
            self.backend.load_replica(idx, one, group, idx, secs)
        self._rerouted = True

    def _reroute_loss(self, hit: list) -> None:
        """Drop the replicas that lost a GPU; their requests restart elsewhere; rebuild from free GPUs."""
        for r in hit:
            self._abort_replica(r, "none")
            del self.replicas[r.index]
            self.log.emit(self.backend.now(), "replica_drop", replica=r.index)
        self._reroute_fill()
        self.dispatch()

    def _reroute_loaded(self, replica: int) -> None:
        r = self.replicas.get(replica)
        if r is not None:
            r.ready_t = self.backend.now()
            self.log.emit(self.backend.now(), "replica_ready", replica=replica)
        self.dispatch()
