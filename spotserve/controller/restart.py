"""A worker process of a replica crashed and is restarted on its slot: re-form that replica as it was.

The instance is not lost (its other workers and the slot's context daemon live on), so nothing moves.
`on_worker_lost`: the replica's batch stops with its streamed tokens kept and the replica takes no
batch. `on_worker_restarted`: the same layout is installed again under a new config, that replica
re-formed (new process groups) and every other one left serving. If the worker does not come back,
the backend reports the instance lost instead (on_reclaim).
"""
from __future__ import annotations


class WorkerRestartMixin:
    """Needs the Controller's replicas, approach, backend, log, _abort_replica and replan."""

    def _replicas_on(self, gpu: str) -> list:
        return [r for r in self.replicas.values() if gpu in r.gpus]

    def on_worker_lost(self, gpu: str) -> bool:
        """The worker process of GPU `gpu` ("INSTANCE/gK") died and is being restarted: its replica's
        batch stops (tokens kept for spotserve) and it serves nothing until on_worker_restarted.
        Returns False when no replica serves on that GPU."""
        hit = self._replicas_on(gpu)
        self.log.emit(self.backend.now(), "worker_lost", gpu=gpu, replica=hit[0].index if hit else None)
        keep = "tokens" if self.approach.mode == "spotserve" and self.approach.arranger else "none"
        for r in hit:
            self._abort_replica(r, keep)
            r.ready_t = float("inf")  # it cannot serve until re-formed
        if hit:
            self.dispatch()  # its requests go to the other replicas meanwhile
        return bool(hit)

    def on_worker_restarted(self, gpu: str) -> bool:
        """The worker of GPU `gpu` is back and holds its context again: re-form its replica with the same
        layout (forced plan; the other replicas stay unchanged). Returns False when no replica serves
        on that GPU (nothing to re-form)."""
        hit = self._replicas_on(gpu)
        self.log.emit(self.backend.now(), "worker_restarted", gpu=gpu, replica=hit[0].index if hit else None)
        if not hit or self.approach.mode == "rerouting":
            return False
        if any(r.batch_id is not None for r in hit):  # not reported lost before: stop its batch now
            self.on_worker_lost(gpu)
        self._restarted.add(gpu)
        self.replan("worker_restarted", force=True)
        return True

    def _not_restarted(self, kept: dict[int, int]) -> dict[int, int]:
        """`kept` (new -> old replica) without the replicas a restarted worker needs re-formed; clears the
        record (the plan being made re-forms them)."""
        gone = self._restarted
        out = {new: old for new, old in kept.items()
               if old not in self.replicas or not gone & set(self.replicas[old].gpus)}
        self._restarted = set()
        return out
