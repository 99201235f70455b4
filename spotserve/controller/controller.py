"""Controller: turns arrivals, availability changes and batch results into commands for a backend.

One controller serves every approach (approach.py); planner decisions come through a Policy.
Phases: `serving` -> on a change, `draining` (running batches keep decoding until the arranger's
migrate_at) -> `migrating` (context moves; each new replica serves as soon as its own context is
in place) -> `serving`. Only the replicas the plan changes (new GPUs or shape, or context to
receive) drain and pause; an unchanged replica (replicas.unchanged_replicas) keeps serving
throughout, when the backend supports it (Backend.keeps_unchanged_replicas) and for spotserve and
its ablations (the reparallelization baseline restarts everything by definition). A resumable KV
cache is resumed only on the replica that holds it. Changes at the same instant are planned once;
a change that arrives while migrating is planned right after. `reconfigure` forces the next
plan's config (operators, benchmarks); the migration is the same. Rerouting's replica bookkeeping
lives in rerouting.py, that of surviving KV caches in kvcache.py, the re-forming of a replica whose
crashed worker was restarted in place in restart.py.
"""
from __future__ import annotations

from spotserve.controller.approach import Approach
from spotserve.controller.backend import Backend, BackendEvents, Progress
from spotserve.controller.events import EventLog
from spotserve.controller.instances import ONDEMAND, SPOT, InstanceManager
from spotserve.controller.kvcache import KVCacheMixin
from spotserve.controller.replicas import Replica, unchanged_replicas
from spotserve.controller.requests import RUNNING, RequestManager
from spotserve.controller.rerouting import ReroutingMixin
from spotserve.controller.restart import WorkerRestartMixin
from spotserve.planner.types import GPU, ParallelConfig, ReconfigurationPlan, RunningRequest

SERVING, DRAINING, MIGRATING = "serving", "draining", "migrating"


class Controller(KVCacheMixin, ReroutingMixin, WorkerRestartMixin, BackendEvents):
    """The policy side of a run. In: on_* events; out: Backend commands and the request table.

    warm_start: the first layout is taken as loaded before time 0 (the paper's runs start warm).
    `warm_until` (default 0.0) extends that to a first layout installed up to that time: a live
    cluster's start set joins a few seconds into its clock and is loaded while it starts.
    """

    def __init__(self, policy, approach: Approach, instances: InstanceManager, requests: RequestManager,
                 rate: float, log: EventLog | None = None, warm_start: bool = True):
        if rate < 0:
            raise ValueError(f"arrival rate must be >= 0, got {rate}")
        self.policy, self.approach = policy, approach
        self.instances, self.requests = instances, requests
        self.rate = rate
        self.log = log or EventLog()
        self.warm_start = warm_start
        self.warm_until = 0.0
        self.backend: Backend | None = None
        self.plan: ReconfigurationPlan | None = None  # the layout now served
        self.held: ReconfigurationPlan | None = None  # held but not served yet (adopt_layout)
        self.replicas: dict[int, Replica] = {}
        self.phase = SERVING
        self.pending: tuple | None = None  # (seq, plan, decision, migrate_at, deadline, kept: new -> old replica)
        self._seq = 0
        self._replan_after = False
        self._replan_due: tuple[list[str], bool] | None = None
        self._batch_seq = 0
        self._fixed_shape: ParallelConfig | None = None  # rerouting / no-optimizer
        self._forced: ParallelConfig | None = None  # reconfigure(): the config the next plan takes
        self._ever_served = False
        self.reconfigurations = 0
        self.stall_s = 0.0
        # queued requests whose KV cache survives: the replica holding it (installed layout), and the
        # new replica the pending plan moves it to (valid once that plan is installed)
        self._kv_home: dict[int, int] = {}
        self._kv_pending: dict[int, int] = {}
        self._restarted: set[str] = set()  # GPUs whose restarted worker needs its replica re-formed (restart.py)

    def attach(self, backend: Backend) -> None:
        self.backend = backend

    # --- intake -------------------------------------------------------------------------------
    def on_arrival(self, rid: int, input_len: int, output_len: int) -> None:
        """A request arrived: register it and start it if a replica is idle."""
        self.requests.arrive(rid, self.backend.now(), input_len, output_len)
        self.dispatch()

    def on_rate(self, rate: float) -> None:
        """The required / observed arrival rate changed."""
        self.rate = rate
        self.log.emit(self.backend.now(), "rate", rate=rate)
        if self.approach.mode != "rerouting" and self.approach.optimizer:
            self.replan("rate")

    # --- availability -------------------------------------------------------------------------
    def on_instance_added(self, name: str, ondemand: bool = False) -> None:
        """The cloud gave us an instance; it is usable after its start-up delay."""
        now = self.backend.now()
        inst = self.instances.acquire(name, now, ONDEMAND if ondemand else SPOT)
        self.log.emit(now, "acquire", instance=name, kind=inst.kind, ready_t=inst.ready_t)
        self.backend.call_at(inst.ready_t, lambda: self.on_instance_ready(name))

    def on_instance_ready(self, name: str) -> None:
        now = self.backend.now()
        if self.instances.instances[name].state != "starting":
            return  # reclaimed while starting
        self.instances.mark_ready(name, now)
        self.log.emit(now, "ready", instance=name)
        self.replan("ready")

    def on_notice(self, name: str, deadline: float) -> None:
        """A reclaim notice: spotserve plans now; the baselines wait for the loss."""
        now = self.backend.now()
        inst = self.instances.notice(name, now, deadline)
        self.log.emit(now, "notice", instance=name, deadline=deadline)
        if self.approach.uses_notice and inst.state == "noticed":
            self.replan("notice")

    def on_reclaim(self, name: str) -> None:
        """The instance is gone: whatever still ran on its GPUs is lost."""
        now = self.backend.now()
        inst = self.instances.reclaim(name, now)
        self.log.emit(now, "reclaim", instance=name)
        lost = set(self._gpu_ids(inst))
        hit = [r for r in self.replicas.values() if lost & set(r.gpus)]
        if self.approach.mode == "rerouting":
            self._reroute_loss(hit)
            return
        if not hit:
            return
        # a loss the plan did not cover (no notice, a baseline, or a migration slower than the grace)
        keep = "tokens" if self.approach.mode == "spotserve" and self.approach.arranger else "none"
        for r in hit:
            self._abort_replica(r, keep)
            r.ready_t = float("inf")  # it cannot serve any more
        self.replan("reclaim", force=True)

    # --- planning -----------------------------------------------------------------------------
    @staticmethod
    def _gpu_ids(inst) -> list[str]:
        return [f"{inst.name}/g{i}" for i in range(len(inst.gpu_ids))]

    def _gpus(self, noticed: bool) -> list[GPU]:
        mem = self.instances.config.gpu_memory_bytes
        insts = self.instances.noticed() if noticed else self.instances.ready()
        return [GPU(f"{i.name}/g{k}", i.name, k, mem) for i in insts for k in range(len(i.gpu_ids))]

    def _running(self) -> list[RunningRequest]:
        """Requests of running batches as the planner sees them: the tokens produced so far when the
        backend can tell (Backend.live_tokens), else those committed at batch start."""
        out = []
        for r in self.replicas.values():
            live = self.backend.live_tokens(r.index, r.batch_id) if r.batch_id is not None else {}
            for q in r.requests:
                if q.state == RUNNING:
                    done = min(max(q.committed, live.get(q.id, 0)), q.output_len)
                    out.append(RunningRequest(str(q.id), r.index, q.input_len, q.input_len + done, done,
                                              q.output_len - done))
        return out

    def _earliest_deadline(self) -> float | None:
        """The earliest deadline, less the policy's reconfiguration margin, of a noticed instance that
        serves (never before now: a replan inside the margin plans for right away)."""
        used = {g for r in self.replicas.values() for g in r.gpus}
        ds = [self.policy.planning_deadline(i.notice_t, i.deadline)
              for i in self.instances.noticed() if used & set(self._gpu_ids(i))]
        return max(min(ds), self.backend.now()) if ds else None

    def adopt_layout(self, plan: ReconfigurationPlan) -> None:
        """A layout the GPUs already hold that no replica serves yet (workers adopted after a controller
        restart): the first plan migrates from it, so the mapper keeps their context where it is; the
        plan is then installed as usual. Raises ValueError once a layout is served or for a plan
        that serves nothing."""
        if self.plan is not None or self.replicas:
            raise ValueError("adopt_layout: a layout is served already")
        if not plan.serving:
            raise ValueError("adopt_layout: the held layout has no config")
        self.held = plan
        self.log.emit(self.backend.now() if self.backend else 0.0, "held", config=plan.config.short(),
                      extra=plan.extra.short() if plan.extra else None, gpus=len(plan.placement))

    def reconfigure(self, config: ParallelConfig, reason: str = "manual") -> bool:
        """Move to `config` now (an operator's or a benchmark's choice) through the usual migration.

        The next plan takes exactly `config`: its replica shape on dp * pp * tp of the ready GPUs (those
        the served layout uses first, so their context stays), whatever the optimizer would choose and
        whatever its hysteresis would keep; later plans are the optimizer's again. Returns False (and
        does nothing) when `config` is what is served already.
        Raises ValueError under rerouting (its shape is fixed), when fewer GPUs are ready than `config`
        needs, or when one replica of `config` does not fit (tp or batch not profiled, memory).
        """
        if self.approach.mode == "rerouting":
            raise ValueError("reconfigure: the rerouting baseline keeps one fixed replica shape")
        ready = self._gpus(noticed=False)
        if config.world_size > len(ready):
            raise ValueError(f"reconfigure: {config.short()} needs {config.world_size} GPUs, {len(ready)} are ready")
        why = self.policy.fits(config, min(g.memory_bytes for g in ready))
        if why is not None:
            raise ValueError(f"reconfigure: {why}")
        now = self.backend.now()
        if self.plan is not None and self.plan.config == config and self.plan.extra is None and \
                self.phase == SERVING:
            self.log.emit(now, "reconfigure", config=config.short(), reason=reason, unchanged=True)
            return False
        self._forced = config
        self.log.emit(now, "reconfigure", config=config.short(), reason=reason, unchanged=False)
        self.replan(reason, force=True)
        return True

    def _forced_gpus(self, gpus: list[GPU], config: ParallelConfig) -> tuple[list[GPU], list[GPU]]:
        """(the dp * pp * tp GPUs a forced config runs on, the others): the served layout's GPUs first, in
        position order (whole replicas, so their context stays), then the rest in order."""
        base = self.plan or self.held
        rank = {g: i for i, (_, g) in enumerate(sorted(base.placement.items()))} if base else {}
        ordered = sorted(gpus, key=lambda g: rank.get(g.id, len(rank)))
        return ordered[:config.world_size], ordered[config.world_size:]

    def replan(self, reason: str, force: bool = False) -> None:
        """Ask for a plan; every request made at the same instant is answered by one plan."""
        if self.backend is None:
            raise RuntimeError("controller has no backend attached")
        if self._replan_due is not None:
            self._replan_due[0].append(reason)
            self._replan_due = (self._replan_due[0], self._replan_due[1] or force)
            return
        self._replan_due = ([reason], force)
        self.backend.call_at(self.backend.now(), self._replan_now)

    def _replan_now(self) -> None:
        reasons, force = self._replan_due
        self._replan_due = None
        if self.approach.mode == "rerouting":
            self._reroute_fill()
            return
        if self.phase == MIGRATING:
            self._replan_after = True
            return
        if self.approach.mode == "reparallelization" and set(reasons) == {"notice"}:
            return
        self._plan("+".join(dict.fromkeys(reasons)), force)

    def _plan(self, reason: str, force: bool) -> None:
        """Plan for the GPUs that will remain; start draining towards the new layout if it differs."""
        now = self.backend.now()
        fresh = self.approach.mode == "reparallelization"
        forced, self._forced = self._forced, None
        gpus = self._gpus(noticed=False)
        leaving = self._gpus(noticed=True) if self.approach.mode == "spotserve" else []
        running = self._running()
        if forced is not None and forced.world_size > len(gpus):
            self.log.emit(now, "reconfigure_dropped", config=forced.short(), gpus=len(gpus))  # GPUs lost since
            forced = None
        if forced is not None:
            gpus, spare = self._forced_gpus(gpus, forced)
            if self.approach.mode == "spotserve":
                leaving = leaving + spare  # no position, but their context can still be sent
        frozen = forced or self._frozen_shape(gpus + leaving)
        current = None if fresh else (self.plan or self.held)
        plan = self.policy.plan(gpus, self.rate, current, running, leaving, self.approach,
                                frozen, forced=forced is not None)
        if plan.cannot_serve:
            self.log.emit(now, "cannot_serve", reason=plan.cannot_serve, trigger=reason, gpus=len(gpus))
            if (self.plan is None and not self.replicas) or forced is not None:
                return  # a forced config that cannot serve leaves the served layout as it is
        elif self.plan is not None and not force and (
                self._same_layout(plan, running) or
                (fresh and plan.config == self.plan.config and plan.extra == self.plan.extra)):
            return  # nothing changes (the reparallelization baseline restarts only for another config)
        self._seq += 1
        kept = self._not_restarted(unchanged_replicas(self.plan, plan, running) if self._keeps_serving() else {})
        kept_old = set(kept.values())
        deadline = self._earliest_deadline() if self.approach.mode == "spotserve" else None
        decision = None
        migrate_at = now
        if deadline is not None and self.approach.arranger and plan.serving and self.replicas:
            moving = [q for q in running if q.replica not in kept_old]  # requests of unchanged replicas go on
            decision = self.policy.arrange(now, deadline, moving, plan, self.plan, self.approach, frozen,
                                           forced=forced is not None)
            migrate_at = min(max(now, decision.migrate_at), deadline)
        elif deadline is not None and not plan.serving:
            migrate_at = deadline  # nothing to move to: keep serving until the instances go
        self.pending = (self._seq, plan, decision, migrate_at, deadline, kept)
        self.phase = DRAINING
        self.log.emit(now, "plan", trigger=reason, config=plan.config.short() if plan.config else None,
                      extra=plan.extra.short() if plan.extra else None, cannot_serve=plan.cannot_serve,
                      est_seconds=round(plan.est_seconds, 4), migrate_at=round(migrate_at, 4),
                      deadline=deadline, transfers=len(plan.transfers), disk_bytes=plan.disk_bytes,
                      reused_bytes=plan.reused_bytes, gpus=len(gpus), kept=sorted(kept_old),
                      est_latency=round(plan.est_latency, 4) if plan.est_latency not in (None, float("inf")) else None)
        for r in self.replicas.values():
            if r.batch_id is not None and r.index not in kept_old:
                self.backend.stop_batch(r.index, r.batch_id, migrate_at)
        seq = self._seq
        self.backend.call_at(migrate_at, lambda: self._maybe_migrate(seq))

    def _keeps_serving(self) -> bool:
        """Whether unchanged replicas serve through a reconfiguration (spotserve and its ablations)."""
        return self.approach.mode == "spotserve" and getattr(self.backend, "keeps_unchanged_replicas", False)

    def _kept_old(self) -> set[int]:
        """Old indices of the replicas the pending plan leaves unchanged (they neither drain nor pause)."""
        return set(self.pending[5].values()) if self.pending else set()

    def _frozen_shape(self, gpus: list[GPU]) -> ParallelConfig | None:
        if self.approach.optimizer:
            return None
        if self._fixed_shape is None:
            self._fixed_shape = self.policy.fixed_shape(gpus, self.rate)
        return self._fixed_shape

    def _same_layout(self, plan: ReconfigurationPlan, running: list[RunningRequest]) -> bool:
        """Whether `plan` serves the same replicas on the same GPUs (possibly renumbered): nothing to do."""
        if plan.config != self.plan.config or plan.extra != self.plan.extra:
            return False
        if plan.placement == self.plan.placement:
            return True
        n = len(plan.replica_configs())
        return len(unchanged_replicas(self.plan, plan, running)) == n == len(self.plan.replica_configs())

    def _maybe_migrate(self, seq: int) -> None:
        if not self.pending or self.pending[0] != seq or self.phase != DRAINING:
            return
        kept = self.pending[5]
        kept_old = set(kept.values())
        if self.backend.now() + 1e-9 < self.pending[3] or any(
                r.batch_id is not None and r.index not in kept_old for r in self.replicas.values()):
            return
        plan = self._settled_kv(self.pending[1])
        now = self.backend.now()
        self.phase = MIGRATING
        if not plan.serving:
            self._install(plan, {})
            self._finish_migration()
            return
        warm = self.warm_start and not self._ever_served and now <= self.warm_until
        offsets = {r: 0.0 for r, _ in plan.replica_configs()} if warm else \
            self.policy.ready_offsets(plan, self.approach, fresh=self.approach.mode == "reparallelization")
        if not warm:
            self.reconfigurations += 1
        offsets.update({r: 0.0 for r in kept})  # unchanged replicas never stop serving
        stall = max(offsets.values(), default=0.0)
        self.stall_s += stall
        self.log.emit(now, "migrate", config=plan.config.short(), stall_s=round(stall, 4),
                      first_ready_s=round(min(offsets.values(), default=0.0), 4), warm=warm,
                      ready_s={r: round(v, 4) for r, v in sorted(offsets.items())},
                      kept={new: old for new, old in sorted(kept.items())})
        self._install(plan, offsets, kept)
        for t in sorted(set(offsets.values())):
            if t > 0:
                self.backend.call_at(now + t, self.dispatch)
        if kept:
            self.backend.execute_plan(plan, self.pending[0], stall, keep=dict(kept))
        else:
            self.backend.execute_plan(plan, self.pending[0], stall)
        self.dispatch()

    def on_plan_done(self, plan_id: int) -> None:
        """Migration finished (or a rerouting replica finished loading)."""
        if self.approach.mode == "rerouting":
            self._reroute_loaded(plan_id)
            return
        if self.pending and self.pending[0] == plan_id and self.phase == MIGRATING:
            self._finish_migration()

    def _install(self, plan: ReconfigurationPlan, offsets: dict[int, float], kept: dict[int, int] | None = None
                 ) -> None:
        """Make `plan` the served layout; `kept` (new -> old index) replicas carry on with their batch."""
        now = self.backend.now()
        kept = kept or {}
        self.plan = plan if plan.serving else None
        self.held = None
        self._ever_served = self._ever_served or plan.serving
        old, self.replicas = self.replicas, {}
        for idx, shape in plan.replica_configs():
            r = old.get(kept[idx]) if idx in kept else None
            if r is not None:  # same engine, same GPUs, same batch: only its index may change
                r.index = idx
                for req in r.requests:
                    req.replica = idx
                self.replicas[idx] = r
                continue
            gpus = sorted(g for p, g in plan.placement.items() if p.replica == idx)
            self.replicas[idx] = Replica(idx, shape, gpus, now + offsets.get(idx, 0.0))
        self._move_kv_homes(kept)

    def _finish_migration(self) -> None:
        self.pending = None
        self.phase = SERVING
        self.log.emit(self.backend.now(), "serving", config=self.plan.config.short() if self.plan else None,
                      replicas=len(self.replicas))
        if self._replan_after:
            self._replan_after = False
            self.replan("deferred")
        self.dispatch()

    # --- batches ------------------------------------------------------------------------------
    def _abort_replica(self, r: Replica, keep: str) -> None:
        """The replica lost a GPU: tokens streamed so far stay committed; the rest goes back to the queue."""
        if r.batch_id is None:
            return
        progress = self.backend.abort_batch(r.index, r.batch_id)
        self._settle(r, progress, lambda req: keep)

    def _settle(self, r: Replica, progress: list[Progress], keep_of) -> None:
        """Commit a batch's tokens; complete finished requests, interrupt the others."""
        now = self.backend.now()
        by_id = {p.request_id: p for p in progress}
        for req in r.requests:
            p = by_id.get(req.id)
            if p is not None and p.new_tokens:
                self.requests.commit(req, p.new_tokens, p.first_token_t if p.first_token_t is not None else now)
            if req.remaining == 0:
                self.requests.complete(req, p.finish_t if p and p.finish_t is not None else now)
            else:
                self.requests.interrupt(req, keep_of(req))
                if req.kv_ready:
                    self._home_kv(req, r.index)
        r.batch_id, r.requests = None, []

    def dispatch(self) -> None:
        """Start a batch on every idle, ready replica while requests wait."""
        if not self.requests.queue:
            return
        now = self.backend.now()
        kept_old = self._kept_old() if self.phase == DRAINING else set()
        homes = self._kv_home
        for r in self.replicas.values():
            if not self.requests.queue:
                return
            if r.batch_id is not None or r.ready_t > now:
                continue
            draining = self.phase == DRAINING and r.index not in kept_old
            if draining and self.pending[3] - now < self.policy.prefill_s(
                    r.shape, r.shape.batch, self.policy.cost.workload.prompt_len):
                continue  # a new batch would not get past its prefill before migration starts
            idx = r.index
            reqs = self.requests.take_batch(r.shape.batch, idx, now,
                                            lambda q: not q.kv_ready or homes.get(q.id) == idx)
            if not reqs:
                continue  # only caches that live elsewhere are waiting
            for q in reqs:
                homes.pop(q.id, None)
            self._batch_seq += 1
            r.batch_id, r.requests = self._batch_seq, reqs
            self.backend.start_batch(r.index, r.shape, self._batch_seq, reqs)
            if draining:  # decode until migration starts; the KV cache then moves
                self.backend.stop_batch(r.index, self._batch_seq, self.pending[3])

    def on_batch_done(self, replica: int, batch_id: int, progress: list[Progress], stopped: bool = False) -> None:
        r = self.replicas.get(replica)
        if r is None or r.batch_id != batch_id:
            return
        decision = self.pending[2] if self.pending else None
        self._settle(r, progress, lambda req: self._keep_for(req, decision))
        if self.phase == DRAINING:
            self._maybe_migrate(self.pending[0])
        self.dispatch()
