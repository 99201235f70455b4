"""LiveService: one controller process serving for real (policy core + LiveBackend + workers + state).

It owns the asyncio loop's pieces: the worker server (pool.py), the TCPStore that workers form
their process groups over, the launcher that starts and SIGKILLs instance processes, the
Controller (the same policy code the simulator runs) attached to a LiveBackend, and the SQLite
StateStore. Availability comes from `acquire` / `notice` / `reclaim` calls (a trace replay, the
HTTP admin endpoints or the AWS notice poller call them); a worker that dies without notice is
detected by the pool and its whole instance is treated as reclaimed without notice. Requests come
from `submit` (the HTTP API); a restart with the same state path resumes every unfinished request
from its committed tokens. Workers outlive a lost controller for `reconnect_s`: a restart with the
same state path listens on the same worker address with the same token, adopts the instances
whose workers all came back (no new processes; their weights stay where they are, see adopt.py),
gives the controller the layout they hold as the one its first plan starts from, and spawns the
others.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from spotserve.controller.approach import get_approach
from spotserve.controller.controller import Controller
from spotserve.controller.events import EventLog
from spotserve.controller.instances import GONE, RELEASED, InstanceConfig, InstanceManager
from spotserve.controller.policy import Policy, profile_margin_s
from spotserve.controller.requests import REJECTED, RUNNING, RequestManager
from spotserve.live.adopt import await_gone, await_slots, held_plan, install_held, served_record
from spotserve.live.backend import LiveBackend
from spotserve.live.daemons import daemon_pid
from spotserve.live.forkserver import alive
from spotserve.live.launcher import LocalLauncher
from spotserve.live.metrics import Metrics
from spotserve.live.pool import CommandError, WorkerConn, WorkerLost, WorkerPool
from spotserve.live.requests import LiveRequest
from spotserve.live.state import StateStore
from spotserve.planner.cost import CostModel, Workload
from spotserve.planner.types import ParallelConfig

log = logging.getLogger("spotserve.live")


@dataclass
class LiveConfig:
    """Settings of a live service. Times are wall-clock seconds."""

    model_dir: str
    profile: str  # cost-model profile JSON measured on this machine (python -m spotserve.live.profile)
    run_dir: str
    gpus_per_instance: int = 2
    approach: str = "spotserve"
    rate: float = 1.0  # expected arrival rate (req/s) the optimizer plans for
    grace_s: float = 5.0
    prompt_len: int = 16  # workload the optimizer plans for
    output_len: int = 16
    state_path: str | None = None
    host: str = "127.0.0.1"
    heartbeat_s: float = 0.2
    heartbeat_timeout_s: float = 3.0
    connect_timeout_s: float = 120.0
    reconnect_s: float = 30.0  # workers keep their context this long after losing the controller
    adopt_wait_s: float = 5.0  # a restart waits at most this long for the workers it had to come back
    respawn_timeout_s: float = 30.0  # engine "daemon" on: a crashed worker is restarted on its slot within this
    engine: dict = field(default_factory=lambda: {"block_size": 8, "num_blocks": 128, "max_batch": 8,
                                                  "timeout_s": 10.0})

    def __post_init__(self):
        if self.gpus_per_instance < 1:
            raise ValueError(f"LiveConfig.gpus_per_instance must be >= 1, got {self.gpus_per_instance}")
        if self.grace_s < 0 or self.rate < 0:
            raise ValueError("LiveConfig.grace_s and rate must be >= 0")
        if not 0 < self.heartbeat_s < self.heartbeat_timeout_s:
            raise ValueError("LiveConfig: need 0 < heartbeat_s < heartbeat_timeout_s")
        if self.reconnect_s < 0 or self.adopt_wait_s < 0 or self.respawn_timeout_s < 0:
            raise ValueError("LiveConfig.reconnect_s, adopt_wait_s and respawn_timeout_s must be >= 0")
        get_approach(self.approach)


class LiveService:
    """Create inside a running event loop, then `await start(instances)`."""

    def __init__(self, config: LiveConfig, launcher=None, token: bytes | None = None):
        from spotserve.models.loader import CheckpointReader

        self.config = c = config
        self.run_dir = Path(c.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.spec = CheckpointReader(c.model_dir).spec
        self.metrics = Metrics()
        self.store = StateStore(c.state_path or self.run_dir / "state.sqlite")
        self.requests: dict[int, LiveRequest] = {}
        # what a previous controller of this state left: its worker address, token file, instances
        self._prev = self.store.get_meta("cluster") or {}
        self.instances: dict[str, list[str]] = dict(self._prev.get("instances", {}))  # held -> slots
        self.token_file = self.run_dir / "token"
        old_token = Path(self._prev.get("token_file", self.token_file))
        if token is None and self._prev and old_token.is_file():
            token = old_token.read_bytes().strip()  # workers that outlived it still use this one
        self.token = token or secrets.token_hex(32).encode()
        self.token_file.write_bytes(self.token)
        self.token_file.chmod(0o600)
        self.adopted: dict[str, dict[str, int]] = {}  # instance -> slot -> pid of workers adopted at start
        self.launcher = launcher
        self.pool = WorkerPool(self.token, c.heartbeat_timeout_s, on_lost=self._worker_lost, on_hello=self._hello)
        self._cluster: dict = {}
        self.log = EventLog()
        self._reclaiming: set[str] = set()
        self._next_id = 0
        self.recoveries: list[dict] = []  # notice-less loss -> next token of each affected request
        self.notice_to_serving: list[dict] = []  # notice -> new configuration in place
        self._lost_at: dict[int, tuple[float, str]] = {}
        self._noticed: dict[str, float] = {}
        self._notice_pending: dict[str, tuple[float, int]] = {}
        self._respawning: set[str] = set()  # slots whose crashed worker is being restarted
        self.started = False

    # --- lifecycle -----------------------------------------------------------------------------
    async def listen(self) -> str:
        """Open the worker server and the process-group store; returns the workers' HOST:PORT."""
        import torch.distributed as dist

        c = self.config
        port = 0
        if self._prev.get("host") == c.host:
            try:  # the address the workers of the previous controller reconnect to
                port = await self.pool.start(c.host, int(self._prev["port"]))
            except OSError as exc:
                log.warning("worker port %s of the previous controller is taken (%s): its workers cannot "
                            "come back", self._prev.get("port"), exc)
        if not port:
            port = await self.pool.start(c.host, 0)
        self.address = f"{c.host}:{port}"
        self._cluster = {"host": c.host, "port": port, "token_file": str(self.token_file.resolve())}
        self._save_instances()
        self._tcpstore = dist.TCPStore(c.host, 0, is_master=True, wait_for_workers=False)
        return self.address

    async def start(self, instances: list[str], agents: int = 0) -> None:
        """Spawn `instances` (through `agents` mpirun agents when > 0, else locally), restore unfinished
        requests, then hand the instances to the controller as their workers connect."""
        from spotserve.live.agent import AgentLauncher

        c = self.config
        if self.pool.server is None:
            await self.listen()
        if self.launcher is None and agents > 0:
            names = [f"agent/{r}" for r in range(1, agents + 1)]
            await self.pool.wait_for(names, c.connect_timeout_s)
            self.launcher = AgentLauncher(self.pool, names)
        if self.launcher is None:
            self.launcher = LocalLauncher(self.address, self.token_file, c.model_dir, self.run_dir / "logs",
                                          c.heartbeat_s, reconnect_s=c.reconnect_s)
        cost = CostModel.from_profile(c.profile, spec=self.spec, workload=Workload(c.prompt_len, c.output_len))
        # the profile's reconfiguration margin (live calibration measures it); the simulator plans with the same
        self.policy = Policy(cost, reconfigure_margin_s=profile_margin_s(c.profile))
        inst_cfg = InstanceConfig(gpus_per_instance=c.gpus_per_instance, gpu_memory_bytes=cost.gpu_memory_bytes,
                                  grace_s=c.grace_s)
        self.rm = RequestManager(max_seq_len=self.spec.max_positions + 1)
        self.controller = Controller(self.policy, get_approach(c.approach), InstanceManager(inst_cfg), self.rm,
                                     c.rate, self.log, warm_start=True)
        self.controller.warm_until = float("inf")  # the first layout (start set) is no reconfiguration
        engine = dict(c.engine, store_host=c.host, store_port=self._tcpstore.port)
        self.backend = LiveBackend(self.pool, self.requests, engine, self.store, self.metrics)
        self.backend.on_token = self._on_token
        self.backend.on_configured = self._on_configured
        self.backend.on_unservable = self._unservable
        self.backend.attach(self.controller)
        self._restore()
        adopted = await self._adopt(instances)
        held = held_plan(list(self.backend.replicas.values()), self.store.get_meta("served"))
        if held is not None:  # the first plan starts from what the adopted workers hold
            self.controller.adopt_layout(held)
        self.started = True
        # the start set joins together, so the first plan sees all of it
        await asyncio.gather(*(self.acquire(name, join=False) for name in instances if name not in adopted))
        for name in instances:
            self.controller.on_instance_added(name)

    async def close(self) -> None:
        """Stop for good: every worker is killed (a restart spawns new ones; only a controller that
        dies without closing leaves workers to adopt)."""
        if self.launcher is not None:
            workers = [n for n, c in self.pool.conns.items() if c.alive and not c.is_agent]
            self.launcher.close()
            self.instances.clear()
            if self._cluster:
                self._save_instances()
            # an agent kills its host's workers on a command sent from this loop: let it go out (and the
            # workers drop their connections) before the pool closes
            await await_gone(self.pool, workers, 5.0)
        await self.pool.close()
        self.store.close()

    async def _adopt(self, instances: list[str]) -> set[str]:
        """Adopt the instances of `instances` whose workers all came back after a controller restart;
        kill the rest of the previous controller's workers. Returns the adopted instance names."""
        prev = dict(self.instances)
        if not prev:
            return set()
        want = [s for n in instances for s in prev.get(n, [])]
        await await_slots(self.pool, want, self.config.adopt_wait_s if want else 0.0)
        adopted, conns, doomed = set(), [], []
        for name, slots in prev.items():
            back = [c for c in (self.pool.alive(s) for s in slots) if c is not None and c.resumed]
            if back:
                self.launcher.adopt(name, {c.name: c.pid for c in back}, back[0].hello.get("host"))
            if name in instances and len(back) == len(slots) == self.config.gpus_per_instance:
                adopted.add(name)
                conns += back
                self.adopted[name] = {c.name: c.pid for c in back}
                continue
            if back:  # an instance that lost a worker meanwhile, or one the restart does not serve
                self.launcher.kill(name)
                doomed += [c.name for c in back]
            del self.instances[name]
        await await_gone(self.pool, doomed)
        held = install_held(self.backend, conns)
        for name in sorted(adopted):
            self.backend.emit("adopted", instance=name, pids=self.adopted[name])
        self.backend.emit("restart", adopted=sorted(adopted), held_replicas=held, killed=sorted(doomed),
                          config_id=self.backend.config_id)
        self._save_instances()
        return adopted

    def _hello(self, conn: WorkerConn) -> None:
        """A worker of the previous controller that came back too late (or for an instance this one does
        not hold) is told to shut down; it is nobody's."""
        if self.started and conn.resumed and not conn.is_agent and conn.instance not in self.instances:
            async def stop():
                try:
                    await conn.call("shutdown", {}, 5.0)
                except Exception:  # gone already
                    pass
            asyncio.ensure_future(stop())

    def _save_instances(self) -> None:
        self.store.set_meta("cluster", {**self._cluster, "instances": self.instances})

    def _restore(self) -> None:
        """Re-queue every unfinished request of the state store with its committed tokens."""
        now = self.backend.now()
        for sr in self.store.all():
            self._next_id = max(self._next_id, int(sr.id) + 1)
        for sr in self.store.unfinished():
            rid = int(sr.id)
            lr = LiveRequest(rid, sr.prompt, sr.params, arrived_wall=sr.arrived_at, tokens=list(sr.tokens))
            lr.token_wall = [sr.arrived_at] * len(sr.tokens)
            self.requests[rid] = lr
            if lr.done:
                self.store.finish(sr.id, "completed", "length")
                continue
            # resumes from the commit (re-prefill of prompt + committed tokens)
            q = self.rm.restore(rid, now, len(sr.prompt), lr.max_tokens, len(sr.tokens))
            self.log.emit(now, "restored", request=rid, committed=q.committed)

    # --- requests ------------------------------------------------------------------------------
    def check(self, prompt: list[int], max_tokens: int) -> None:
        """ValueError when the request cannot be served (bad ids, too long for the model)."""
        if not prompt:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.spec.vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} outside the vocabulary of {self.spec.vocab}")
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if len(prompt) + max_tokens - 1 > self.spec.max_positions:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the model's "
                             f"{self.spec.max_positions} positions")

    def submit(self, prompt: list[int], max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0) -> LiveRequest:
        """Admit a request (durably) and hand it to the controller; ValueError on a bad request."""
        prompt = [int(t) for t in prompt]
        self.check(prompt, max_tokens)
        params = {"max_new_tokens": int(max_tokens), "temperature": float(temperature), "top_p": float(top_p),
                  "seed": int(seed)}
        rid = self._next_id
        self._next_id += 1
        lr = LiveRequest(rid, prompt, params)
        self.requests[rid] = lr
        self.store.add(lr.sid, prompt, params, lr.arrived_wall)
        self.controller.on_arrival(rid, len(prompt), max_tokens)
        q = self.rm.requests[rid]
        if q.state == REJECTED:
            self.store.finish(lr.sid, "rejected", q.reason)
            lr.finish()
            raise ValueError(q.reason)
        return lr

    def _on_token(self, lr: LiveRequest, index: int) -> None:
        now = time.time()
        self.metrics.token(now)
        if index == 0:
            self.metrics.ttft.observe(now - lr.arrived_wall)
        elif len(lr.token_wall) >= 2:
            self.metrics.token_gap.observe(lr.token_wall[-1] - lr.token_wall[-2])
        if lr.done:
            self.metrics.latency.observe(now - lr.arrived_wall)
            self.metrics.requests.labels("completed").inc()
        lost = self._lost_at.pop(lr.rid, None)
        if lost is not None:
            self.recoveries.append({"request": lr.rid, "instance": lost[1],
                                    "seconds": round(self.backend.now() - lost[0], 4)})

    def _on_configured(self, config_id: int, seconds: float) -> None:
        self.store.set_meta("served", served_record(self.controller.plan))  # a restart's held layout
        if self.backend.plans_done > 1:
            self.metrics.reconfigurations.inc()
        now = self.backend.now()
        for name, (t, cid) in list(self._notice_pending.items()):
            if config_id > cid:
                self.notice_to_serving.append({"instance": name, "seconds": round(now - t, 4),
                                               "configure_s": round(seconds, 4)})
                del self._notice_pending[name]

    # --- availability --------------------------------------------------------------------------
    async def acquire(self, name: str, join: bool = True) -> None:
        """Start an instance's worker processes; once all connected, the controller gets the instance
        (join=False: the caller hands it over)."""
        t0 = time.monotonic()
        names = self.launcher.spawn(name, self.config.gpus_per_instance)
        self.instances[name] = list(names)
        self._save_instances()
        await self.pool.wait_for(names, self.config.connect_timeout_s)
        self.backend.emit("acquired", instance=name, seconds=round(time.monotonic() - t0, 3))
        if join:
            self.controller.on_instance_added(name)

    def notice(self, name: str, grace_s: float | None = None) -> float:
        """A reclaim notice for `name`: plan now, SIGKILL it at the deadline. Returns the deadline."""
        grace = self.config.grace_s if grace_s is None else grace_s
        deadline = self.backend.now() + grace
        # the controller plans against the deadline less the policy's reconfiguration margin (the fixed
        # cost the cost model does not price); the SIGKILL comes at the real one
        self._noticed[name] = self.backend.now()
        self._notice_pending[name] = (self.backend.now(), self.backend.config_id)
        self.backend.emit("notice", instance=name, deadline=round(deadline, 4),
                          margin=round(self.policy.margin_s(grace), 3))
        self.controller.on_notice(name, deadline)
        self.backend.call_at(deadline, lambda: self.reclaim(name))
        return deadline

    def reclaim(self, name: str) -> None:
        """The cloud takes `name` back now: its processes are SIGKILLed, then the controller is told."""
        inst = self.controller.instances.instances.get(name)
        if inst is None or inst.state in (GONE, RELEASED):  # released: the run ended
            return
        self._reclaiming.add(name)
        pids = self.launcher.kill(name)
        self.pool.lose_instance(name, "instance reclaimed")
        self._forget(name)
        self.metrics.preemptions.labels("notice" if name in self._noticed else "none").inc()
        self.backend.emit("reclaim", instance=name, killed=pids)
        self._mark_lost(name)
        self.controller.on_reclaim(name)

    def _forget(self, name: str) -> None:
        if self.instances.pop(name, None) is not None:
            self._save_instances()

    def _mark_lost(self, name: str) -> None:
        now = self.backend.now()
        for r in self.controller.replicas.values():
            if any(g.startswith(name + "/") for g in r.gpus):
                for q in r.requests:
                    if q.state == RUNNING:
                        self._lost_at[q.id] = (now, name)

    def _worker_lost(self, conn: WorkerConn, why: str) -> None:
        """A worker died without notice. With the engine's context daemons on, it is restarted on its slot
        (_respawn); otherwise its instance is gone (kill the rest of it) and its requests resume elsewhere."""
        name = conn.instance
        if conn.is_agent or name in self._reclaiming or not self.started:
            return
        inst = self.controller.instances.instances.get(name)
        self.backend.emit("worker_lost", worker=conn.name, why=why)
        if inst is None or inst.state in (GONE, RELEASED):  # released: the run ended
            return
        if self.config.engine.get("daemon") and hasattr(self.launcher, "respawn") and conn.name not in self._respawning:
            # its slot's context daemon lives on: restart the worker there instead of losing the instance
            self._respawning.add(conn.name)
            self.controller.on_worker_lost(conn.name)
            asyncio.ensure_future(self._respawn(conn.name))
            return
        self._lose(name)

    async def _respawn(self, slot: str) -> None:
        """Restart the crashed worker of `slot`: once the surviving workers of its replica are free (they
        answer a ping after their step with the dead peer failed) and the new worker said hello (its
        `holds` re-attached from the daemon), the controller re-forms the replica. A worker that does not
        come back within respawn_timeout_s: the instance is lost after all."""
        name, t0 = slot.rsplit("/", 1)[0], time.monotonic()
        timeout = self.config.respawn_timeout_s
        rt = next((r for r in self.backend.replicas.values() if slot in r.slots), None)
        peers = [s for s in (rt.slots if rt is not None else []) if s != slot]
        try:
            conns = [self.pool.alive(s) for s in peers]
            if any(c is None for c in conns):
                raise WorkerLost(f"a peer of {slot} is gone too")
            await asyncio.gather(*(c.call("ping", {}, timeout) for c in conns))
            dpid = daemon_pid(self.launcher.daemon_name(slot))
            if dpid is None or not alive(dpid):
                raise WorkerLost(f"the context daemon of {slot} is gone too (the instance went)")
            pid = self.launcher.respawn(slot)
            conn = (await self.pool.wait_for([slot], timeout))[0]
        except (WorkerLost, CommandError, asyncio.TimeoutError, TimeoutError, ValueError, OSError) as exc:
            self.backend.emit("respawn_failed", worker=slot, error=str(exc)[:300])
            if name not in self._reclaiming:
                self._lose(name)
            return
        finally:
            self._respawning.discard(slot)
        if name in self._reclaiming or name not in self.instances:
            return  # taken back meanwhile
        holds = conn.hello.get("holds")
        self.backend.held[slot] = tuple(holds) if holds else None
        self.backend.emit("worker_restarted", worker=slot, pid=pid, holds=holds,
                          attached_bytes=conn.hello.get("attached_bytes"), seconds=round(time.monotonic() - t0, 3))
        self.controller.on_worker_restarted(slot)

    def _unservable(self, slots: list[str], why: str) -> None:
        """Workers that live but cannot form their replica: their instances are given up (killed), as
        if lost without notice, and their requests resume elsewhere."""
        self.backend.emit("unservable", workers=slots, why=why)
        for name in sorted({s.rsplit("/", 1)[0] for s in slots}):
            inst = self.controller.instances.instances.get(name)
            if inst is not None and inst.state not in (GONE, RELEASED) and name not in self._reclaiming:
                self._lose(name)

    def _lose(self, name: str) -> None:
        """The instance `name` is gone without notice: kill the rest of it, resume elsewhere."""
        self._reclaiming.add(name)
        pids = self.launcher.kill(name)
        self.pool.lose_instance(name, "instance lost")
        self._forget(name)
        self.metrics.preemptions.labels("none").inc()
        self.backend.emit("reclaim", instance=name, killed=pids, notice=False)
        self._mark_lost(name)
        self.controller.on_reclaim(name)

    def reconfigure(self, config: ParallelConfig, reason: str = "manual") -> bool:
        """Move to `config` now through the usual migration (an operator's choice; later plans are the
        optimizer's again). Returns False when `config` is served already. Raises ValueError when the
        controller refuses it (not enough ready GPUs, a replica that does not fit, rerouting) or
        before the service has started."""
        if not self.started:
            raise ValueError("reconfigure: the service has not started")
        try:
            changed = self.controller.reconfigure(config, reason)
        except ValueError as exc:
            self.backend.emit("reconfigure", config=config.short(), reason=reason, refused=str(exc))
            raise
        self.backend.emit("reconfigure", config=config.short(), reason=reason, changed=changed)
        return changed

    def kill_worker(self, slot: str) -> int:
        """SIGKILL one worker process without any notice (tests, chaos); returns its pid."""
        import os
        import signal

        pid = self.pool.conns[slot].pid
        os.kill(pid, signal.SIGKILL)
        return pid

    # --- views ---------------------------------------------------------------------------------
    def refresh_metrics(self) -> None:
        counts: dict[str, int] = {}
        for inst in self.controller.instances.instances.values():
            counts[inst.state] = counts.get(inst.state, 0) + 1
        plan = self.controller.plan
        self.metrics.refresh(self.rm.queued, self.rm.n_running, plan.config if plan else None, counts)

    def summary(self) -> dict:
        """Per-request outcome and the run's recovery figures."""
        reqs = []
        for lr in self.requests.values():
            q = self.rm.requests.get(lr.rid)
            reqs.append({"id": lr.rid, "done": lr.done, "tokens": len(lr.tokens), "max_gap_s": round(lr.max_gap(), 4),
                         "interruptions": q.interruptions if q else 0, "resumes": lr.resumes,
                         "recomputed": lr.recomputed, "reprefilled": lr.reprefilled,
                         "kv_moved_bytes": lr.kv_moved_bytes, "mismatches": lr.mismatches})
        return {"requests": reqs, "recoveries": self.recoveries, "notice_to_serving": self.notice_to_serving,
                "reconfigurations": self.controller.reconfigurations}  # the start set's layout is warm
