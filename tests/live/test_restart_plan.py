"""After a controller restart that adopts every worker, the first plan starts from the layout they hold
(Controller.adopt_layout): no slice is read from the disk or sent, and the cluster serves again."""
from __future__ import annotations

import asyncio

import pytest

from live_harness import random_requests, reference
from spotserve.live.adopt import held_plan
from spotserve.live.service import LiveConfig, LiveService
from spotserve.planner.types import ParallelConfig, Position

pytestmark = pytest.mark.timeout(180)


async def _serving(svc: LiveService, timeout: float = 90.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not (svc.controller.plan is not None and svc.controller.phase == "serving" and svc.backend.plans_done
               and all(rt.ready.is_set() for rt in svc.backend.replicas.values())):
        if loop.time() > end:
            raise TimeoutError("the service did not start serving")
        await asyncio.sleep(0.05)


def test_first_plan_after_restart_reads_nothing_from_disk(live_ckpt, live_profile, tmp_path):
    cfg = LiveConfig(live_ckpt, live_profile, str(tmp_path / "run"), gpus_per_instance=2, rate=200.0,
                     state_path=str(tmp_path / "state.sqlite"), reconnect_s=30.0)
    reqs = random_requests(2, seed=3, out=(12, 16))
    want = reference(live_ckpt, reqs)

    async def go():
        svc = LiveService(cfg)
        await svc.start(["i0"])
        await _serving(svc)
        first_plan = svc.controller.log.of("plan")[0]
        served = svc.controller.plan.config
        pids = {n: c.pid for n, c in svc.pool.conns.items() if c.alive}
        # the controller goes away without closing: its workers keep their weights and reconnect
        svc.launcher.server.close()
        await svc.pool.close()
        svc.store.close()
        again = LiveService(cfg)
        try:
            await again.start(["i0"])
            await _serving(again)
            lrs = [again.submit(p, n) for p, n in reqs]
            got = await asyncio.wait_for(asyncio.gather(*(lr.wait() for lr in lrs)), 60)
            return (first_plan, served, pids, again.adopted, again.controller.log.of("held"),
                    again.controller.log.of("plan")[0], again.controller.plan.config,
                    [e for e in again.backend.events if e["event"] == "configured"][0], got)
        finally:
            await again.close()

    first_plan, served, pids, adopted, held, plan, config, configured, got = asyncio.run(go())
    assert first_plan["disk_bytes"] > 0  # the first start reads every slice
    assert adopted == {"i0": pids} and held and held[0]["config"] == served.short()
    assert config == served
    assert plan["disk_bytes"] == 0 and plan["transfers"] == 0  # every slice is where it was
    assert configured["checkpoint_bytes"] == configured["received_bytes"] == 0 and configured["failed"] == []
    assert got == want


class _Run:
    def __init__(self, pp, tp, slots):
        self.shape, self.slots = ParallelConfig(1, pp, tp, 1), slots


def test_held_plan_takes_the_served_batch_and_leaves_out_unknown_shapes():
    runs = [_Run(1, 2, ["a/g0", "a/g1"]), _Run(1, 1, ["b/g0"]), _Run(2, 1, ["c/g0", "c/g1"]),
            _Run(1, 2, ["d/g0", "d/g1"])]
    served = {"config": [3, 1, 2, 8, 2], "extra": [1, 1, 1, 4, 1]}
    plan = held_plan(runs, served)
    assert plan.config == ParallelConfig(2, 1, 2, 8, 2) and plan.extra == ParallelConfig(1, 1, 1, 4, 1)
    assert plan.placement == {Position(0, 0, 0): "a/g0", Position(0, 0, 1): "a/g1", Position(1, 0, 0): "d/g0",
                              Position(1, 0, 1): "d/g1", Position(2, 0, 0): "b/g0"}  # the pp=2 replica is left out
    assert plan.transfers == [] and plan.disk_bytes == 0
    only_extra = held_plan([_Run(1, 1, ["b/g0"])], served)
    assert only_extra.config == ParallelConfig(1, 1, 1, 4, 1) and only_extra.extra is None
    assert held_plan(runs, None) is None and held_plan([], served) is None
    assert held_plan(runs, {"config": [1, 1, 3, 8, 4]}) is None  # unreadable record (batch % micro-batches)
