"""Each ablation switch changes what the simulator charges, on small hand-checked scenarios (T4 profile).

20B replicas here are tp-8 over two instances (P1M8B4): one request alone takes P = 1.559 s of prefill
and then 127 decode steps of S = 0.0854 s, T(1) = 12.41 s.
"""
import pytest

from spotserve.cloud.availability import parse_availability_lines
from spotserve.controller.approach import get_approach
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.sim.run import SimConfig, simulate
from spotserve.sim.traces import Arrival

COST20 = load_cost("20B", PACKAGE_DATA)
P = float(COST20.prefill_seconds(1, 8, 1, 1))
S = float(COST20.decode_round_seconds(1, 8, 1, 1))
T1 = float(COST20.batch_seconds(1, 8, 1, 1))


def trace(*rows, rate=None):
    lines = [f'[{int(t * 1000)}, "{op}", {{"nodes": {list(n)!r}}}]'.replace("'", '"') for t, op, n in rows]
    if rate is not None:  # the required throughput the optimizer plans for
        lines.insert(1, f'[0, "other", {{"required_tpt": {rate}}}]')
    return parse_availability_lines(lines)


def run(tr, arrivals, approach, cost=COST20):
    return simulate(cost, tr, arrivals, get_approach(approach), SimConfig())


def latency(res, rid=0):
    return next(r for r in res.records if r["id"] == rid)["latency_s"]


def test_hand_checked_batch_times():
    assert (round(P, 3), round(S, 4), round(T1, 2)) == (1.559, 0.0854, 12.41)
    assert T1 == pytest.approx(P + 127 * S)


def test_no_migration_planner_restarts_changed_replicas_only_after_the_whole_migration():
    # 30B at 0.35 req/s: 28 GPUs serve P2M8 + an extra P3M4; two instances arrive at 100 -> D3P3M4.
    # Every replica changes. With the migration planner a replica serves once its first stages have
    # landed (progressive restart); without it every replica waits for the whole plan.
    cost = load_cost("30B", PACKAGE_DATA)
    names = [f"n{i}" for i in range(9)]
    tr = trace((0, "add", names[:7]), (100, "add", names[7:]), (300, "DONE", []), rate=0.35)
    arrivals = [Arrival(0, 100.5, 512, 128)]
    on, off = run(tr, arrivals, "spotserve", cost), run(tr, arrivals, "no-migration-planner", cost)
    mig_on, mig_off = on.log.of("migrate")[-1], off.log.of("migrate")[-1]
    assert mig_on["config"] == mig_off["config"] == "D3P3M4B4m2" and mig_on["kept"] == mig_off["kept"] == {}
    stall = mig_off["stall_s"]
    assert stall > 1.0 and all(v == pytest.approx(stall) for v in mig_off["ready_s"].values())
    assert mig_on["first_ready_s"] < stall  # replica 0 starts before the plan is done
    t1 = float(cost.batch_seconds(3, 4, 1, 1))
    assert latency(on) < latency(off) == pytest.approx(100 + stall - 100.5 + t1, abs=1e-3)


def test_unchanged_replicas_serve_through_a_migration_with_or_without_the_migration_planner():
    # 16 GPUs serve D2; two instances arrive at 100 -> D3. The old replicas are unchanged and serve
    # the request that arrives just after at once; only the new replica waits for its weights.
    tr = trace((0, "add", ["a", "b", "c", "d"]), (100, "add", ["e", "f"]), (300, "DONE", []), rate=0.35)
    arrivals = [Arrival(0, 100.5, 512, 128)]
    for approach in ("spotserve", "no-migration-planner"):
        res = run(tr, arrivals, approach)
        mig = res.log.of("migrate")[-1]
        assert mig["config"].startswith("D3P1M8") and sorted(mig["kept"].values()) == [0, 1]
        new = (set(mig["ready_s"]) - set(mig["kept"])).pop()
        assert mig["ready_s"][new] == pytest.approx(mig["stall_s"]) and mig["stall_s"] > 1.0
        assert latency(res) == pytest.approx(T1)


def test_no_arranger_restarts_the_interrupted_request_from_scratch():
    # D2 on a..d; d is reclaimed at 200 (notice at 170). Request 0 (replica a+b, unchanged) and
    # request 1 (replica c+d, dropped) start at 160 and are mid-decode at the notice.
    tr = trace((0, "add", ["a", "b", "c", "d"]), (200, "remove", ["d"]), (400, "DONE", []))
    arrivals = [Arrival(0, 160.0, 512, 128), Arrival(1, 160.0, 512, 128)]
    on, off = run(tr, arrivals, "spotserve"), run(tr, arrivals, "no-arranger")
    rec_on = next(r for r in on.records if r["id"] == 1)
    rec_off = next(r for r in off.records if r["id"] == 1)
    # spotserve: the arranger lets it decode on (it finishes within the grace period): no recompute
    assert rec_on["recomputed_tokens"] == 0 and latency(on, 1) == pytest.approx(T1)
    # no arranger: migration starts at the notice; its tokens so far are lost and generated again
    # once the surviving replica is free (request 0 there is never interrupted)
    done = 1 + int((170.0 - 160.0 - P) / S)
    assert off.log.of("migrate")[-1]["t"] == 170.0 and off.log.of("migrate")[-1]["kept"] == {0: 0}
    assert rec_off["recomputed_tokens"] == done and rec_off["interruptions"] == 1
    assert latency(on, 0) == latency(off, 0) == pytest.approx(T1)
    assert latency(off, 1) == pytest.approx(2 * T1)


def test_no_mapper_moves_weights_the_matching_keeps_in_place():
    # D3 on a..f; a is reclaimed: the matching keeps replicas (c,d) and (e,f) as they are, rank order
    # rebuilds both from b, c, d, e, f and ships nearly every weight.
    tr = trace((0, "add", ["a", "b", "c", "d", "e", "f"]), (200, "remove", ["a"]), (400, "DONE", []), rate=0.35)
    on, off = run(tr, [], "spotserve"), run(tr, [], "no-mapper")
    p_on = [e for e in on.log.of("plan") if e["trigger"] == "notice"][0]
    p_off = [e for e in off.log.of("plan") if e["trigger"] == "notice"][0]
    assert on.log.of("plan")[0]["config"].startswith("D3P1M8")
    assert p_on["config"] == p_off["config"] and p_on["config"].startswith("D2P1M8")
    assert p_on["transfers"] == 0 and p_on["est_seconds"] == 0.0
    assert p_off["transfers"] > 0 and p_off["est_seconds"] > 1.0 and p_off["disk_bytes"] == 0
    assert p_off["reused_bytes"] < p_on["reused_bytes"]


def test_no_optimizer_keeps_the_pool_shape_when_the_pool_shrinks():
    # 30B: on 7 instances the best replica is P3M4 (12 GPUs); on 4 instances the optimizer switches to
    # one P2M8 replica (16 GPUs), the frozen shape keeps one P3M4 and leaves 4 GPUs idle.
    cost = load_cost("30B", PACKAGE_DATA)
    names = [f"n{i}" for i in range(7)]
    tr = trace((0, "add", names), (200, "remove", names[4:]), (400, "DONE", []))
    arrivals = [Arrival(i, 10.0 * i, 512, 128) for i in range(40)]
    on, off = run(tr, arrivals, "spotserve", cost), run(tr, arrivals, "no-optimizer", cost)
    assert on.log.of("plan")[0]["config"] == off.log.of("plan")[0]["config"] == "D2P3M4B4m2"
    last_on, last_off = on.log.of("plan")[-1], off.log.of("plan")[-1]
    assert last_on["config"].startswith("D1P2M8") and last_off["config"] == "D1P3M4B4m2"
    assert last_on["est_latency"] < last_off["est_latency"]
