"""Context daemons in the live cluster (engine setting "daemon"): every worker slot keeps its weight
shards in its own daemon's buffers. A worker process SIGKILLed alone and restarted on its slot
re-attaches them (no checkpoint byte) and serves again; killing the instance kills its daemons too
and leaves nothing in /dev/shm; a notice that changes a replica's shape moves shards between
daemon buffers, token-identical to an uninterrupted run."""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from live_harness import ServiceThread, random_requests, reference
from spotserve.daemon.client import DaemonClient
from spotserve.live.backend import LiveBackend
from spotserve.live.context import buffer_names
from spotserve.live.daemons import daemon_pid, instance_daemons
from spotserve.live.forkserver import alive
from spotserve.live.launcher import LocalLauncher
from spotserve.live.pool import WorkerPool
from spotserve.live.profile import reconfigure_margin
from spotserve.live.requests import LiveRequest
from spotserve.live.service import LiveConfig
from spotserve.models import get_spec
from spotserve.planner.types import ParallelConfig, ReconfigurationPlan

SPEC = get_spec("opt-tiny")
SHM = Path("/dev/shm")


def shm_of(name: str) -> list[str]:
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(f"spotserve.{name}."))


def daemon_buffers(launcher: LocalLauncher, slot: str) -> dict:
    """Buffer name -> BufferInfo of the daemon of `slot`."""
    with DaemonClient.connect(launcher.daemon_name(slot), launcher.daemon_dir, timeout=10) as c:
        return {b.name: b for b in c.list()}


def assert_holds(launcher: LocalLauncher, slot: str, layout: tuple) -> None:
    """The daemon of `slot` holds exactly the sealed shards of `layout` and one record of it."""
    bufs = daemon_buffers(launcher, slot)
    want = set(buffer_names(SPEC, layout).values())
    records = [n for n in bufs if n.startswith("ctx/")]
    assert set(bufs) - set(records) == want, sorted(set(bufs) ^ want)
    assert all(b.sealed for b in bufs.values())
    assert len(records) == 1 and records[0].startswith("ctx/" + ".".join(map(str, layout)) + ".")


def assert_gone(launcher: LocalLauncher, instance: str, names: list[str], pids: list[int]) -> None:
    """No daemon of `instance` runs, and none left a segment, socket or token behind."""
    for name in names:
        assert daemon_pid(name) is None and shm_of(name) == []
        assert not list(Path(launcher.daemon_dir).glob(f"spotserve-{name}.*"))
    left = {p: Path(f'/proc/{p}/stat').read_text() for p in pids if alive(p)}
    assert not left, left
    assert instance_daemons(instance, launcher.scope) == []


# --- the slot context on its own -----------------------------------------------------------------------
@pytest.mark.timeout(30)
def test_slot_context_records_restores_and_is_killed_with_its_files(live_ckpt, tmp_path):
    import tempfile

    import torch

    from spotserve.live.context import SlotContext
    from spotserve.live.daemons import daemon_name, kill_daemon, scope_of
    from spotserve.models.loader import load_shard

    with pytest.raises(ValueError, match="INSTANCE/gK"):
        daemon_name("no-slot", "abcd1234")
    ddir = tempfile.mkdtemp(prefix="sd", dir="/tmp")  # socket paths are limited to 107 bytes
    name = daemon_name("ctx-test/g1", scope_of(tmp_path))
    ctx = SlotContext.open(name, ddir, "cpu")
    try:
        assert SlotContext.connect(name, ddir).pid == ctx.pid  # a second process of the slot finds it
        layout = (1, 2, 0, 1)
        shard = load_shard(live_ckpt, 1, 0, 2, 1)
        ctx.begin(set())
        for n, bname in buffer_names(SPEC, layout).items():
            ctx.alloc(bname, shard[n].shape, torch.float32).copy_(shard[n])
        assert SlotContext.connect(name, ddir).restore(SPEC) is None  # not recorded yet: nothing to trust
        ctx.commit(layout, torch.float32)
        weights, held, nbytes = SlotContext.connect(name, ddir).restore(SPEC)
        assert held == layout and nbytes == sum(t.numel() * 4 for t in shard.values())
        assert all(torch.equal(weights[n], shard[n]) for n in shard)
        keep = set(buffer_names(SPEC, layout).values())
        ctx.begin(keep)
        with pytest.raises(ValueError, match="still in use"):  # a migration never rewrites what it reads
            ctx.alloc(next(iter(keep)), (1,), torch.float32)
        assert SlotContext.connect(name, ddir).restore(SPEC)[1] == layout  # still complete mid-change
        newer = (1, 1, 0, 0)  # recorded, but one shard missing: nothing is re-attached
        ctx.commit(newer, torch.float32)
        assert SlotContext.connect(name, ddir).restore(SPEC) is None
        pid = ctx.pid
        assert shm_of(name) and kill_daemon(name, ddir) == pid
        assert not alive(pid) and shm_of(name) == [] and not list(Path(ddir).glob(f"spotserve-{name}.*"))
        assert SlotContext.connect(name, ddir) is None
    finally:
        kill_daemon(name, ddir)
        ctx.proc.proc.wait(5)  # reap our child
        shutil.rmtree(ddir, ignore_errors=True)


# --- worker level: a crashed worker restarted on its slot --------------------------------------------
class Q:
    def __init__(self, rid, input_len, output_len):
        self.id, self.input_len, self.output_len = rid, input_len, output_len
        self.committed, self.kv_ready, self.interruptions = 0, False, 0


class FakeController:
    def __init__(self):
        self.done: asyncio.Queue = asyncio.Queue()
        self.plans: asyncio.Queue = asyncio.Queue()
        self.approach = SimpleNamespace(mode="spotserve")

    def attach(self, backend):
        self.backend = backend

    def on_batch_done(self, replica, batch_id, progress, stopped=False):
        self.done.put_nowait((batch_id, progress, stopped))

    def on_plan_done(self, plan_id):
        self.plans.put_nowait(plan_id)


def _diagnose(be: LiveBackend, run_dir: Path) -> str:
    """The backend's last events and the tail of every worker log (for a failed assertion)."""
    logs = {p.name: p.read_text()[-1500:] for p in sorted((run_dir / "logs").glob("*.log"))}
    return json.dumps({"events": be.events[-12:], "logs": logs}, indent=1, default=str)


def _plan(pp: int, tp: int, slots: list[str]) -> ReconfigurationPlan:
    cfg = ParallelConfig(1, pp, tp, 4)
    return ReconfigurationPlan(cfg, {p: slots[i] for i, p in enumerate(cfg.positions())}, [], 0.0)


async def _crash_and_restart(ckpt: str, run_dir: Path, reqs, tp: int = 2, engine: dict | None = None) -> dict:
    """Serve `reqs` on one tp-`tp` replica of instance m0, SIGKILL the worker process of its last slot
    mid-generation, respawn it on its slot, re-form the replica and finish; then kill the instance."""
    import torch.distributed as dist

    token = secrets.token_hex(16).encode()
    (run_dir / "token").write_bytes(token)
    pool = WorkerPool(token, heartbeat_timeout_s=5.0)
    port = await pool.start()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launcher = LocalLauncher(f"127.0.0.1:{port}", run_dir / "token", ckpt, run_dir / "logs")
    slots = [f"m0/g{k}" for k in range(tp)]
    victim = slots[-1]
    out = {"launcher": launcher}
    try:
        await pool.wait_for(launcher.spawn("m0", tp), 120)
        lrs = {i: LiveRequest(i, p, {"max_new_tokens": n, "temperature": 0.0, "top_p": 1.0, "seed": 0})
               for i, (p, n) in enumerate(reqs)}
        qs = [Q(i, len(p), n) for i, (p, n) in enumerate(reqs)]
        ctl = FakeController()
        be = LiveBackend(pool, lrs, {"block_size": 4, "num_blocks": 64, "max_batch": 8, "timeout_s": 20.0,
                                     "store_port": store.port, "daemon": True, **(engine or {})})
        be.attach(ctl)
        shape = ParallelConfig(1, 1, tp, 4)
        be.execute_plan(_plan(1, tp, slots), 0, 0.0)  # first load: every shard from the checkpoint
        assert await asyncio.wait_for(ctl.plans.get(), 60) == 0
        out["first_holds"] = [daemon_buffers(launcher, s) for s in slots]
        be.start_batch(0, shape, 0, qs)
        end = asyncio.get_running_loop().time() + 20
        while not all(len(lrs[q.id].tokens) >= 4 for q in qs):
            assert asyncio.get_running_loop().time() < end, _diagnose(be, run_dir)
            await asyncio.sleep(0.005)
        # the crash: one worker process alone; its instance (and the daemon of its slot) lives on
        old_pid = pool.alive(victim).pid
        os.kill(old_pid, signal.SIGKILL)
        while pool.alive(victim) is not None:
            await asyncio.sleep(0.01)
        for p, q in zip(be.abort_batch(0, 0), qs):
            q.committed += p.new_tokens  # resumed from the commit (the crashed worker's KV is gone)
        # the survivors answer once their step with the dead peer has failed (commands run in order):
        # only then can they form the next process group
        t_ping = asyncio.get_running_loop().time()
        await asyncio.gather(*(pool.alive(s).call("ping", {}, 40) for s in slots[:-1]))
        print("survivors free after", round(asyncio.get_running_loop().time() - t_ping, 3), "s")
        new_pid = launcher.respawn(victim)
        conn = (await pool.wait_for([victim], 60))[0]
        assert conn.pid == new_pid != old_pid
        out["hello"] = dict(conn.hello)
        be.held[victim] = tuple(conn.hello["holds"])  # what it holds, from its hello
        be.execute_plan(_plan(1, tp, slots), 1, 0.0)
        assert await asyncio.wait_for(ctl.plans.get(), 60) == 1
        be.start_batch(0, shape, 1, qs)
        batch_id, _, stopped = await asyncio.wait_for(ctl.done.get(), 30)
        assert batch_id == 1 and not stopped, _diagnose(be, run_dir)
        out["tokens"] = [lrs[i].tokens for i in range(len(reqs))]
        out["migrations"] = be.migrations
        out["holds"] = {s: daemon_buffers(launcher, s) for s in slots}
        assert_holds(launcher, victim, (1, tp, 0, tp - 1))
        names = [launcher.daemon_name(s) for s in slots]
        dpids = [daemon_pid(n) for n in names]
        assert all(dpids) and all(shm_of(n) for n in names)
        killed = launcher.kill("m0")  # the instance goes: workers and daemons
        assert set(dpids) <= set(killed)
        assert_gone(launcher, "m0", names, killed)
        return out
    finally:
        launcher.close()
        await pool.close()


@pytest.mark.timeout(60)
def test_sigkilled_worker_restarts_on_its_slot_reattaching_its_shards(live_ckpt, tmp_path):
    reqs = random_requests(3, seed=21, out=(20, 26))
    want = reference(live_ckpt, reqs)
    out = asyncio.run(_crash_and_restart(live_ckpt, tmp_path, reqs))
    assert out["tokens"] == want
    first, second = out["migrations"]
    assert first["checkpoint_bytes"] > 0 and not first["old"]
    hello = out["hello"]
    shard_bytes = sum(b.nbytes for n, b in out["first_holds"][1].items() if n.startswith("w/"))
    assert hello["holds"] == [1, 2, 0, 1] and hello["attached_bytes"] == shard_bytes > 0
    assert hello["daemon"] == out["launcher"].daemon_name("m0/g1")
    # the restarted worker serves on the shards it re-attached: nothing read, nothing moved
    assert second["old"] and sorted(second["live"]) == ["m0/g0", "m0/g1"]
    assert second["checkpoint_bytes"] == second["loaded_bytes"] == second["received_bytes"] == 0
    assert second["workers"]["m0/g1"]["checkpoint_bytes"] == 0


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_restarted_worker_reattaches_cuda_buffers(live_ckpt, tmp_path):
    """The same crash on one GPU (fp16): the daemon holds the shards in cudaMalloc'd memory and the
    restarted worker maps them over CUDA IPC. Needs 1 GPU."""
    import torch

    from spotserve.engine.config import EngineConfig
    from spotserve.engine.engine import Engine
    from spotserve.engine.sequence import SamplingParams

    assert torch.cuda.device_count() >= 1, "this test needs a GPU"
    reqs = random_requests(3, seed=21, out=(20, 26))
    out = asyncio.run(_crash_and_restart(live_ckpt, tmp_path, reqs, tp=1, engine={"device": "cuda", "dtype": "fp16"}))
    first, second = out["migrations"]
    print("configure s:", first["seconds"], second["seconds"], "hello:", out["hello"])
    assert out["hello"]["holds"] == [1, 1, 0, 0] and out["hello"]["attached_bytes"] > 0
    assert first["checkpoint_bytes"] > 0 and second["checkpoint_bytes"] == second["loaded_bytes"] == 0
    assert [len(t) for t in out["tokens"]] == [n for _, n in reqs]
    eng = Engine(EngineConfig(live_ckpt, dtype="fp16", device="cuda:0", num_blocks=256))
    for i, (p, n) in enumerate(reqs):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=n))
    ref = eng.run()
    # a resume re-prefills in fp16: a near-tie of the random model may flip; the agreement is printed
    same = sum(a == b for i in range(len(reqs)) for a, b in zip(out["tokens"][i], ref[str(i)]))
    print("tokens equal to an uninterrupted fp16 run:", same, "of", sum(n for _, n in reqs))


# --- cluster level: a notice that changes a replica's shape ------------------------------------------
def _profile() -> dict:
    """tp 3 fastest, tp 2 next, pipelines costly; 500 kB per slot: one slot cannot hold the model
    (so 4 slots serve D1M3 and 2 slots D1M2, whatever this machine's timings)."""
    d = {"name": "synthetic-tiny", "model": "opt-tiny", "layer_num": SPEC.num_layers, "dtype": "fp32",
         "init_tokens": 16, "final_fix_factor": 1.0, "embed": [], "pp_init_comm": 20.0, "pp_incr_comm": 20.0,
         "gpu_memory_bytes": 500_000, "gpus_per_instance": 2, "reserved_bytes": 0,
         "bandwidth": {"intra_bytes_per_s": 1e9, "inter_bytes_per_s": 1e9, "disk_bytes_per_s": 1e8},
         "reconfigure_margin_s": reconfigure_margin(0.5)}  # process groups + engine start (Policy.planning_deadline)
    for tp, f in ((1, 8.0), (2, 4.0), (3, 1.0)):
        d[f"tp-{tp}"] = {f"bsz-{b}": {"init": f * (1 + 0.2 * b), "incr": f * (0.5 + 0.05 * b)} for b in (1, 2, 4, 8)}
    return d


def _wait_serving(st: ServiceThread, config: str, timeout: float = 40) -> list[str]:
    """Wait for `config` to serve; returns the slots of its replica 0 in rank order."""
    svc = st.svc

    def ok():
        plan = svc.controller.plan
        return (plan is not None and plan.config.short().startswith(config) and svc.controller.phase == "serving"
                and all(rt.ready.is_set() and not rt.failed for rt in svc.backend.replicas.values()))
    st.wait_for(ok, timeout)
    return st.call(lambda: list(svc.backend.replicas[0].slots))


@pytest.mark.timeout(60)
def test_notice_moves_shards_between_daemon_buffers_and_kills_take_the_daemons(live_ckpt, tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps(_profile()))
    engine = {"block_size": 8, "num_blocks": 128, "max_batch": 8, "timeout_s": 10.0, "daemon": True}
    cfg = LiveConfig(live_ckpt, str(tmp_path / "profile.json"), str(tmp_path / "run"), gpus_per_instance=2,
                     rate=2.0, grace_s=4.0, engine=engine)
    reqs = random_requests(4, seed=22, out=(70, 80))
    want = reference(live_ckpt, reqs)
    st = ServiceThread(cfg, ["i0", "i1"], http=False)
    svc = st.svc
    launcher = svc.launcher
    try:
        before = _wait_serving(st, "D1P1M3")
        for k, slot in enumerate(before):
            assert_holds(launcher, slot, (1, 3, 0, k))  # the first load went to daemon buffers
        st.call(lambda: setattr(svc.backend, "step_pause_s", 0.03))
        lrs = [st.call(svc.submit, p, n) for p, n in reqs]
        st.wait_for(lambda: all(len(lr.tokens) >= 3 for lr in lrs))
        i1 = [launcher.daemon_name(s) for s in before if s.startswith("i1/")]  # its idle slot has none
        i1_pids = [daemon_pid(n) for n in i1]
        assert all(i1_pids)
        n_mig = len(svc.backend.migrations)
        st.call(svc.notice, "i1", 4.0)
        got = st.wait_all(lrs, 50)
        st.call(lambda: setattr(svc.backend, "step_pause_s", 0.0))
        after = _wait_serving(st, "D1P1M2")
        assert got == want  # token-identical to an uninterrupted run
        first, moved = svc.backend.migrations[0], svc.backend.migrations[n_mig]
        assert first["checkpoint_bytes"] > 0
        # shards moved between daemon buffers, worker to worker, none read from the checkpoint
        assert moved["old"] and moved["received_bytes"] > 0
        assert moved["checkpoint_bytes"] == moved["loaded_bytes"] == 0
        assert sum(m["checkpoint_bytes"] for m in svc.backend.migrations[1:]) == 0
        for k, slot in enumerate(after):
            assert_holds(launcher, slot, (1, 2, 0, k))  # the old shards were released
        # the deadline: i1's workers and daemons are SIGKILLed, their segments gone
        st.wait_for(lambda: any(e["event"] == "reclaim" and e["instance"] == "i1" for e in svc.backend.events), 10)
        assert_gone(launcher, "i1", i1, i1_pids)
        # a notice-less loss of the instance (its daemons and workers die): the service takes it as gone
        # (a worker alone that dies is restarted on its slot instead: test_worker_respawn.py)
        i0 = [launcher.daemon_name(s) for s in after]
        i0_pids = [daemon_pid(n) for n in i0]
        st.call(launcher.kill, "i0")
        st.wait_for(lambda: any(e["event"] == "reclaim" and e["instance"] == "i0" for e in svc.backend.events), 10)
        assert_gone(launcher, "i0", i0, i0_pids)
    finally:
        st.close()
    assert instance_daemons("i0", launcher.scope) == instance_daemons("i1", launcher.scope) == []
