"""The dynamic-batching latency model against a direct simulation of the dispatch rule, and its pieces."""
import heapq
import math
import random

import numpy as np
import pytest

from planner_helpers import T4_20B, GB16
from spotserve.planner import ConfigOptimizer, CostModel, ParallelConfig
from spotserve.planner.queueing import _fixed_point, batch_table, group_latency

COST = CostModel.from_profile(T4_20B, gpu_memory_bytes=GB16, max_batch=4)


def simulate_group(T, B, n, rate, n_req=6000, seed=0):
    """Mean latency of n replicas sharing one FIFO queue: an idle replica takes up to B waiting requests
    and runs them for T[b - 1] seconds (the controller's rule), Poisson arrivals."""
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(n_req):
        t += rng.expovariate(rate)
        arrivals.append(t)
    free = [(0.0, r) for r in range(n)]  # (time the replica is free, replica)
    heapq.heapify(free)
    i, lat = 0, []
    while i < n_req:
        t_free, r = heapq.heappop(free)
        start = max(t_free, arrivals[i])
        j = i
        while j < n_req and j - i < B and arrivals[j] <= start:
            j += 1
        end = start + T[j - i - 1]
        lat += [end - a for a in arrivals[i:j]]
        heapq.heappush(free, (end, r))
        i = j
    return float(np.mean(lat[n_req // 10:]))


@pytest.mark.parametrize("pp,tp,n,load", [(1, 8, 3, 0.3), (1, 8, 3, 0.7), (1, 8, 5, 0.5), (2, 4, 2, 0.6),
                                          (1, 8, 1, 0.5), (3, 2, 4, 0.8)])
def test_model_tracks_a_simulated_queue(pp, tp, n, load):
    table = batch_table(COST, [pp], [tp], [4], [1])
    T = table[0]
    rate = load * n * 4 / T[3]  # load = fraction of full-batch capacity
    est = float(group_latency(table, 0, 4, n, rate))
    sim = simulate_group(list(T), 4, n, rate)
    assert est == pytest.approx(sim, rel=0.15)


def test_old_single_queue_factor_was_far_off_where_the_new_model_is_not():
    # three tp-8 replicas of the 30B-like load point: one-request batches cannot keep up, batches grow
    table = batch_table(COST, [1], [8], [2], [1])
    T = table[0]
    rate = 0.65 * 3 * 2 / T[1]
    sim = simulate_group(list(T), 2, 3, rate)
    rho = rate / (3 * 2 / T[1])
    old = T[1] * (1 + rho / (2 * (1 - rho)))
    assert old > 1.3 * sim  # what the first round's optimizer believed
    assert float(group_latency(table, 0, 2, 3, rate)) == pytest.approx(sim, rel=0.15)


def test_fixed_point_closed_form_equals_iteration():
    table = batch_table(COST, [1, 2, 1], [8, 4, 2], [4, 4, 2], [1, 2, 1])
    for row, B in ((0, 4), (1, 4), (2, 2)):
        for a in np.linspace(0.0, 0.6, 25):
            b = 1.0
            for _ in range(20000):
                x = min(B, max(1.0, a * np.interp(b, np.arange(1, B + 1), table[row, :B])))
                if abs(x - b) < 1e-13:
                    break
                b = x
            got = float(_fixed_point(table, np.array([row]), np.array([float(B)]), np.array([a]))[0])
            assert got == pytest.approx(b, abs=1e-9)


def test_unstable_and_empty_groups_are_infinite():
    table = batch_table(COST, [1], [8], [4], [1])
    cap = 4 / table[0, 3]
    assert math.isinf(float(group_latency(table, 0, 4, 1, cap * 1.01)))
    assert math.isinf(float(group_latency(table, 0, 4, 0, 0.1)))
    assert float(group_latency(table, 0, 4, 1, 0.0)) == pytest.approx(table[0, 0])


def test_max_batch_caps_the_search_space():
    assert COST.batches == [1, 2, 4]
    assert CostModel.from_profile(T4_20B, gpu_memory_bytes=GB16).batches == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="max_batch 0"):
        CostModel.from_profile(T4_20B, gpu_memory_bytes=GB16, max_batch=0)
    ch = ConfigOptimizer(COST).choose(48, 5.0)  # overloaded: the largest batch allowed is 4
    assert ch.config.batch <= 4 and (ch.extra is None or ch.extra.batch <= 4)
    assert ParallelConfig(1, 1, 8, 4).batch == 4
