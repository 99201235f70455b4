"""PlannerSwitches: each ablation switch really turns its mechanism off, on small hand-checked layouts."""
from dataclasses import replace

import pytest

from planner_helpers import make_gpus, tiny_cost
from spotserve.planner.exact import unit_bytes
from spotserve.planner import (ConfigOptimizer, DeviceMapper, MigrationPlanner, ParallelConfig, Planner,
                               PlannerSwitches, ReconfigurationPlan, RunningRequest)

COST = tiny_cost(10 ** 9)


def test_fixed_shape_freezes_the_replica_shape_and_drops_the_extra():
    shape = ParallelConfig(1, 2, 1, 2, 1)
    opt = ConfigOptimizer(COST, fixed_shape=shape)
    for n in (2, 5, 9):
        ch = opt.choose(n, 50.0)
        assert (ch.config.pp, ch.config.tp, ch.config.batch, ch.config.dp) == (2, 1, 2, n // 2) and ch.extra is None
    assert "fixed shape" in opt.choose(1, 1.0).cannot_serve
    free = ConfigOptimizer(COST).choose(9, 50.0)
    assert (free.config.pp, free.config.tp) != (2, 1) or free.extra is not None  # the optimizer would not


def test_rank_mapper_ignores_what_gpus_hold():
    cfg = ParallelConfig(2, 1, 2, 1)
    gpus = make_gpus([2, 2])
    # current: replica 0 on i1, replica 1 on i0 (the reverse of rank order)
    place = {p: f"i{1 - p.replica}/g{p.shard}" for p in cfg.positions()}
    current = ReconfigurationPlan(cfg, place, [], 0.0)
    best = DeviceMapper(COST).assign(cfg, None, gpus, current)
    rank = DeviceMapper(COST, by_rank=True).assign(cfg, None, gpus, current)
    shard_of = {g: p.shard for p, g in place.items()}
    assert all(shard_of[g] == p.shard for p, g in best.placement.items())  # every GPU keeps its shard
    assert [rank.placement[p] for p in sorted(rank.placement)] == [g.id for g in gpus]
    assert rank.reused_bytes == best.reused_bytes  # identical replicas: rank order reuses as much here
    # drop i0's first GPU: the matching finds two GPUs holding shards 0 and 1, rank order shifts them
    alive = gpus[1:]
    one = ParallelConfig(1, 1, 2, 1)
    kept = DeviceMapper(COST).assign(one, None, alive, current)
    shifted = DeviceMapper(COST, by_rank=True).assign(one, None, alive, current)
    assert all(shard_of[g] == p.shard for p, g in kept.placement.items())
    assert [shifted.placement[p] for p in sorted(shifted.placement)] == ["i0/g1", "i1/g0"]
    assert shifted.reused_bytes < kept.reused_bytes
    mig_k = MigrationPlanner(COST).migrate(one, None, kept.placement, kept.inherits, alive, current)
    mig_s = MigrationPlanner(COST).migrate(one, None, shifted.placement, shifted.inherits, alive, current)
    assert mig_k.transfers == [] and sum(t.nbytes for t in mig_s.transfers) > 0


def test_without_memory_aware_order_a_full_gpu_reloads_from_disk():
    # two GPUs swap their tp shards; each has room for its shard plus half a layer slice
    cfg = ParallelConfig(1, 1, 2, 1)
    u = unit_bytes(COST.spec, COST.dtype_bytes)  # a tp=2 shard: half the split bytes, replicated ones whole
    shard = sum(k * (u[n].even + u[n].n * u[n].per_elem) // 2 + k * u[n].replicated
                for n, k in (("layer", 5), ("embed", 1), ("head", 1)))
    place = {p: f"i{p.shard}/g0" for p in cfg.positions()}
    swapped = {p: f"i{1 - p.shard}/g0" for p in cfg.positions()}
    current = ReconfigurationPlan(cfg, place, [], 0.0)
    roomy = [replace(g, memory_bytes=shard + COST.layer_bytes // 2 + 8) for g in make_gpus([1, 1])]
    aware = MigrationPlanner(COST).migrate(cfg, None, swapped, {}, roomy, current)
    naive = MigrationPlanner(COST, memory_aware=False).migrate(cfg, None, swapped, {}, roomy, current)
    assert aware.disk_bytes == 0  # transfers interleave with frees
    # naive: neither GPU can hold old + new, both free their shard first and read the other's from disk
    assert naive.disk_bytes == sum(t.nbytes for t in aware.transfers) and all(t.src is None for t in naive.transfers)
    assert naive.est_seconds > aware.est_seconds
    # with room for both the naive plan needs no disk either
    huge = [replace(g, memory_bytes=3 * shard) for g in make_gpus([1, 1])]
    assert MigrationPlanner(COST, memory_aware=False).migrate(cfg, None, swapped, {}, huge, current).disk_bytes == 0


def test_without_kv_migration_no_request_is_context():
    cfg = ParallelConfig(2, 1, 2, 2)
    gpus = make_gpus([2, 2])
    cur = Planner(COST).plan(gpus, 1.0)
    reqs = [RunningRequest(f"r{r}", r, 16, 20, 4, 4) for r in range(cur.config.dp)]
    new_gpus = gpus[:2] + make_gpus([0, 0, 2])[0:2]
    with_kv = Planner(COST).plan(new_gpus, 1.0, cur, reqs, leaving=gpus[2:])
    without = Planner(COST, PlannerSwitches(move_kv=False)).plan(new_gpus, 1.0, cur, reqs, leaving=gpus[2:])
    assert any(t.tensor == "kv" for t in with_kv.transfers) and with_kv.continued
    assert not any(t.tensor == "kv" for t in without.transfers) and not without.continued
    assert cfg.dp == 2


def test_switches_validate():
    with pytest.raises(ValueError, match="fixed_shape"):
        PlannerSwitches(fixed_shape=(1, 2, 3))
