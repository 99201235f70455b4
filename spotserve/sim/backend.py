"""SimBackend: a discrete-event backend; batches, migrations and disk loads take modelled time.

One event per batch (not per decode step): a batch's token times are known in closed form from
the cost model (prefill, then one token per decode step), so a stop at any time is answered
exactly at the last step boundary before it. The controller and planner above it are the real ones.
Replicas a plan leaves unchanged keep their batch through a reconfiguration (keeps_unchanged_replicas);
sending context to other replicas costs them nothing here: the copies run on the GPUs' copy engines
and NICs while decoding is compute-bound (the model ignores that contention).
With a StepJitter (sim/jitter.py, measured by the live-path calibration) each batch's prefill and
step times are scaled by one measured batch's ratios, drawn with a seeded RNG: the run stays
deterministic for a given seed, and without a jitter nothing is drawn (the paper-scale model).
"""
from __future__ import annotations

import heapq
import math
import random
from typing import Callable

from spotserve.controller.backend import Backend, Progress
from spotserve.planner.types import ParallelConfig, ReconfigurationPlan
from spotserve.sim.jitter import StepJitter


class SimBatch:
    """Timing of one batch: starts at t0, prefill P (0 if every request kept its KV), then steps of S."""

    __slots__ = ("replica", "batch_id", "reqs", "t0", "P", "S", "steps", "prefilled", "end_t", "stop_seq")

    def __init__(self, replica, batch_id, reqs, t0, P, S, prefilled):
        self.replica = replica  # changes when a plan renumbers the (unchanged) replica running it
        self.batch_id = batch_id
        self.reqs = reqs
        self.t0, self.P, self.S = t0, P, S
        self.prefilled = prefilled
        # decode steps each request needs: the prefill itself yields the first token
        self.steps = [r.remaining - 1 if pf else r.remaining for r, pf in zip(reqs, prefilled)]
        self.end_t = t0 + P + max(self.steps) * S
        self.stop_seq = 0

    def progress(self, cut: float) -> list[Progress]:
        """Tokens each request produced by time `cut` (a step boundary or the batch end)."""
        out = []
        dec0 = self.t0 + self.P
        if cut + 1e-12 < dec0:
            done_steps, prefill_done = 0, False
        else:
            done_steps, prefill_done = int(math.floor((cut - dec0) / self.S + 1e-9)) if self.S > 0 else 10**9, True
        for r, pf, need in zip(self.reqs, self.prefilled, self.steps):
            if pf:
                if not prefill_done:
                    out.append(Progress(r.id, 0, None, None))
                    continue
                k = 1 + min(done_steps, need)
                first = dec0
            else:
                k = min(done_steps, need)
                first = dec0 + self.S if k else None
            fin = dec0 + need * self.S if k == need + (1 if pf else 0) else None
            out.append(Progress(r.id, k, first, fin))
        return out


class SimBackend(Backend):
    """Event queue + modelled cluster. `policy` supplies prefill/step latencies; `controller` the policy."""

    keeps_unchanged_replicas = True

    def __init__(self, policy, jitter: StepJitter | None = None, seed: int = 0):
        self.policy = policy
        self.jitter = jitter
        self.rng = random.Random(seed)
        self._idle_from: dict[int, float] = {}  # replica -> when it last became idle (cold batches)
        self.t = 0.0
        self._heap: list = []
        self._seq = 0
        self.batches: dict[int, SimBatch] = {}
        self.controller = None
        self.events_processed = 0

    def attach(self, controller) -> None:
        self.controller = controller
        controller.attach(self)

    # --- clock and queue ----------------------------------------------------------------------
    def now(self) -> float:
        return self.t

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        self._push(max(t, self.t), fn)

    def _push(self, t: float, fn, *args) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, args))

    def next_time(self) -> float:
        return self._heap[0][0] if self._heap else math.inf

    def step(self) -> None:
        """Process the earliest event."""
        t, _, fn, args = heapq.heappop(self._heap)
        self.t = t
        self.events_processed += 1
        fn(*args)

    # --- commands -----------------------------------------------------------------------------
    def start_batch(self, replica: int, shape: ParallelConfig, batch_id: int, requests: list) -> None:
        if replica in self.batches:
            raise RuntimeError(f"replica {replica} already runs batch {self.batches[replica].batch_id}")
        prefilled = [not r.kv_ready for r in requests]
        n_pf = sum(prefilled)
        P = 0.0
        if n_pf:
            prompt = sum(r.input_len + r.committed for r, pf in zip(requests, prefilled) if pf) / n_pf
            P = self.policy.prefill_s(shape, n_pf, prompt)
        S = self.policy.step_s(shape, len(requests))
        if self.jitter is not None:
            fp, fd = self.jitter.draw(self.rng, self.t - self._idle_from.get(replica, -math.inf))
            P, S = P * fp, S * fd
        b = SimBatch(replica, batch_id, requests, self.t, P, S, prefilled)
        self.batches[replica] = b
        self._push(b.end_t, self._finish, b, 0)

    def _current(self, b: SimBatch, stop_seq: int) -> bool:
        """Whether an event of batch `b` still counts (not superseded by a stop or an abort)."""
        return self.batches.get(b.replica) is b and b.stop_seq == stop_seq

    def _finish(self, b: SimBatch, stop_seq: int) -> None:
        if not self._current(b, stop_seq):
            return
        del self.batches[b.replica]
        self._idle_from[b.replica] = b.end_t
        self.controller.on_batch_done(b.replica, b.batch_id, b.progress(b.end_t), False)

    def _stopped(self, b: SimBatch, stop_seq: int, cut: float) -> None:
        if not self._current(b, stop_seq):
            return
        del self.batches[b.replica]
        self._idle_from[b.replica] = cut
        self.controller.on_batch_done(b.replica, b.batch_id, b.progress(cut), True)

    def stop_batch(self, replica: int, batch_id: int, at: float) -> None:
        b = self.batches.get(replica)
        if b is None or b.batch_id != batch_id:
            return
        at = max(at, self.t)
        if at >= b.end_t:
            return  # it finishes before it would be stopped
        dec0 = b.t0 + b.P
        if at < dec0:
            cut = at  # stopped during prefill: the prefill is abandoned
        else:
            cut = dec0 + math.floor((at - dec0) / b.S + 1e-9) * b.S
        b.stop_seq += 1
        self._push(max(cut, self.t), self._stopped, b, b.stop_seq, cut)

    def abort_batch(self, replica: int, batch_id: int) -> list[Progress]:
        b = self.batches.get(replica)
        if b is None or b.batch_id != batch_id:
            return []
        del self.batches[replica]
        self._idle_from[replica] = self.t
        return b.progress(self.t)

    def execute_plan(self, plan: ReconfigurationPlan, plan_id: int, stall_s: float,
                     keep: dict[int, int] | None = None) -> None:
        """The plan takes `stall_s`; batches of the `keep` replicas (new -> old index) run on, renumbered."""
        keep = keep or {}
        carried = {old for old in keep.values()}
        stray = sorted(set(self.batches) - carried)
        if stray:
            raise RuntimeError(f"execute_plan: replicas {stray} still run a batch but the plan changes them")
        moved = {new: self.batches[old] for new, old in keep.items() if old in self.batches}
        for new, b in moved.items():
            b.replica = new
        self.batches = moved
        # kept replicas stay as warm as they were; every other one is rebuilt by the plan (idle from now)
        idle = {r: self.t for r, _ in plan.replica_configs()}
        idle.update({new: self._idle_from[old] for new, old in keep.items() if old in self._idle_from})
        self._idle_from = idle
        self._push(self.t + stall_s, self.controller.on_plan_done, plan_id)

    def load_replica(self, replica: int, shape: ParallelConfig, gpus: list[str], load_id: int,
                     seconds: float) -> None:
        self._idle_from[replica] = self.t
        self._push(self.t + seconds, self.controller.on_plan_done, load_id)
