"""Where the KV caches that survive a reconfiguration live, and what their migration moves; mixed into the Controller.

A stopped request keeps its cache (kv_ready) on the replica that ran it, or on the replica the
pending plan continues it on once that plan is installed; a cache left anywhere else is dropped and
the request re-prefills. When migration starts, the plan's KV transfers are settled to the caches
as they are then (the batches decoded on after the plan was made).
"""
from __future__ import annotations

from dataclasses import replace

from spotserve.planner.migration import estimate_seconds
from spotserve.planner.types import ReconfigurationPlan


class KVCacheMixin:
    """Needs the Controller's approach, pending, requests, replicas, policy, backend, _kv_home and _kv_pending."""

    def _keep_for(self, req, decision) -> str:
        """How an interrupted request's context survives under this approach."""
        if self.approach.mode != "spotserve" or not self.approach.arranger:
            return "none"  # baselines and the no-arranger ablation: no KV migration, restart from scratch
        plan = self.pending[1] if self.pending else None
        rid = str(req.id)
        moved = "kv" if plan is not None and rid in plan.continued and rid not in plan.lost_kv else "tokens"
        if decision is None:
            # no deadline (acquisition, rate change): the KV cache moves with the weights if the plan
            # carries it; a notice without a decision (nothing to move to) keeps the committed tokens
            return moved if not self.pending or self.pending[4] is None else "tokens"
        d = decision.by_id().get(rid)
        if d is None or d.action in ("move_kv", "finish"):
            return moved  # "finish": it was expected to end before migration; its cache moves if not
        return "tokens"  # reprefill (prompt + committed tokens) or requeue with committed tokens

    def _home_kv(self, req, replica: int) -> None:
        """Record where the cache of `req` (stopped on `replica`, kv_ready) lives: there, or on the
        replica the pending plan continues it on (its own index when that replica is unchanged)."""
        plan = self.pending[1] if self.pending else None
        new = plan.continued.get(str(req.id)) if plan is not None else None
        if new is None:
            self._kv_home[req.id] = replica
        elif new in self.pending[5]:  # continued on an unchanged replica: its cache stays
            self._kv_home[req.id] = self.pending[5][new]
        else:
            self._kv_pending[req.id] = new

    def _settled_kv(self, plan: ReconfigurationPlan) -> ReconfigurationPlan:
        """The plan's KV transfers as the caches are when migration starts: those of requests that
        finished (or lost their cache) while draining are dropped, and each remaining one is sized for
        the positions the backend reports its cache holds now (Backend.kv_tokens: the batch decoded on
        after the plan was made); only they count in the migration time."""
        if not any(t.tensor == "kv" for t in plan.transfers):
            return plan
        keep = {str(rid) for rid in self.requests.queue if self.requests.requests[rid].kv_ready}
        per_token = self.policy.cost.kv_bytes_per_token_layer
        sizes: dict[str, int | None] = {}
        moved, changed = [], False
        for t in plan.transfers:
            if t.tensor != "kv":
                moved.append(t)
                continue
            if t.request not in keep:
                changed = True
                continue
            if t.request not in sizes:
                sizes[t.request] = self.backend.kv_tokens(int(t.request))
            tokens = sizes[t.request]
            if tokens == 0:  # nothing cached after all: nothing to move
                changed = True
                continue
            if tokens is not None:
                lo, hi, den = t.slice or (0, 1, 1)
                nbytes = int(round((hi - lo) * tokens * per_token / den))
                if nbytes != t.nbytes:
                    t, changed = replace(t, nbytes=nbytes), True
            moved.append(t)
        if not changed:
            return plan
        est = estimate_seconds(moved, {g: g.split("/")[0] for t in moved for g in (t.src, t.dst) if g},
                               self.policy.cost.bandwidth)
        return replace(plan, transfers=moved, est_seconds=est)

    def _move_kv_homes(self, kept: dict[int, int]) -> None:
        """After a layout change: queued caches the plan moved live on their new replica; caches left
        on an unchanged replica follow its new index; any other cache is gone (re-prefill instead)."""
        renamed = {o: n for n, o in kept.items()}
        homes = {}
        for rid, old in self._kv_home.items():
            if old in renamed:
                homes[rid] = renamed[old]
        homes.update(self._kv_pending)
        self._kv_pending = {}
        self._kv_home = {}
        for rid in self.requests.queue:
            req = self.requests.requests[rid]
            if not req.kv_ready:
                continue
            if rid in homes and homes[rid] in self.replicas:
                self._kv_home[rid] = homes[rid]
            else:
                req.kv_ready = False
