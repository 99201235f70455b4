"""LiveBackend moves running requests' KV caches between parallel configs of real worker processes
(tp=2 -> pp=2 with the slots swapped -> one slot) and they finish token-identical, with no prefill."""
from __future__ import annotations

import asyncio
import secrets

import pytest

from live_harness import random_requests, reference
from spotserve.live.backend import LiveBackend
from spotserve.live.launcher import LocalLauncher
from spotserve.live.pool import WorkerPool
from spotserve.live.requests import LiveRequest
from spotserve.planner.types import ParallelConfig, Position, ReconfigurationPlan


class Q:
    """The controller's view of a request (what LiveBackend reads)."""

    def __init__(self, rid, input_len, output_len):
        self.id, self.input_len, self.output_len = rid, input_len, output_len
        self.committed, self.kv_ready = 0, False


class FakeController:
    def __init__(self):
        self.done: asyncio.Queue = asyncio.Queue()
        self.plans: asyncio.Queue = asyncio.Queue()

    def attach(self, backend):
        self.backend = backend

    def on_batch_done(self, replica, batch_id, progress, stopped=False):
        self.done.put_nowait((batch_id, progress, stopped))

    def on_plan_done(self, plan_id):
        self.plans.put_nowait(plan_id)


def _plan(pp: int, tp: int, slots: list[str]) -> ReconfigurationPlan:
    cfg = ParallelConfig(1, pp, tp, 4)
    return ReconfigurationPlan(cfg, {p: slots[i] for i, p in enumerate(cfg.positions())}, [], 0.0)


async def _scenario(ckpt: str, run_dir, reqs) -> tuple[dict, LiveBackend]:
    import torch.distributed as dist

    token = secrets.token_hex(16).encode()
    (run_dir / "token").write_bytes(token)
    pool = WorkerPool(token, heartbeat_timeout_s=5.0)
    port = await pool.start()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launcher = LocalLauncher(f"127.0.0.1:{port}", run_dir / "token", ckpt, run_dir / "logs")
    try:
        await pool.wait_for(launcher.spawn("m0", 2), 120)
        lrs = {i: LiveRequest(i, p, {"max_new_tokens": n, "temperature": 0.0, "top_p": 1.0, "seed": 0})
               for i, (p, n) in enumerate(reqs)}
        qs = [Q(i, len(p), n) for i, (p, n) in enumerate(reqs)]
        ctl = FakeController()
        be = LiveBackend(pool, lrs, {"block_size": 4, "num_blocks": 64, "max_batch": 8, "timeout_s": 20.0,
                                     "store_port": store.port})
        be.attach(ctl)
        layouts = [(1, 2, ["m0/g0", "m0/g1"]), (2, 1, ["m0/g1", "m0/g0"]), (1, 1, ["m0/g1"])]
        for k, (pp, tp, slots) in enumerate(layouts):
            be.execute_plan(_plan(pp, tp, slots), k, 0.0)
            assert await asyncio.wait_for(ctl.plans.get(), 120) == k
            be.start_batch(0, ParallelConfig(1, pp, tp, 4), k, qs)
            last = k == len(layouts) - 1
            if not last:  # let every request decode a few tokens here, then stop at a step boundary
                target = {q.id: q.committed + 5 for q in qs}
                while not all(len(lrs[q.id].tokens) >= target[q.id] for q in qs):
                    await asyncio.sleep(0.005)
                be.stop_batch(0, k, be.now())
            batch_id, progress, stopped = await asyncio.wait_for(ctl.done.get(), 120)
            assert batch_id == k and stopped == (not last)
            for p, q in zip(progress, qs):
                q.committed += p.new_tokens
                q.kv_ready = True
        return lrs, be
    finally:
        launcher.close()
        await pool.close()


@pytest.mark.timeout(180)
def test_kv_moves_across_tp_pp_changes_without_recompute(live_ckpt, tmp_path):
    reqs = random_requests(3, seed=5, out=(24, 30))
    want = reference(live_ckpt, reqs)
    lrs, be = asyncio.run(_scenario(live_ckpt, tmp_path, reqs))
    assert [lrs[i].tokens for i in range(len(reqs))] == want
    for lr in lrs.values():
        assert [r["how"] for r in lr.resumes] == ["kv", "kv"]  # two config changes, cache moved both times
        assert lr.reprefilled == 0 and lr.recomputed == 0 and lr.kv_moved_bytes > 0
    assert [e["config_id"] for e in be.events if e["event"] == "configured"] == [1, 2, 3]
