"""InterruptionArranger: after a notice, how many more decode steps each request takes and how its context survives.

Given the migration plan to the new layout, migration must start at ``migrate_at = now + k * d`` (d:
the slowest old replica's decode round) and finish by the deadline:

    now + k * d + weights_seconds + kv_seconds(k) <= deadline

where kv_seconds(k) is, per new replica, the sum over its requests that ship their cache of
moved_fraction * kv_bytes(tokens + k) / link bandwidth (the busiest replica counts; weights and KV
share the links, so they add). Per request the cheaper way to survive is chosen: shipping the KV
(its time as above) or dropping it and re-prefilling prompt + committed tokens on the destination
replica (cost model prefill of one request). If no k >= 0 fits, the requests with the costliest
caches switch to re-prefill until it fits. A request that finishes within k steps needs nothing;
one with no destination replica (or no config at all) is re-queued with its committed tokens. With
no notice (deadline None) the same per-request choice is made at once (k = 0) from what survives.
Call ``arrange`` again at every decode step: it is a pure function of the current state.
"""
from __future__ import annotations

import math
from collections import defaultdict

from spotserve.planner.cost import CostModel
from spotserve.planner.types import InterruptionDecision, ReconfigurationPlan, RequestDecision, RunningRequest


class InterruptionArranger:
    """Per-request decisions between a notice and its deadline."""

    def __init__(self, cost: CostModel):
        self.cost = cost

    def _link_bw(self, plan: ReconfigurationPlan, instance_of: dict[str, str]) -> dict[str, float]:
        """Bandwidth of the slowest link each request's KV crosses."""
        bw = self.cost.bandwidth
        out: dict[str, float] = {}
        for t in plan.transfers:
            if t.tensor != "kv":
                continue
            same = instance_of.get(t.src, "?src") == instance_of.get(t.dst, "?dst")
            b = bw["intra_bytes_per_s"] if same else bw["inter_bytes_per_s"]
            out[t.request] = min(out.get(t.request, math.inf), b)
        return out

    def arrange(self, now: float, deadline: float | None, requests: list[RunningRequest],
                plan: ReconfigurationPlan, current: ReconfigurationPlan | None,
                instance_of: dict[str, str] | None = None) -> InterruptionDecision:
        """Decide for each running request; ``current`` is the layout serving them now, ``plan`` the
        one to migrate to, ``instance_of`` gpu id -> instance id (for link speeds). Raises ValueError
        when the deadline is already past."""
        if deadline is not None and deadline < now:
            raise ValueError(f"arrange: deadline {deadline} is before now {now}")
        c = self.cost
        shapes = dict(current.replica_configs()) if current is not None and current.config else {}
        new_shapes = dict(plan.replica_configs())
        d = max((float(c.decode_round_seconds(s.pp, s.tp, s.batch, s.micro_batches)) for s in shapes.values()),
                default=0.0)
        link = self._link_bw(plan, instance_of or {})
        kv_per_token = c.kv_bytes_per_token_layer * c.spec.num_layers

        move_cost, reprefill_cost = {}, {}
        actions: dict[str, str] = {}
        for q in requests:
            if not plan.serving or q.request_id not in plan.continued:
                actions[q.request_id] = "requeue"
                continue
            dst = new_shapes[plan.continued[q.request_id]]
            reprefill_cost[q.request_id] = float(c.prefill_seconds(dst.pp, dst.tp, 1, 1, q.prompt_len + q.committed))
            frac = plan.kv_moved.get(q.request_id, 0.0)
            if q.request_id in plan.lost_kv:
                actions[q.request_id] = "reprefill"
                continue
            bw = link.get(q.request_id, c.bandwidth["inter_bytes_per_s"])
            move_cost[q.request_id] = (frac * kv_per_token / bw)  # seconds per cached token
            actions[q.request_id] = "move_kv" if move_cost[q.request_id] * q.tokens <= reprefill_cost[q.request_id] \
                else "reprefill"
        by_id = {q.request_id: q for q in requests}

        def kv_seconds(k: int, finishing: set[str]) -> float:
            per_rep: dict[int, float] = defaultdict(float)
            for rid, a in actions.items():
                if a == "move_kv" and rid not in finishing:
                    per_rep[plan.continued[rid]] += move_cost[rid] * (by_id[rid].tokens + k)
            return max(per_rep.values(), default=0.0)

        w = plan.weights_seconds
        k, finishing = 0, set()
        if deadline is not None and plan.serving and d > 0:
            # The plan's own estimate (busiest link over weights and KV together) can exceed weights +
            # per-replica KV time when KV and weights share a link: never plan for less than it.
            slack = deadline - now - max(w, plan.est_seconds - kv_seconds(0, set()))
            while True:
                k = self._max_steps(slack, d, lambda kk: kv_seconds(kk, finishing))
                if k is None:  # even stopping now is too late: cheapest caches first keep moving
                    movers = sorted((r for r, a in actions.items() if a == "move_kv" and r not in finishing),
                                    key=lambda r: -move_cost[r] * by_id[r].tokens)
                    if not movers:
                        k = 0
                        break
                    actions[movers[0]] = "reprefill"
                    continue
                done = {r for r, q in by_id.items() if q.remaining <= k and actions[r] != "requeue"}
                if done <= finishing:
                    break
                finishing |= done
        elif deadline is not None and not plan.serving and d > 0:
            k = max(0, int(math.floor((deadline - now) / d)))  # nothing to move: decode until the end
        out = []
        for q in requests:
            a = actions[q.request_id]
            steps = min(k, q.remaining)
            if q.remaining <= k and deadline is not None:
                a, steps = "finish", q.remaining
            est = move_cost.get(q.request_id, 0.0) * (q.tokens + steps) if a == "move_kv" else \
                reprefill_cost.get(q.request_id, 0.0) if a == "reprefill" else 0.0
            out.append(RequestDecision(q.request_id, steps, a, est))
        return InterruptionDecision(out, now + k * d, w)

    @staticmethod
    def _max_steps(slack: float, d: float, kv_seconds) -> int | None:
        """Largest k >= 0 with k * d + kv_seconds(k) <= slack (kv_seconds is affine in k); None if none."""
        base = kv_seconds(0)
        if base > slack + 1e-12:
            return None
        slope = d + (kv_seconds(1) - base)
        k = int(math.floor((slack - base) / slope + 1e-9))
        while k > 0 and k * d + kv_seconds(k) > slack + 1e-12:
            k -= 1
        return max(k, 0)
