"""Step-time jitter in the simulator: measured batch-to-batch spread, replayed with a seeded RNG."""
import json
import random

import numpy as np
import pytest

from spotserve.cloud.availability import parse_availability_lines
from spotserve.controller.approach import get_approach
from spotserve.controller.instances import InstanceConfig
from spotserve.controller.requests import RequestManager
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.planner.types import ParallelConfig
from spotserve.sim.backend import SimBackend
from spotserve.sim.jitter import StepJitter
from spotserve.sim.run import SimConfig, simulate
from spotserve.sim.traces import Arrival

from .sim_helpers import FixedPolicy, Recorder

COST = load_cost("20B", PACKAGE_DATA)
TRACE = parse_availability_lines(['[0, "add", {"nodes": ["a", "b", "c", "d"]}]',
                                  '[200000, "remove", {"nodes": ["c"]}]', '[400000, "DONE", {"nodes": []}]'])
ARRIVALS = [Arrival(i, i * 3.0, 512, 128) for i in range(133)]
# ratios as the live-path calibration writes them: median 1, a slow tail (another process on the cores)
SPREAD = StepJitter(((0.8, 0.9), (1.0, 1.0), (1.0, 1.0), (1.1, 1.05), (1.6, 1.5), (2.5, 2.2)))


def run(jitter=None, seed=0):
    cfg = SimConfig(instance=InstanceConfig(grace_s=30.0), jitter=jitter, seed=seed)
    return simulate(COST, TRACE, ARRIVALS, get_approach("spotserve"), cfg)


def latencies(res):
    return np.array(sorted(r["latency_s"] for r in res.records if r["latency_s"] is not None))


def test_jitter_widens_the_latency_distribution():
    flat, jit = run(), run(SPREAD)
    a, b = latencies(flat), latencies(jit)
    assert len(a) == len(b) == 133
    spread = lambda x: np.percentile(x, 99) - np.percentile(x, 50)  # noqa: E731
    assert spread(b) > 2 * spread(a)
    assert jit.summary["p99_s"] > flat.summary["p99_s"]
    assert len(set(b)) > len(set(a))  # batches no longer all take the profile's time


def test_unit_jitter_changes_nothing_and_profiles_without_it_stay_deterministic():
    flat = run()
    assert run(StepJitter(((1.0, 1.0),))).records == flat.records  # draws, but every factor is 1
    assert run().records == flat.records
    # the paper's T4 profiles carry no step_jitter: the simulator keeps its deterministic model
    assert StepJitter.from_profile(PACKAGE_DATA / "profiles-t4" / "T4-4x" / "megatron_h6144_profile.json") is None


def test_jitter_is_deterministic_for_a_seed():
    assert run(SPREAD, seed=3).records == run(SPREAD, seed=3).records
    assert run(SPREAD, seed=3).records != run(SPREAD, seed=4).records


def one_batch(be, t, rid):
    rm = RequestManager()
    rm.arrive(rid, t, 512, 5)
    be.t = t
    be.start_batch(0, ParallelConfig(1, 1, 1, 4, 1), rid, rm.take_batch(1, 0, t))
    while be._heap:
        be.step()


def test_a_batch_takes_its_drawn_factors_and_a_cold_one_pays_the_idle_factors():
    jit = StepJitter(((2.0, 3.0),), idle_s=1.0, cold_prefill=1.5, cold_decode=2.0)
    be, rec = SimBackend(FixedPolicy(), jit), Recorder()
    be.attach(rec)
    one_batch(be, 0.0, 0)  # a fresh replica is cold: P = 2*2*1.5 = 6, S = 0.5*3*2 = 3, 4 steps after prefill
    assert rec.done[-1][0] == pytest.approx(6.0 + 4 * 3.0)
    assert rec.done[-1][3][0].first_token_t == pytest.approx(6.0)
    one_batch(be, 18.5, 1)  # idle 0.5 s < 1 s: warm, P = 4, S = 1.5
    assert rec.done[-1][0] == pytest.approx(18.5 + 4.0 + 4 * 1.5)
    one_batch(be, 30.0, 2)  # idle 1.5 s: cold again
    assert rec.done[-1][0] == pytest.approx(30.0 + 6.0 + 4 * 3.0)


def test_draw_resamples_measured_pairs():
    jit = StepJitter(((0.5, 0.7), (2.0, 1.8)))
    got = {jit.draw(random.Random(s), 10.0) for s in range(20)}
    assert got == {(0.5, 0.7), (2.0, 1.8)}  # no idle_s: never a cold factor


@pytest.mark.parametrize("rec, field", [
    ({"samples": []}, "samples must not be empty"),
    ({"samples": [[1.0]]}, "samples"),
    ({"samples": [[1.0, -1.0]]}, "samples[0]"),
    ({"samples": [[1.0, 1.0]], "cold": []}, "cold"),
    ({"samples": [[1.0, 1.0]], "idle_s": -1}, "idle_s"),
    ({"samples": [[1.0, 1.0]], "cold": {"prefill": 0}}, "cold factors"),
])
def test_bad_step_jitter_names_the_field(rec, field, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"layer_num": 2, "step_jitter": rec}))
    with pytest.raises(ValueError, match="step_jitter") as exc:
        StepJitter.from_profile(path)
    assert field in str(exc.value) and str(path) in str(exc.value)
