"""LiveBackend: the controller's Backend interface carried out by real worker processes.

Replicas are groups of connected workers (slot names = the controller's GPU ids). A batch is
driven step by step from here (every worker of the replica gets the same `step`, the sampler's
tokens come back and are committed at once), so a stop lands exactly on a step boundary and every
token is durable before anyone sees it. At a stop the workers park the unfinished requests' KV
pieces locally (out of their engines) and reply only each request's cached positions; the backend
records which replica holds them. A reconfiguration then runs the migration executor
(daemon/executor.py) in every worker of the replicas that change, old and new: weight slices and
the KV pieces of the requests the plan continues move worker-to-worker (slices no live GPU holds
come from the checkpoint), each worker builds its new engine from what it received, and a resumed
request imports the piece its new workers already hold (no KV bytes through the controller, no
recomputation). A replica the plan leaves unchanged (keeps_unchanged_replicas) is not touched at
all: its batch decodes on through the reconfiguration and is only renumbered. The
reparallelization baseline and the rerouting baseline's replica loads run the same executor with
no old layout: everything comes from the checkpoint.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from spotserve.controller.backend import Backend, Progress
from spotserve.daemon.layout import KVRequest
from spotserve.live.migrate import Migration, migration_msg, runs_layout
from spotserve.live.pool import CommandError, WorkerConn, WorkerLost, WorkerPool
from spotserve.live.requests import LiveRequest
from spotserve.planner.types import ParallelConfig, ReconfigurationPlan

log = logging.getLogger("spotserve.live")


@dataclass
class BatchRun:
    batch_id: int
    reqs: list  # controller Request objects
    base: dict[int, int]  # request id -> committed count at batch start
    stop_at: float | None = None
    first_t: dict[int, float] = field(default_factory=dict)
    finish_t: dict[int, float] = field(default_factory=dict)
    task: asyncio.Task | None = None
    step_s: float = 0.0  # latest step duration (to stop before `stop_at`, not after)
    index: dict[int, int] = field(default_factory=dict)  # request id -> output tokens produced so far
    idle_s: float | None = None  # how long its replica sat idle before it (None: its first batch)
    fresh: bool = True  # every request prefills its prompt only (no resumed request)


@dataclass
class ReplicaRun:
    index: int
    shape: ParallelConfig
    slots: list[str]  # rank order: stage * tp + shard
    config_id: int
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    batch: BatchRun | None = None
    failed: str | None = None
    idle_from: float | None = None  # when its last batch ended (None: none ran yet on this replica)
    repairs: int = 0  # reloads after a failed configure (see LiveBackend._repair)


class LiveBackend(Backend):
    """Backend over a WorkerPool. `engine` holds per-worker engine settings (block size, blocks...)."""

    keeps_unchanged_replicas = True  # an unchanged replica's workers and batch run through a plan

    def __init__(self, pool: WorkerPool, requests: dict[int, LiveRequest], engine: dict, store=None,
                 metrics=None, command_timeout_s: float = 60.0):
        self.pool, self.requests, self.engine, self.store = pool, requests, engine, store
        self.metrics = metrics
        self.command_timeout_s = command_timeout_s
        self.controller = None
        self.loop = asyncio.get_running_loop()
        self.t0 = time.monotonic()
        self.replicas: dict[int, ReplicaRun] = {}
        self.config_id = 0
        self.store_host = engine.get("store_host", "127.0.0.1")
        self.store_port = engine["store_port"]
        self.events: list[dict] = []  # structured log (JSON lines on request)
        self.on_token: Callable[[LiveRequest, int], None] | None = None
        self.on_configured: Callable[[int, float], None] | None = None
        # (slots, why): a replica that cannot be configured although its workers live; the service
        # gives up their instances so the controller re-plans without them
        self.on_unservable: Callable[[list[str], str], None] | None = None
        self.plans_done = 0
        self.parked: dict[int, LiveRequest] = {}  # requests whose KV pieces workers hold (kv_home)
        self.held: dict[str, tuple] = {}  # slot -> (pp, tp, stage, shard) of the weights it holds
        self.migrations: list[dict] = []  # one summary per configuration (the "configured" event)
        self.step_pause_s = 0.0  # pacing between steps (demos and tests that must watch a request run)

    def attach(self, controller) -> None:
        self.controller = controller
        controller.attach(self)

    def emit(self, event: str, **fields) -> None:
        row = {"t": round(self.now(), 4), "wall": time.time(), "event": event, **fields}
        self.events.append(row)
        log.info("%s", row)

    # --- clock --------------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        def run():
            try:
                fn()
            except Exception:
                log.exception("controller callback failed")
        self.loop.call_at(self.loop.time() + max(0.0, t - self.now()), run)

    # --- batches ------------------------------------------------------------------------------
    def start_batch(self, replica: int, shape: ParallelConfig, batch_id: int, requests: list) -> None:
        rt = self.replicas[replica]
        if rt.batch is not None:
            raise RuntimeError(f"replica {replica} already runs batch {rt.batch.batch_id}")
        b = BatchRun(batch_id, list(requests), {q.id: q.committed for q in requests})
        b.index = dict(b.base)
        b.idle_s = self.now() - rt.idle_from if rt.idle_from is not None else None
        b.fresh = all(q.committed == 0 and not q.kv_ready for q in requests)
        rt.batch = b
        b.task = asyncio.ensure_future(self._run_batch(rt, b))

    def stop_batch(self, replica: int, batch_id: int, at: float) -> None:
        rt = self.replicas.get(replica)
        if rt is None or rt.batch is None or rt.batch.batch_id != batch_id:
            return
        b = rt.batch
        b.stop_at = at if b.stop_at is None else min(b.stop_at, at)

    def live_tokens(self, replica: int, batch_id: int) -> dict[int, int]:
        """Output tokens each request of the running batch has produced (each committed as it comes)."""
        rt = self.replicas.get(replica)
        if rt is None or rt.batch is None or rt.batch.batch_id != batch_id:
            return {}
        return dict(rt.batch.index)

    def kv_tokens(self, request_id: int) -> int | None:
        """Cached positions of the KV pieces workers hold for a parked request (None if none is held)."""
        lr = self.parked.get(request_id)
        return None if lr is None or lr.kv_home is None else int(lr.kv_tokens)

    def abort_batch(self, replica: int, batch_id: int) -> list[Progress]:
        rt = self.replicas.get(replica)
        if rt is None or rt.batch is None or rt.batch.batch_id != batch_id:
            return []
        b = rt.batch
        rt.batch = None
        if b.task is not None:
            b.task.cancel()
        self.emit("batch_abort", replica=replica, batch=batch_id)
        return self._progress(b)

    def _progress(self, b: BatchRun) -> list[Progress]:
        out = []
        for q in b.reqs:
            lr = self.requests[q.id]
            new = max(0, min(len(lr.tokens), q.output_len) - b.base[q.id])
            out.append(Progress(q.id, new, b.first_t.get(q.id), b.finish_t.get(q.id)))
        return out

    def _payload(self, q, rt: ReplicaRun) -> dict:
        lr = self.requests[q.id]
        body = {"id": lr.sid, "prompt": lr.prompt, "output": lr.tokens[:q.committed], "params": lr.params}
        home, at = lr.kv_home, lr.kv_at
        self._unpark(lr)  # the piece is consumed (imported) or dropped by this replica's workers
        if q.kv_ready and home is rt and at == q.committed:
            body["kv_local"] = True
            lr.resumes.append({"how": "kv", "at": q.committed})
        elif q.committed or home is not None:
            lr.reprefilled += len(lr.prompt) + q.committed
            lr.resumes.append({"how": "prefill", "at": q.committed})
        elif q.interruptions:  # interrupted before its first token (or its tokens were dropped): from scratch
            lr.resumes.append({"how": "restart", "at": 0})
        return body

    def _unpark(self, lr: LiveRequest) -> None:
        lr.kv_home = None
        self.parked.pop(lr.rid, None)

    async def _run_batch(self, rt: ReplicaRun, b: BatchRun) -> None:
        stopped = False
        try:
            await rt.ready.wait()
            if rt.failed:
                raise CommandError(f"replica {rt.index} failed to configure: {rt.failed}")
            workers = self._workers(rt)
            t_add = time.monotonic()
            await self._all(workers, "add_requests", {"requests": [self._payload(q, rt) for q in b.reqs]})
            prefill_s, decode_s = None, 0.0
            sampler = (rt.shape.pp - 1) * rt.shape.tp
            index = b.index  # kept on the batch: the controller reads it while planning (live_tokens)
            by_sid = {str(q.id): q for q in b.reqs}
            step = 0
            while any(index[q.id] < q.output_len for q in b.reqs):
                if b.stop_at is not None and self.now() + b.step_s > b.stop_at:
                    stopped = True
                    break
                t0 = time.monotonic()
                if self.step_pause_s:
                    await asyncio.sleep(self.step_pause_s)
                replies = await self._all(workers, "step", {"config_id": rt.config_id, "step": step})
                now = self.now()
                # one store transaction per step; no await inside, so no reader sees a token before
                # the transaction that makes it durable has committed
                with self._transaction():
                    for sid, tok in replies[sampler].body["tokens"].items():
                        q = by_sid[sid]
                        self._commit(q, index[q.id], tok)
                        index[q.id] += 1
                        b.first_t.setdefault(q.id, now)
                        if index[q.id] >= q.output_len:
                            b.finish_t[q.id] = now
                # timed as the calibration times a batch: the prefill with the add_requests round
                # trip, every step with its commit
                b.step_s = time.monotonic() - t0
                if step == 0:
                    prefill_s = time.monotonic() - t_add
                else:
                    decode_s += b.step_s
                step += 1
            if step:  # what the in-run refit of the profile reads (spotserve/live/refit.py)
                self.emit("batch_done", replica=rt.index, batch=b.batch_id, pp=rt.shape.pp, tp=rt.shape.tp,
                          m=rt.shape.micro_batches, size=len(b.reqs), fresh=b.fresh,
                          prompt=sum(len(self.requests[q.id].prompt) for q in b.reqs) / len(b.reqs),
                          idle_s=None if b.idle_s is None else round(b.idle_s, 4),
                          prefill_s=round(prefill_s, 6), decode_steps=step - 1, decode_s=round(decode_s, 6))
            live = [str(q.id) for q in b.reqs if index[q.id] < q.output_len]
            if stopped and live:
                await self._park(rt, workers, live, index)
        except asyncio.CancelledError:
            return  # aborted: the controller already took the progress
        except (WorkerLost, CommandError, asyncio.TimeoutError) as exc:
            # a peer died mid-step: the loss handler aborts this batch; wait for it, else give up the batch
            self.emit("batch_error", replica=rt.index, batch=b.batch_id, error=str(exc)[:300])
            try:
                await asyncio.sleep(self.pool.heartbeat_timeout_s * 2 + 1)
            except asyncio.CancelledError:
                return
            stopped = True
        if rt.batch is not b:
            return
        rt.batch = None
        rt.idle_from = self.now()
        self.controller.on_batch_done(rt.index, b.batch_id, self._progress(b), stopped)

    async def _park(self, rt: ReplicaRun, workers: list[WorkerConn], live: list[str], index: dict) -> None:
        """Workers keep the KV pieces of unfinished requests (out of their engines) and reply only the
        cached positions; a request is parked on `rt` when every worker holds its piece."""
        replies = await self._all(workers, "export", {"ids": live, "release": True})
        for sid in live:
            counts = [r.body.get("parked", {}).get(sid) for r in replies]
            lr = self.requests[int(sid)]
            if counts and counts[0] is not None and all(c == counts[0] for c in counts):
                lr.kv_home, lr.kv_tokens, lr.kv_at = rt, int(counts[0]), index[int(sid)]
                self.parked[lr.rid] = lr
            else:
                self._unpark(lr)

    def _transaction(self):
        return self.store.transaction() if self.store is not None else contextlib.nullcontext()

    def _commit(self, q, index: int, tok: int) -> None:
        lr = self.requests[q.id]
        if lr.accept(index, tok):
            if self.store is not None:
                self.store.commit(lr.sid, index, [int(tok)])
                if lr.done:
                    self.store.finish(lr.sid, "completed", "length")
            if self.on_token is not None:
                self.on_token(lr, index)

    def _workers(self, rt: ReplicaRun) -> list[WorkerConn]:
        out = []
        for s in rt.slots:
            c = self.pool.alive(s)
            if c is None:
                raise WorkerLost(f"{s} is not connected")
            out.append(c)
        return out

    async def _all(self, workers: list[WorkerConn], mtype: str, body: dict):
        return await asyncio.gather(*(w.call(mtype, body, self.command_timeout_s) for w in workers))

    # --- reconfiguration ----------------------------------------------------------------------
    def _mode(self) -> str:
        approach = getattr(self.controller, "approach", None)
        return getattr(approach, "mode", "spotserve")

    def execute_plan(self, plan: ReconfigurationPlan, plan_id: int, stall_s: float,
                     keep: dict[int, int] | None = None) -> None:
        # replicas in `keep` (new index -> old) go on as they are: same workers, same process group,
        # same running batch, only renumbered; every other replica is re-formed under a new config id
        self.config_id += 1
        cid = self.config_id
        keep = dict(keep or {})
        layout = {}
        for idx, shape in plan.replica_configs():
            pos = sorted((p for p in plan.placement if p.replica == idx), key=lambda p: (p.stage, p.shard))
            layout[idx] = (shape, [plan.placement[p] for p in pos])
        for new, old in keep.items():
            rt = self.replicas.get(old)
            if rt is None or rt.shape != layout[new][0] or rt.slots != layout[new][1]:
                raise ValueError(f"plan {plan_id}: kept replica {old} -> {new} does not match the running one")
        kept_old = set(keep.values())
        # the replicas that change, as they were: the old side of the migration (none for the
        # reparallelization baseline, which restarts everything from the checkpoint)
        fresh = self._mode() == "reparallelization"
        old_runs = [] if fresh else [rt for rt in self.replicas.values() if rt.index not in kept_old]
        self._install(cid, layout, keep)
        self.emit("configure", config_id=cid, config=plan.config.short() if plan.config else None,
                  replicas={i: s for i, (_, s) in layout.items()}, kept={n: o for n, o in sorted(keep.items())},
                  planned_bytes=sum(t.nbytes for t in plan.transfers), planned_disk_bytes=plan.disk_bytes,
                  planned_kv_bytes=sum(t.nbytes for t in plan.transfers if t.tensor == "kv"), fresh=fresh)
        asyncio.ensure_future(self._configure(cid, plan_id, idle_others=True, plan=plan, old_runs=old_runs))

    def load_replica(self, replica: int, shape: ParallelConfig, gpus: list[str], load_id: int,
                     seconds: float) -> None:
        self.config_id += 1
        cid = self.config_id
        self.replicas[replica] = ReplicaRun(replica, shape, list(gpus), cid)
        asyncio.ensure_future(self._configure(cid, load_id, idle_others=False, only=[replica]))

    def _install(self, cid: int, layout: dict, keep: dict[int, int] | None = None) -> None:
        keep = keep or {}
        kept_old = set(keep.values())
        for rt in self.replicas.values():
            if rt.index not in kept_old and rt.batch is not None and rt.batch.task is not None:
                rt.batch.task.cancel()  # the controller migrates only between batches; defensive
        old = self.replicas
        self.replicas = {}
        for i, (shape, slots) in layout.items():
            if i in keep:
                rt = old[keep[i]]
                rt.index = i  # renumbered only: its batch now reports under the new index
                self.replicas[i] = rt
            else:
                self.replicas[i] = ReplicaRun(i, shape, slots, cid)

    def _base_cfg(self) -> dict:
        return {"store_host": self.store_host, "store_port": self.store_port,
                **{k: v for k, v in self.engine.items() if k not in ("store_host", "store_port")}}

    def _position_msgs(self, cid: int, only: list[int] | None) -> dict[str, tuple[dict, dict]]:
        msgs = {}
        for rt in self.replicas.values():
            if (only is not None and rt.index not in only) or rt.config_id != cid:
                continue
            s = rt.shape
            cfg = {"pp": s.pp, "tp": s.tp, "micro_batches": s.micro_batches, **self._base_cfg()}
            cfg["max_batch"] = max(cfg.get("max_batch", 1), s.batch)
            for rank, slot in enumerate(rt.slots):
                msgs[slot] = (cfg, {"replica": rt.index, "stage": rank // s.tp, "shard": rank % s.tp})
        return msgs

    def _migration(self, cid: int, only: list[int] | None, plan: ReconfigurationPlan | None,
                   old_runs: list[ReplicaRun]) -> Migration:
        """The migration of configuration `cid`: new replicas whose workers are all connected, the old
        replicas that changed, KV of the parked requests the plan continues on a new replica."""
        bs = int(self.engine.get("block_size", 16))
        new_runs = [rt for rt in self.replicas.values() if rt.config_id == cid and (only is None or rt.index in only)
                    and all(self.pool.alive(s) is not None for s in rt.slots)]
        new = runs_layout(new_runs, bs)
        old = runs_layout(old_runs, bs) if old_runs else None
        live = [s for rt in old_runs for r, s in enumerate(rt.slots) if self.pool.alive(s) is not None
                and self.held.get(s) == (rt.shape.pp, rt.shape.tp, r // rt.shape.tp, r % rt.shape.tp)]
        requests = []
        continued = plan.continued if plan is not None else {}
        for lr in self.parked.values():
            dst = continued.get(lr.sid)
            if old is not None and any(lr.kv_home is rt for rt in old_runs) and dst in new.shapes:
                requests.append(KVRequest(lr.sid, lr.kv_home.index, dst, lr.kv_tokens))
        old_gpus = set(old.gpus()) if old is not None else set()
        transfers = [t for t in (plan.transfers if plan is not None else [])
                     if new.position(t.dst) is not None and (t.src is None or t.src in old_gpus)]
        participants = sorted(set(live) | set(new.gpus()))
        return Migration(old, new, transfers, requests, set(live), {g: k for k, g in enumerate(participants)})

    async def _configure(self, cid: int, plan_id: int, idle_others: bool, only: list[int] | None = None,
                         plan: ReconfigurationPlan | None = None, old_runs: list[ReplicaRun] = ()) -> None:
        t0 = time.monotonic()
        msgs = self._position_msgs(cid, only)
        mig = self._migration(cid, only, plan, list(old_runs))
        moving = {lr.sid for lr in self.parked.values() if any(lr.kv_home is rt for rt in old_runs)}
        for sid in moving:  # the old replicas are gone: their pieces move now or are dropped
            self._unpark(self.requests[int(sid)])
        body_mig = migration_msg(mig.old, mig.new, mig.transfers, mig.requests, sorted(mig.live), mig.ranks)
        busy = {s for rt in self.replicas.values() if rt.config_id != cid for s in rt.slots}  # kept: untouched
        targets = {}
        for name, c in self.pool.conns.items():
            if not c.alive or c.is_agent or name in busy:
                continue
            if name in mig.ranks:
                m = msgs.get(name)
                targets[name] = {"config_id": cid, "config": m[0] if m else self._base_cfg(),
                                 "position": m[1] if m else None, "migration": body_mig}
            elif name in msgs or idle_others:  # idle, or of a new replica that lost a worker already
                targets[name] = {"config_id": cid, "config": {}, "position": None}
        results: dict[str, object] = {n: WorkerLost(f"{n} is not connected") for n in msgs if n not in targets}
        for n in msgs:
            if n in targets and n not in mig.ranks:
                results[n] = WorkerLost(f"{n}: a worker of its replica is not connected")

        async def one(name, body):
            c = self.pool.alive(name)
            try:
                if c is None:
                    raise WorkerLost(f"{name} is not connected")
                reply = (await c.call("configure", body, self.command_timeout_s)).body
                if name not in results:
                    results[name] = reply
                self.held[name] = tuple(reply["holds"]) if reply.get("holds") else None
            except (WorkerLost, CommandError, asyncio.TimeoutError) as exc:
                results[name] = exc
                self.held.pop(name, None)  # unknown state: not a source of the next migration

        await asyncio.gather(*(one(n, b) for n, b in targets.items()))
        ok = {n: r for n, r in results.items() if isinstance(r, dict)}
        repair = []
        for rt in self.replicas.values():
            if rt.config_id != cid:
                continue
            errs = [f"{s}: {results.get(s)}" for s in rt.slots if not isinstance(results.get(s), dict)]
            rt.failed = "; ".join(errs)[:500] or None
            if rt.failed and not rt.repairs and all(self.pool.alive(s) is not None for s in rt.slots):
                repair.append(rt)  # its workers live: its batches wait for the reload, not fail
        summary = self._settle_migration(cid, mig, ok)
        for rt in self.replicas.values():
            if rt.config_id == cid and rt not in repair:
                rt.ready.set()
        secs = time.monotonic() - t0
        summary.update(config_id=cid, seconds=round(secs, 4),
                       planned_bytes=sum(t.nbytes for t in plan.transfers) if plan is not None else 0,
                       planned_disk_bytes=plan.disk_bytes if plan is not None else 0,
                       planned_kv_bytes=sum(t.nbytes for t in plan.transfers if t.tensor == "kv")
                       if plan is not None else 0,
                       failed=sorted(n for n, r in results.items() if not isinstance(r, dict)
                                     and (n in msgs or n in mig.ranks)))  # an idle worker's failure changes nothing
        self.migrations.append(summary)
        self.emit("configured", **summary)
        if self.metrics:
            self.metrics.migration_seconds.inc(secs)
            self.metrics.disk_bytes.inc(summary["loaded_bytes"])
            self.metrics.migration_bytes.inc(summary["received_bytes"])
        for rt in repair:
            asyncio.ensure_future(self._repair(rt))
        if plan_id is None:  # a repair: no plan of the controller's waits for it
            return
        self.plans_done += 1
        if self.on_configured is not None:
            self.on_configured(cid, secs)
        self.controller.on_plan_done(plan_id)

    async def _repair(self, rt: ReplicaRun) -> None:
        """A replica whose workers live but failed to configure (say a peer of its migration died
        mid-way) loads its shards again on its own, from the checkpoint or its context daemons. Failing
        again, its workers are reported lost, so the controller re-plans without them: a replica that
        cannot serve is never kept, else its requests would come back to it forever."""
        if self.replicas.get(rt.index) is not rt:
            return  # a later plan replaced it
        why = rt.failed or ""
        rt.repairs += 1
        self.config_id += 1
        rt.config_id, rt.failed = self.config_id, None
        self.emit("repair", replica=rt.index, config_id=rt.config_id, why=why[:300])
        await self._configure(rt.config_id, None, idle_others=False, only=[rt.index])
        if rt.failed and self.on_unservable is not None:
            self.on_unservable(rt.slots, f"replica {rt.index} failed to configure twice: {rt.failed[:200]}")

    def _settle_migration(self, cid: int, mig: Migration, ok: dict[str, dict]) -> dict:
        """Where each moved KV cache now lives, and the executor's figures summed over workers."""
        lost = sorted({rid for r in ok.values() for rid in r.get("lost_kv", [])})
        moved = []
        for req in mig.requests:
            lr = self.requests[int(req.request_id)]
            rt = self.replicas.get(req.new_replica)
            if (rt is not None and rt.config_id == cid and rt.failed is None and req.request_id not in lost
                    and all(req.request_id in ok[s].get("kv_held", []) for s in rt.slots)):
                lr.kv_home, lr.kv_tokens = rt, req.num_tokens
                lr.kv_moved_bytes += sum(r.get("kv_in", {}).get(req.request_id, 0) for r in ok.values())
                self.parked[lr.rid] = lr
                moved.append(req.request_id)
        stats = [r["migration"] for r in ok.values() if "migration" in r]
        total = {k: sum(s[k] for s in stats) for k in ("sent_bytes", "received_bytes", "local_bytes",
                                                       "checkpoint_bytes")}
        return {"loaded_bytes": sum(r.get("loaded_bytes", 0) for r in ok.values()), **total,
                "kv_bytes": sum(sum(r.get("kv_in", {}).values()) for r in ok.values()),
                "executor_s": max((s["seconds"] for s in stats), default=0.0),
                "prepare_s": max((s["prepare_seconds"] for s in stats), default=0.0),
                "group_s": max((s["group_seconds"] for s in stats), default=0.0),
                "participants": len(mig.ranks), "old": mig.old is not None, "live": sorted(mig.live),
                "kv_requests": len(mig.requests), "kv_moved": moved, "lost_kv": lost,
                "workers": {n: {k: r["migration"][k] for k in ("sent_bytes", "received_bytes", "checkpoint_bytes",
                                                                 "seconds")} for n, r in sorted(ok.items())
                            if "migration" in r}}
