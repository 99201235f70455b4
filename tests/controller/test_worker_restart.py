"""Controller.on_worker_restarted: a crashed worker came back on its slot; only its replica is re-formed.

OPT-6.7B on T4 instances of 2 GPUs (shipped profile), three instances serving D3P1M2, driven by the
simulator's backend. The replica of the restarted worker stops its batch with tokens kept and is
installed again with the same layout under a new plan; the other replicas decode straight through.
"""
import pytest

from spotserve.controller.approach import get_approach
from spotserve.controller.controller import SERVING, Controller
from spotserve.controller.instances import InstanceConfig, InstanceManager
from spotserve.controller.policy import Policy
from spotserve.controller.requests import RequestManager
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.sim.backend import SimBackend

COST = load_cost("6.7B", PACKAGE_DATA)
OUT = 200


def _serving():
    pol = Policy(COST)
    im = InstanceManager(InstanceConfig(gpus_per_instance=2, gpu_memory_bytes=COST.gpu_memory_bytes))
    ctl = Controller(pol, get_approach("spotserve"), im, RequestManager(max_seq_len=2049), rate=1.0)
    be = SimBackend(pol)
    be.attach(ctl)
    for name in ("a", "b", "c"):
        ctl.on_instance_added(name)
    _run_until(be, 0.0)
    for rid in range(12):
        ctl.on_arrival(rid, 512, OUT)
    _run_until(be, 5.0)
    return ctl, be


def _replicas(plan) -> set[frozenset]:
    """Each replica as its set of (stage, shard, GPU): the layout without replica numbers."""
    out: dict[int, set] = {}
    for pos, g in plan.placement.items():
        out.setdefault(pos.replica, set()).add((pos.stage, pos.shard, g))
    return {frozenset(v) for v in out.values()}


def _run_until(be, t: float) -> None:
    while be.next_time() <= t:
        be.step()
    be.t = max(be.t, t)


@pytest.mark.parametrize("lost_first", [True, False])
def test_restart_reforms_only_its_replica_with_the_same_layout(lost_first):
    ctl, be = _serving()
    before = ctl.plan
    hit = next(r for r in ctl.replicas.values() if r.requests and r.batch_id is not None)
    gpu = hit.gpus[-1]
    victims = {q.id for q in hit.requests}
    others = {q.id for r in ctl.replicas.values() if r is not hit for q in r.requests if q.state == "running"}
    assert victims and others
    if lost_first:  # the loss, then the restart 2 s later: the replica serves nothing meanwhile
        assert ctl.on_worker_lost(gpu) is True
        assert hit.batch_id is None and all(ctl.requests.requests[i].state != "running" for i in victims)
        _run_until(be, be.now() + 2.0)
        assert hit.batch_id is None and ctl.replicas[hit.index] is hit
    assert ctl.on_worker_restarted(gpu) is True
    _run_until(be, be.now())
    plans = [e for e in ctl.log.events if e["event"] == "plan"]
    assert plans[-1]["trigger"] == "worker_restarted"
    assert plans[-1]["config"] == before.config.short() and plans[-1]["transfers"] == 0
    assert plans[-1]["disk_bytes"] == 0
    assert hit.index not in plans[-1]["kept"] and len(plans[-1]["kept"]) == len(before.replica_configs()) - 1
    _run_until(be, be.now() + 600.0)
    assert ctl.phase == SERVING and _replicas(ctl.plan) == _replicas(before)  # same layout (indices may differ)
    reqs = ctl.requests.requests
    assert all(q.state == "completed" and q.committed == OUT for q in reqs.values())
    assert all(reqs[i].interruptions for i in victims)  # its batch stopped, tokens kept
    assert all(not reqs[i].interruptions for i in others)  # the other replicas decoded straight through
    assert sum(q.recomputed_tokens for q in reqs.values()) == 0


def test_restart_of_an_unused_gpu_changes_nothing():
    ctl, be = _serving()
    n = len([e for e in ctl.log.events if e["event"] == "plan"])
    assert ctl.on_worker_lost("zz/g0") is False and ctl.on_worker_restarted("zz/g0") is False
    _run_until(be, be.now() + 1.0)
    assert len([e for e in ctl.log.events if e["event"] == "plan"]) == n
    assert [e["gpu"] for e in ctl.log.events if e["event"] == "worker_restarted"] == ["zz/g0"]
