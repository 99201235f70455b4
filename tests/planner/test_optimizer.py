"""ConfigOptimizer: brute-force best over the whole space, explicit cannot-serve, hysteresis, extras."""
import functools
import itertools
import math

import pytest
from hypothesis import given, settings, strategies as st

from planner_helpers import tiny_cost
from spotserve.planner import ConfigOptimizer, ParallelConfig
@functools.lru_cache(maxsize=None)
def _t(cost, pp, tp, k, m):
    return float(cost.batch_seconds(pp, tp, k, min(m, k)))


def ref_batch_seconds(cost, shape, b):
    """T(b) of a (pp, tp, batch, micro) shape at fractional b: linear between integer batch sizes."""
    pp, tp, _, m = shape
    t = lambda k: _t(cost, pp, tp, k, m)  # noqa: E731
    lo = min(max(int(math.floor(b)), 1), shape[2])
    hi = min(lo + 1, shape[2])
    return t(lo) * (1 - (b - lo)) + t(hi) * (b - lo)


def ref_group_latency(cost, shape, n, lam):
    """Scalar reference of planner/queueing.py's formula for n replicas of ``shape`` at lam req/s."""
    B = shape[2]
    TB = ref_batch_seconds(cost, shape, B)
    rho_b = lam * TB / (n * B)
    if rho_b >= 1:
        return math.inf
    b = 1.0
    for _ in range(100_000):  # iterate to the fixed point (the planner solves it in closed form)
        nxt = min(B, max(1.0, lam * ref_batch_seconds(cost, shape, b) / n))
        if abs(nxt - b) < 1e-14:
            break
        b = nxt
    s = ref_batch_seconds(cost, shape, b)
    u = min(1.0, lam * s / (n * b))
    k = n * B
    return s + u ** (math.sqrt(2 * (n + 1)) - 1) * s / (n + 1) + \
        0.5 * rho_b ** (math.sqrt(2 * (k + 1)) - 1) * TB / (k * (1 - rho_b))


def brute_force(cost, n, rate, horizon=300.0):
    """Enumerate every (shape at dp = n // size, optional extra shape) with scalar cost calls."""
    L = cost.spec.num_layers
    shapes = [(pp, tp, b, m) for pp in range(1, L + 1) for tp in cost.tps for b in cost.batches
              for m in range(1, b + 1) if b % m == 0 and (m == 1 or pp > 1) and pp * tp <= n
              and bool(cost.feasible(pp, tp, b, m))]

    def mig(s):
        pp, tp = s[0], s[1]
        return (math.ceil(L / pp) * cost.layer_bytes + cost.embed_bytes) / tp / cost.bandwidth["disk_bytes_per_s"]

    def cap(s, k):
        return k * s[2] / ref_batch_seconds(cost, s, s[2])

    cands = []
    for s in shapes:
        dp = n // (s[0] * s[1])
        left = n - dp * s[0] * s[1]
        for e in [None] + [e for e in shapes if e[0] * e[1] <= left]:
            phi = cap(s, dp) + (cap(e, 1) if e else 0.0)
            share = rate * cap(s, dp) / phi
            lat = ref_group_latency(cost, s, dp, share) * cap(s, dp) / phi
            if e:
                lat += ref_group_latency(cost, e, 1, rate - share) * cap(e, 1) / phi
            m = max(mig(s), mig(e)) if e else mig(s)
            cands.append((s, dp, e, phi, None, lat, m ** 2 / (2 * horizon)))
    return cands


def objective(c, rate, opt):
    s, dp, e, phi, mean_t, lat, pen = c
    return lat + pen


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 14), rate=st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0, 3.0, 50.0]),
       memory=st.sampled_from([300_000, 400_000, 800_000]))
def test_optimizer_matches_brute_force(n, rate, memory):
    cost = tiny_cost(memory)
    opt = ConfigOptimizer(cost)
    choice = opt.choose(n, rate)
    cands = brute_force(cost, n, rate)
    if not cands:
        assert choice.config is None and "needs at least" in choice.cannot_serve
        return
    got = opt.evaluate(choice.config, choice.extra, rate)
    meets = [c for c in cands if c[3] >= rate and math.isfinite(c[5])]
    if meets:
        best = min(objective(c, rate, opt) for c in meets)
        assert choice.meets_rate
        pen = choice.migration_seconds ** 2 / (2 * opt.horizon_s)
        assert got.latency + pen == pytest.approx(best, rel=1e-9)
    else:
        assert not choice.meets_rate
        assert got.throughput == pytest.approx(max(c[3] for c in cands), rel=1e-9)
    assert choice.config.world_size + (choice.extra.world_size if choice.extra else 0) <= n
    assert got.throughput == pytest.approx(choice.throughput)


def test_cannot_serve_is_explicit():
    cost = tiny_cost(200_000)  # needs 5 GPUs
    choice = ConfigOptimizer(cost).choose(4, 1.0)
    assert choice.config is None and choice.throughput == 0 and "at least 5 GPUs" in choice.cannot_serve
    assert ConfigOptimizer(cost).choose(0, 1.0).config is None


def test_hysteresis_keeps_current_for_negligible_gain():
    cost = tiny_cost(800_000)
    fresh = ConfigOptimizer(cost).choose(8, 0.2)
    opt = ConfigOptimizer(cost)
    alts = [ParallelConfig(8 // (pp * tp), pp, tp, b, 1) for pp, tp, b in itertools.product(range(1, 6), cost.tps, (1, 2, 4))
            if pp * tp <= 8 and cost.feasible(pp, tp, b)]
    scored = sorted((opt.evaluate(c, None, 0.2).latency, c) for c in alts if opt.evaluate(c, None, 0.2).meets_rate)
    lat, worse = next((lat, c) for lat, c in scored if lat > fresh.latency * 1.01)
    loss = 1 - fresh.latency / lat  # what moving to the best would gain, relative
    # a current config whose best alternative gains less than min_gain is kept ...
    kept = ConfigOptimizer(cost, min_gain=min(0.99, loss + 0.05)).choose(8, 0.2, current=(worse, None))
    assert kept.kept_current and kept.config == worse
    # ... and left when the gain exceeds min_gain (here: no hysteresis at all)
    moved = ConfigOptimizer(cost, min_gain=0.0).choose(8, 0.2, current=(worse, None))
    assert not moved.kept_current and moved.latency < lat


def test_slo_keeps_a_current_config_that_meets_it():
    cost = tiny_cost(800_000)
    opt = ConfigOptimizer(cost, min_gain=0.0)
    cur = ParallelConfig(2, 2, 1, 2, 1)
    ev = opt.evaluate(cur, None, 0.2)
    assert opt.choose(4, 0.2, current=(cur, None), slo=ev.latency * 1.01).kept_current
    best = opt.choose(4, 0.2, current=(cur, None))
    assert best.kept_current == (best.config == cur)


def test_current_that_no_longer_fits_is_replaced():
    cost = tiny_cost(800_000)
    cur = ParallelConfig(4, 2, 1, 1, 1)
    choice = ConfigOptimizer(cost, min_gain=0.9).choose(6, 0.2, current=(cur, None))
    assert not choice.kept_current and choice.config.world_size <= 6


def test_extra_replica_uses_leftover_gpus():
    cost = tiny_cost(300_000)  # smallest replica: 3 GPUs
    opt = ConfigOptimizer(cost)
    choice = opt.choose(9, 5000.0)  # overloaded: maximise throughput
    assert choice.extra is not None
    none = ConfigOptimizer(cost, allow_extra=False).choose(9, 5000.0)
    assert none.extra is None and choice.throughput > none.throughput


def test_20b_on_t4_table_rows_are_feasible_and_meet_rate(cost20b):
    opt = ConfigOptimizer(cost20b)
    prev = math.inf
    for n in range(4, 13):
        ch = opt.choose(4 * n, 0.35)
        assert ch.meets_rate and ch.config.world_size <= 4 * n
        assert ch.latency <= prev + 1e-9  # more GPUs never make the chosen latency worse
        prev = ch.latency
    assert opt.choose(4, 0.35).config is None  # one T4 instance cannot hold 20B in fp32


def test_hysteresis_never_blocks_a_plan_that_only_adds_replicas():
    cost = tiny_cost(800_000)
    n, rate = 12, 2.0
    opt = ConfigOptimizer(cost, allow_extra=False)  # min_gain 5%
    fresh = opt.choose(n, rate)
    best = fresh.config
    assert best.dp >= 2
    fewer = ParallelConfig(best.dp - 1, best.pp, best.tp, best.batch, best.micro_batches)
    cur = opt.evaluate(fewer, None, rate)
    assert cur.meets_rate and fresh.latency < cur.latency < fresh.latency / (1 - opt.min_gain)  # a gain < 5%
    # every current GPU kept, one more replica fits: taken despite min_gain, at no migration cost
    got = opt.choose(n, rate, current=(fewer, None), kept_gpus=fewer.world_size)
    assert not got.kept_current and got.config == best and got.migration_seconds == 0
    assert ConfigOptimizer.adds_only((fewer, None), got)
    # a current GPU lost (its replica is rebuilt either way): adding a replica is still taken
    again = opt.choose(n, rate, current=(fewer, None), kept_gpus=fewer.world_size - 1)
    assert not again.kept_current and again.config == best
    # another shape is no add-only plan: a large min_gain keeps it
    strict = ConfigOptimizer(cost, min_gain=0.99, allow_extra=False)
    other = next(c for c in (ParallelConfig(n // (pp * tp), pp, tp, b, 1) for pp, tp, b in
                             itertools.product(range(1, 6), cost.tps, (1, 2, 4)) if pp * tp <= n)
                 if (c.pp, c.tp, c.batch) != (best.pp, best.tp, best.batch) and cost.feasible(c.pp, c.tp, c.batch)
                 and strict.evaluate(c, None, rate).meets_rate)
    kept = strict.choose(n, rate, current=(other, None), kept_gpus=other.world_size)
    assert kept.kept_current and kept.config == other
    assert not ConfigOptimizer.adds_only((other, None), fresh)
