"""Controller.reconfigure: a forced config with requests in flight, driven by the simulator's backend.

OPT-6.7B on T4 instances of 2 GPUs (the shipped 6.7B profile: tp in 1..16, batch 1, 2, 4; tp=1 does
not fit a T4). Two instances give 4 GPUs; the forced configs are served exactly, KV caches of the
requests in flight move with them (spotserve) or the requests restart (reparallelization), and every
request completes with all its tokens.
"""
import pytest

from spotserve.controller.approach import get_approach
from spotserve.controller.controller import SERVING, Controller
from spotserve.controller.instances import InstanceConfig, InstanceManager
from spotserve.controller.policy import Policy
from spotserve.controller.requests import RequestManager
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.planner.types import ParallelConfig
from spotserve.sim.backend import SimBackend

COST = load_cost("6.7B", PACKAGE_DATA)


def cluster(approach: str = "spotserve", instances=("a", "b")):
    pol = Policy(COST)
    im = InstanceManager(InstanceConfig(gpus_per_instance=2, gpu_memory_bytes=COST.gpu_memory_bytes))
    ctl = Controller(pol, get_approach(approach), im, RequestManager(max_seq_len=2049), rate=0.5)
    be = SimBackend(pol)
    be.attach(ctl)
    for name in instances:
        ctl.on_instance_added(name)
    run_until(be, 0.0)
    return ctl, be


def run_until(be: SimBackend, t: float) -> None:
    """Process every event up to `t`, then move the clock to `t` (as the simulator does for an arrival)."""
    while be.next_time() <= t:
        be.step()
    be.t = max(be.t, t)


def events(ctl, kind):
    return [e for e in ctl.log.events if e["event"] == kind]


@pytest.mark.parametrize("approach", ["spotserve", "reparallelization"])
def test_forced_configs_in_flight(approach):
    ctl, be = cluster(approach)
    first = ctl.plan.config
    assert first is not None and ctl.phase == SERVING
    chain = [ParallelConfig(2, 1, 2, 4), ParallelConfig(1, 2, 2, 4), ParallelConfig(1, 1, 4, 2)]
    chain = [c for c in chain if c != first] + ([first] if first not in chain else [])
    rid = 0
    for k, target in enumerate(chain):
        t = be.now()
        for _ in range(4):
            ctl.on_arrival(rid, 512, 64)
            rid += 1
        shape = ctl.plan.config
        pol = ctl.policy
        run_until(be, t + pol.prefill_s(shape, 4, 512) + 10 * pol.step_s(shape, 4))  # decoding
        running = ctl.requests.n_running
        assert running > 0
        assert ctl.reconfigure(target, reason=f"bench-{k}") is True
        run_until(be, be.now() + 600.0)
        assert ctl.phase == SERVING and ctl.plan.config == target
        used = sorted(set(ctl.plan.placement.values()))
        assert len(used) == target.world_size
    assert ctl.reconfigurations >= len(chain)
    reqs = ctl.requests.requests.values()
    assert all(q.state == "completed" and q.committed == 64 for q in reqs)
    interrupted = [q for q in reqs if q.interruptions]
    assert interrupted, "the forced changes should land while requests decode"
    plans = events(ctl, "plan")
    assert [p["config"] for p in plans[-len(chain):]] == [c.short() for c in chain]
    recomputed = sum(q.recomputed_tokens for q in interrupted)
    if approach == "spotserve":  # caches move with the requests: nothing is decoded twice
        assert recomputed == 0
        assert any(e["transfers"] > 0 for e in plans[-len(chain):])
    else:  # the baseline restarts interrupted requests from scratch, from weights on disk
        assert recomputed > 0
        assert all(p["disk_bytes"] > 0 for p in plans[-len(chain):])
    assert [e["config"] for e in events(ctl, "reconfigure")] == [c.short() for c in chain]


def test_forced_dp_is_exact_and_keeps_the_served_gpus():
    """Same replica shape, fewer replicas: hysteresis would keep the current config; a forced one is taken
    as it is, on GPUs of the served layout (their context stays), and the optimizer plans again later."""
    ctl, be = cluster()
    assert ctl.reconfigure(ParallelConfig(2, 1, 2, 4))
    run_until(be, be.now() + 600.0)
    served = set(ctl.plan.placement.values())
    assert ctl.reconfigure(ParallelConfig(1, 1, 2, 4))
    run_until(be, be.now() + 600.0)
    assert ctl.plan.config == ParallelConfig(1, 1, 2, 4)
    assert set(ctl.plan.placement.values()) < served
    assert ctl.plan.disk_bytes == 0 and not ctl.plan.transfers  # one old replica kept as it was
    ctl.on_rate(0.5)  # a later plan is the optimizer's own: all four GPUs again
    run_until(be, be.now() + 600.0)
    assert ctl.plan.config.world_size == 4


def test_reconfigure_refusals():
    ctl, be = cluster()
    cur = ctl.plan.config
    assert ctl.reconfigure(cur) is False  # already served: nothing happens
    assert events(ctl, "reconfigure")[-1]["unchanged"] is True and ctl.phase == SERVING
    with pytest.raises(ValueError, match="needs 8 GPUs, 4 are ready"):
        ctl.reconfigure(ParallelConfig(2, 1, 4, 2))
    with pytest.raises(ValueError, match="tp 3 is not profiled"):
        ctl.reconfigure(ParallelConfig(1, 1, 3, 2))
    with pytest.raises(ValueError, match="batch 8 is not profiled"):
        ctl.reconfigure(ParallelConfig(1, 1, 4, 8))
    with pytest.raises(ValueError, match="does not fit"):
        ctl.reconfigure(ParallelConfig(1, 1, 1, 1))  # 6.7B fp16 on one 15 GiB T4
    assert ctl.plan.config == cur and ctl._forced is None
    rr, _ = cluster("rerouting")
    with pytest.raises(ValueError, match="rerouting"):
        rr.reconfigure(ParallelConfig(1, 1, 4, 2))


def test_forced_config_dropped_when_gpus_are_lost_before_planning():
    """An instance reclaimed at the same instant as the request: the forced config no longer fits the
    GPUs, so that plan is the optimizer's (on what is left) and serving goes on."""
    ctl, be = cluster(instances=("a", "b", "c"))
    ctl.reconfigure(ParallelConfig(3, 1, 2, 4))
    ctl.on_reclaim("c")
    run_until(be, be.now() + 600.0)
    assert [(e["config"], e["gpus"]) for e in events(ctl, "reconfigure_dropped")] == [("D3P1M2B4m1", 4)]
    assert ctl.plan is not None and ctl.plan.config.world_size <= 4 and ctl.phase == SERVING
