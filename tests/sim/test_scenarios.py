"""The simulator on small hand-checked scenarios (20B shape on the T4 profile, 4-GPU instances)."""
import pytest

from spotserve.cloud.availability import parse_availability_lines
from spotserve.controller.approach import get_approach
from spotserve.controller.instances import InstanceConfig
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.sim.run import SimConfig, simulate
from spotserve.sim.traces import Arrival

COST = load_cost("20B", PACKAGE_DATA)


def trace(*rows):
    return parse_availability_lines([f'[{int(t * 1000)}, "{op}", {{"nodes": {list(n)!r}}}]'.replace("'", '"')
                                     for t, op, n in rows])


def every(dt, until, start=0.0):
    n = int((until - start) / dt)
    return [Arrival(i, start + i * dt, 512, 128) for i in range(n)]


def sim(tr, arrivals, approach="spotserve", grace=30.0, startup=0.0, price=1.9046):
    cfg = SimConfig(instance=InstanceConfig(grace_s=grace, startup_s=startup, spot_usd_per_hour=price))
    return simulate(COST, tr, arrivals, get_approach(approach), cfg)


def fates_add_up(s):
    return s["arrived"] == s["completed"] + s["rejected"] + s["unfinished"]


def test_one_preemption_migrates_before_the_deadline_without_recompute():
    # two tp-8 replicas (instances a+b, c+d); c is reclaimed, so one replica's context must move
    tr = trace((0, "add", ["a", "b", "c", "d"]), (200, "remove", ["c"]), (400, "DONE", []))
    res = sim(tr, every(3.0, 400))
    s = res.summary
    assert fates_add_up(s) and s["completed"] == s["arrived"] == 133
    notice = res.log.of("notice")
    assert [(e["t"], e["instance"], e["deadline"]) for e in notice] == [(170.0, "c", 200.0)]
    plan = [e for e in res.log.of("plan") if e["trigger"] == "notice"][0]
    mig = [e for e in res.log.of("migrate") if e["t"] >= 170][0]
    assert plan["t"] == 170.0 and plan["deadline"] == 200.0
    assert mig["t"] == pytest.approx(plan["migrate_at"]) and 170 <= mig["t"] <= 200
    assert mig["t"] + mig["stall_s"] <= 200.0 + 1e-6  # the context is off the instance before it goes
    assert s["interrupted"] > 0 and s["recomputed_tokens"] == 0
    # the baseline that reloads and restarts pays for the same preemption
    base = sim(tr, every(3.0, 400), "reparallelization").summary
    assert base["recomputed_tokens"] > 0 and base["p99_s"] > s["p99_s"]


def test_one_acquisition_with_startup_delay_is_billed_from_acquisition():
    tr = trace((0, "add", ["a", "b"]), (100, "add", ["c", "d"]), (300, "DONE", []))
    res = sim(tr, every(4.0, 300), startup=20.0, price=3600.0)  # $1 per instance-second
    acq = res.log.of("acquire")[-1]
    ready = res.log.of("ready")[-1]
    assert (acq["t"], acq["instance"], ready["t"]) == (100.0, "d", 120.0)
    assert any(e["t"] == 120.0 and e["trigger"] == "ready" and e["config"].startswith("D2")
               for e in res.log.of("plan"))  # a second tp-8 replica once c and d are up
    end = res.summary["end_s"]
    # a and b from 0 (warm start: their start-up precedes the trace), c and d from their acquisition at 100
    assert res.summary["cost_usd"] == pytest.approx(2 * end + 2 * (end - 100.0))
    assert res.summary["completed"] == res.summary["arrived"]


def test_notice_during_prefill_requeues_with_no_tokens_then_finishes():
    # 8 GPUs serve 20B; losing b leaves 4 (cannot serve), so spotserve serves until the deadline.
    # The lone request starts at 99.4; its prefill (~1.5 s) is still running at the notice (99.5)
    # and at the deadline (100): it is re-queued with no token, waits for c, then completes.
    tr = trace((0, "add", ["a", "b"]), (100, "remove", ["b"]), (150, "add", ["c"]), (600, "DONE", []))
    res = sim(tr, [Arrival(0, 99.4, 512, 128)], grace=0.5)
    (rec,) = res.records
    assert res.log.of("notice")[0]["t"] == 99.5
    assert any(e["event"] == "cannot_serve" and e["t"] == 99.5 for e in res.log.events)
    assert rec["fate"] == "completed" and rec["interruptions"] == 1 and rec["recomputed_tokens"] == 0
    assert rec["first_token_s"] > 150.0  # no token came out of the abandoned prefill
    assert [e["t"] for e in res.log.of("plan")][-1] == 150.0  # served again once c is ready


def test_two_notices_within_one_grace_period():
    tr = trace((0, "add", ["a", "b", "c", "d"]), (200, "remove", ["c"]), (210, "remove", ["d"]), (400, "DONE", []))
    res = sim(tr, every(3.0, 400))
    s = res.summary
    assert s["completed"] == s["arrived"] and s["recomputed_tokens"] == 0
    plans = [e for e in res.log.of("plan") if 150 < e["t"] < 220]
    assert [e["t"] for e in plans] == [170.0, 180.0]
    assert all(e["deadline"] == 200.0 for e in plans)  # the earliest deadline governs
    last = res.log.of("serving")[-1]
    assert last["t"] <= 200.0 + 1e-6
    gone = {"c", "d"}
    assert all(e["t"] >= 200 for e in res.log.of("reclaim")) and {e["instance"] for e in res.log.of("reclaim")} == gone


def test_every_request_accounted_for_when_the_pool_vanishes():
    tr = trace((0, "add", ["a", "b"]), (200, "remove", ["a", "b"]), (400, "DONE", []))
    res = sim(tr, every(2.0, 500))
    s = res.summary
    assert s["arrived"] == 200 and fates_add_up(s) and s["unfinished"] > 0 and s["completed"] > 0
    assert {r["fate"] for r in res.records} == {"completed", "unfinished"}
    assert all(r["reason"] == "run ended" for r in res.records if r["fate"] == "unfinished")


@pytest.mark.parametrize("approach", ["rerouting", "no-arranger", "no-mapper", "no-optimizer", "no-migration-planner"])
def test_other_approaches_complete_a_preemption(approach):
    tr = trace((0, "add", ["a", "b", "c", "d"]), (200, "remove", ["c"]), (400, "DONE", []))
    s = sim(tr, every(4.0, 400), approach).summary
    assert s["completed"] == s["arrived"] == 100
    if approach in ("rerouting", "no-arranger"):
        assert s["recomputed_tokens"] >= 0
