"""A preemption that touches one replica of three: the other two serve on, untouched (hand-checked).

20B at 0.35 req/s on 7 instances (a..g): D3P1M8 on six of them, g idle (4 GPUs cannot hold 20B).
b is reclaimed at 200 (notice at 170): the replica on a+b is rebuilt on a+g (b's slices move to g,
with the KV cache of its running request); the replicas on c+d and e+f are unchanged.
Requests: 0 (512 tokens out, replica a+b, still decoding at the deadline), 1 and 2 (the other two
replicas), 3 at 185 (draining: an unchanged replica; it ends after migration starts) and 4 at 195
(during the migration). A request alone on a P1M8 replica takes T1 = 12.41 s (S = 0.0854 s a step).
"""
import pytest

from spotserve.cloud.availability import parse_availability_lines
from spotserve.controller.approach import get_approach
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.sim import backend as sim_backend
from spotserve.sim.run import SimConfig, simulate
from spotserve.sim.traces import Arrival

COST = load_cost("20B", PACKAGE_DATA)
S = float(COST.decode_round_seconds(1, 8, 1, 1))
T1 = float(COST.batch_seconds(1, 8, 1, 1))


def trace(*rows):
    lines = [f'[{int(t * 1000)}, "{op}", {{"nodes": {list(n)!r}}}]'.replace("'", '"') for t, op, n in rows]
    lines.insert(1, '[0, "other", {"required_tpt": 0.35}]')
    return parse_availability_lines(lines)


NAMES = list("abcdefg")
PREEMPT = trace((0, "add", NAMES), (200, "remove", ["b"]), (400, "DONE", []))
CALM = trace((0, "add", NAMES), (400, "DONE", []))
ARRIVALS = [Arrival(0, 165.0, 512, 512), Arrival(1, 165.1, 512, 128), Arrival(2, 165.2, 512, 128),
            Arrival(3, 185.0, 512, 128), Arrival(4, 195.0, 512, 128)]


def run(tr):
    res = simulate(COST, tr, ARRIVALS, get_approach("spotserve"), SimConfig())
    return res, {r["id"]: r for r in res.records}


@pytest.fixture
def executed(monkeypatch):
    """Every (plan, keep) the simulator is asked to execute."""
    calls = []
    real = sim_backend.SimBackend.execute_plan

    def spy(self, plan, plan_id, stall_s, keep=None):
        calls.append((plan, dict(keep or {})))
        return real(self, plan, plan_id, stall_s, keep)

    monkeypatch.setattr(sim_backend.SimBackend, "execute_plan", spy)
    return calls


def test_untouched_replicas_serve_through_the_preemption(executed):
    (res, rec), (_, calm) = run(PREEMPT), run(CALM)
    plan_ev = [e for e in res.log.of("plan") if e["trigger"] == "notice"][0]
    mig = [e for e in res.log.of("migrate") if not e["warm"]][0]
    assert plan_ev["config"] == mig["config"] == "D3P1M8B4m1" and plan_ev["kept"] == [1, 2]
    assert mig["kept"] == {0: 1, 1: 2}  # renumbered; the rebuilt replica is the new index 2
    stall = mig["stall_s"]
    assert mig["ready_s"] == {0: 0.0, 1: 0.0, 2: pytest.approx(stall)} and stall > 1.0
    assert mig["t"] + stall <= 200.0 + 1e-6
    # requests of the untouched replicas: never interrupted, latencies exactly as without the preemption
    for rid in (1, 2, 3, 4):
        assert rec[rid]["interruptions"] == 0
        assert rec[rid]["latency_s"] == calm[rid]["latency_s"] == pytest.approx(T1)
    assert rec[3]["finish_s"] > mig["t"]  # it decoded on while the migration ran
    # the affected replica's request migrates with its KV cache: stopped at the last step boundary
    # before migrate_at, resumed on its new replica once that is ready, nothing recomputed
    assert rec[0]["interruptions"] == 1 and rec[0]["recomputed_tokens"] == 0
    delta = rec[0]["latency_s"] - calm[0]["latency_s"]
    assert stall - 1e-6 <= delta < stall + S
    # only the rebuilt replica receives context, and only request 0's KV moves
    ((plan, keep),) = [c for c in executed if c[1]]
    assert keep == {0: 1, 1: 2}
    kept_gpus = {g for p, g in plan.placement.items() if p.replica in keep}
    assert plan.transfers and not {t.dst for t in plan.transfers} & kept_gpus
    assert {t.request for t in plan.transfers if t.tensor == "kv"} == {"0"}
    assert {t.dst.split("/")[0] for t in plan.transfers} == {"g"}


def test_kv_cache_resumes_only_on_the_replica_holding_it():
    # Request 3's replica (unchanged) is idle from ~197.4 while request 0's cache is still landing on
    # the rebuilt replica (ready at ~199.9): request 0 waits for its cache instead of resuming for
    # free on the idle replica.
    res, rec = run(PREEMPT)
    mig = [e for e in res.log.of("migrate") if not e["warm"]][0]
    ready = mig["t"] + mig["stall_s"]
    assert rec[3]["finish_s"] < ready
    steps_left = 512 - 1 - int((mig["t"] - (165.0 + (T1 - 127 * S))) / S + 1e-9)
    assert rec[0]["finish_s"] == pytest.approx(ready + steps_left * S, abs=1e-3)  # the log rounds times


def test_stopping_every_replica_delays_the_untouched_ones(monkeypatch):
    # a backend that cannot keep replicas serving: every batch stops at migrate_at, as before
    monkeypatch.setattr(sim_backend.SimBackend, "keeps_unchanged_replicas", False)
    (res, rec), (_, calm) = run(PREEMPT), run(CALM)
    assert [e["kept"] for e in res.log.of("migrate")] == [{}, {}]
    assert rec[3]["interruptions"] == 1 and rec[3]["latency_s"] > calm[3]["latency_s"] + 1.0
    assert rec[0]["recomputed_tokens"] == 0


def test_a_notice_for_an_idle_instance_renumbers_nothing_and_stops_nothing():
    # g holds no position. Request 2 (replica c+d) has the largest cache, so the planner's answer
    # numbers that replica 0: the same replicas on the same GPUs, renumbered. Nothing is done.
    tr = trace((0, "add", NAMES), (200, "remove", ["g"]), (400, "DONE", []))
    arrivals = [Arrival(0, 165.0, 100, 128), Arrival(1, 165.0, 100, 128), Arrival(2, 165.0, 1500, 128)]
    res = simulate(COST, tr, arrivals, get_approach("spotserve"), SimConfig())
    assert [e["t"] for e in res.log.of("notice")] == [170.0]
    assert [e["t"] for e in res.log.of("plan")] == [0.0] and [e["t"] for e in res.log.of("migrate")] == [0.0]
    assert res.summary["reconfigurations"] == 0 and res.summary["interrupted"] == 0
    assert res.summary["completed"] == 3
