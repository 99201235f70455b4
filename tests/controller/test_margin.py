"""Policy's reconfiguration margin: migration is planned to end that long before a notice's deadline.

OPT-6.7B on T4 instances of 2 GPUs (shipped profile), driven by the simulator's backend: the same
notice with requests decoding is planned with margin 0 and with a margin; the arranger's start of
migration moves earlier by exactly the margin (a whole number of decode rounds), and everything else about the plan stays the same.
"""
import json

import pytest

from spotserve.controller.approach import get_approach
from spotserve.controller.controller import Controller
from spotserve.controller.instances import InstanceConfig, InstanceManager
from spotserve.controller.policy import Policy, profile_margin_s
from spotserve.controller.requests import RequestManager
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.sim.backend import SimBackend

COST = load_cost("6.7B", PACKAGE_DATA)
GRACE = 30.0


class Recording(SimBackend):
    """The simulator's backend, recording the migrate_at of every stop_batch command."""

    def __init__(self, policy):
        super().__init__(policy)
        self.stops: list[float] = []

    def stop_batch(self, replica, batch_id, at):
        self.stops.append(at)
        return super().stop_batch(replica, batch_id, at)


def _noticed(margin: float | None):
    """Three instances serve 8 decoding requests; instance c gets a notice. Out: (controller, backend,
    notice time)."""
    pol = Policy(COST) if margin is None else Policy(COST, reconfigure_margin_s=margin)
    im = InstanceManager(InstanceConfig(gpus_per_instance=2, gpu_memory_bytes=COST.gpu_memory_bytes, grace_s=GRACE))
    ctl = Controller(pol, get_approach("spotserve"), im, RequestManager(max_seq_len=2049), rate=1.0)
    be = Recording(pol)
    be.attach(ctl)
    for name in ("a", "b", "c"):
        ctl.on_instance_added(name)
    _run_until(be, 0.0)
    for rid in range(8):
        ctl.on_arrival(rid, 512, 1000)  # long outputs: still decoding at the deadline
    _run_until(be, 5.0)
    assert ctl.requests.n_running > 0
    hit = {g.split("/")[0] for r in ctl.replicas.values() if r.requests for g in r.gpus}
    name = sorted(hit)[0]
    t = be.now()
    ctl.on_notice(name, t + GRACE)
    _run_until(be, t)  # changes at one instant are planned together, right after it
    return ctl, be, t


def _run_until(be, t: float) -> None:
    while be.next_time() <= t:
        be.step()
    be.t = max(be.t, t)


def _plan_event(ctl) -> dict:
    plans = [e for e in ctl.log.events if e["event"] == "plan" and e["trigger"] == "notice"]
    assert len(plans) == 1
    return plans[0]


def test_margin_moves_migration_start_earlier_by_exactly_the_margin():
    # the arranger stops a batch on a decode-round boundary: a margin of whole rounds moves it exactly
    shape = _noticed(0.0)[0].plan.config
    margin = 30 * Policy(COST).step_s(shape, shape.batch)
    ctl0, be0, t0 = _noticed(0.0)
    ctl1, be1, t1 = _noticed(margin)
    assert t0 == t1 and 1.0 < margin < GRACE / 2  # a margin of a few seconds
    p0, p1 = _plan_event(ctl0), _plan_event(ctl1)
    assert be0.stops and len(be0.stops) == len(be1.stops)
    start0, start1 = set(be0.stops), set(be1.stops)
    assert len(start0) == len(start1) == 1
    m0, m1 = start0.pop(), start1.pop()
    assert t0 < m0 < t0 + GRACE and t1 < m1  # the arranger keeps decoding after the notice
    assert m0 - m1 == pytest.approx(margin, abs=1e-9)
    assert p0["deadline"] == t0 + GRACE and p1["deadline"] == pytest.approx(t0 + GRACE - margin, abs=1e-12)
    for key in ("config", "transfers", "disk_bytes", "reused_bytes", "est_seconds"):
        assert p0[key] == p1[key], key


def test_default_margin_is_zero_and_plans_against_the_real_deadline():
    ctl, be, t = _noticed(None)
    assert ctl.policy.reconfigure_margin_s == 0.0
    assert _plan_event(ctl)["deadline"] == t + GRACE


def test_margin_is_at_most_half_the_grace():
    pol = Policy(COST, reconfigure_margin_s=3.0)
    assert pol.margin_s(10.0) == 3.0 and pol.margin_s(4.0) == 2.0
    assert pol.planning_deadline(100.0, 110.0) == 107.0
    assert pol.planning_deadline(100.0, 104.0) == 102.0
    assert Policy(COST).planning_deadline(100.0, 104.0) == 104.0
    with pytest.raises(ValueError, match="reconfigure_margin_s"):
        Policy(COST, reconfigure_margin_s=-1.0)


def test_profile_margin_read_from_the_profile_file(tmp_path):
    p = tmp_path / "p.json"
    p.write_text(json.dumps({"layer_num": 2}))
    assert profile_margin_s(p) == 0.0
    p.write_text(json.dumps({"layer_num": 2, "reconfigure_margin_s": 1.25}))
    assert profile_margin_s(p) == 1.25
    p.write_text(json.dumps({"layer_num": 2, "reconfigure_margin_s": "1s"}))
    with pytest.raises(ValueError, match="p.json.*reconfigure_margin_s"):
        profile_margin_s(p)
    p.write_text("{")
    with pytest.raises(ValueError, match="p.json"):
        profile_margin_s(p)
