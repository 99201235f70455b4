"""InterruptionArranger: steps before the deadline, move vs re-prefill, re-queue, notice-less failures."""
import pytest

from planner_helpers import GB16
from spotserve.planner import Instance, Planner, RunningRequest, gpus_of


@pytest.fixture(scope="module")
def scenario(cost20b):
    """12 instances serve; i3 gets a notice and a fresh i12 replaces it."""
    planner = Planner(cost20b)
    gpus = gpus_of([Instance(f"i{k}", 4) for k in range(12)], GB16)
    p0 = planner.plan(gpus, 0.35)
    reqs = [RunningRequest(f"r{r}.{j}", r, 512, 512 + 20 * (j + 1), 20 * (j + 1), 1000)
            for r in range(p0.config.dp) for j in range(p0.config.batch)]
    new = [g for g in gpus if g.instance != "i3"] + gpus_of([Instance("i12", 4)], GB16)
    leaving = [g for g in gpus if g.instance == "i3"]
    p1 = planner.plan(new, 0.35, current=p0, requests=reqs, leaving=leaving)
    return planner, p0, p1, reqs


def test_plan_moves_kv_of_requests_on_the_leaving_instance(scenario):
    planner, p0, p1, reqs = scenario
    assert p1.config == p0.config and p1.kv_moved
    leaving_reps = {p.replica for p, g in p0.placement.items() if g.startswith("i3/")}
    moved = {r for r in p1.kv_moved}
    assert moved == {q.request_id for q in reqs if q.replica in leaving_reps}
    assert all(0 < f <= 1 for f in p1.kv_moved.values())


def test_steps_fit_the_deadline_and_grow_with_it(scenario, cost20b):
    planner, p0, p1, reqs = scenario
    prev = -1
    for grace in (1.0, 5.0, 10.0, 30.0):
        d = planner.arrange(100.0, 100.0 + grace, reqs, p1, p0)
        steps = {x.extra_steps for x in d.requests if x.action in ("move_kv", "reprefill")}
        assert len(steps) <= 1
        kv = max((x.est_seconds for x in d.requests if x.action == "move_kv"), default=0.0)
        if d.migrate_at > 100.0:
            assert d.migrate_at + d.weights_seconds + kv <= 100.0 + grace + 1e-9
        k = (d.migrate_at - 100.0)
        assert k >= prev
        prev = k


def test_reprefill_when_shipping_costs_more(scenario, cost20b):
    planner, p0, p1, reqs = scenario
    # a slow link makes every cache cheaper to recompute than to ship
    slow = Planner(cost20b)
    slow.instance_of = dict(planner.instance_of)
    cost20b_bw = dict(cost20b.bandwidth)
    try:
        cost20b.bandwidth.update(inter_bytes_per_s=1e5, intra_bytes_per_s=1e5)
        d = slow.arrange(0.0, 30.0, reqs, p1, p0)
    finally:
        cost20b.bandwidth.clear()
        cost20b.bandwidth.update(cost20b_bw)
    acts = {x.request_id: x.action for x in d.requests}
    assert all(acts[r] == "reprefill" for r in p1.kv_moved)
    fast = planner.arrange(0.0, 30.0, reqs, p1, p0)
    assert any(x.action == "move_kv" for x in fast.requests)


def test_requeue_without_destination_and_finish_when_short(scenario, cost20b):
    planner, p0, p1, reqs = scenario
    orphan = RunningRequest("orphan", 0, 512, 600, 88, 40)
    d = planner.arrange(0.0, 30.0, [orphan], p1, p0).by_id()["orphan"]
    assert d.action in ("requeue", "finish")  # not in plan.continued: nowhere to keep its context
    short = [RunningRequest(q.request_id, q.replica, q.prompt_len, q.tokens, q.committed, 1) for q in reqs]
    d = planner.arrange(0.0, 30.0, short, p1, p0)
    assert all(x.action == "finish" and x.extra_steps == 1 for x in d.requests)


def test_noticeless_failure_decides_immediately(scenario):
    planner, p0, p1, reqs = scenario
    d = planner.arrange(5.0, None, reqs, p1, p0)
    assert d.migrate_at == 5.0 and all(x.extra_steps == 0 for x in d.requests)
    assert {x.action for x in d.requests} <= {"move_kv", "reprefill", "requeue"}


def test_past_deadline_raises(scenario):
    planner, p0, p1, reqs = scenario
    with pytest.raises(ValueError, match="deadline"):
        planner.arrange(10.0, 5.0, reqs, p1, p0)
