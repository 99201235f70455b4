"""Policy and switches: per-replica readiness after a migration, frozen shapes, rank-order placement."""
import pytest

from spotserve.controller.approach import get_approach
from spotserve.controller.policy import Policy
from spotserve.experiment.data import PACKAGE_DATA, load_cost
from spotserve.planner.mapper import DeviceMapper
from spotserve.planner.optimizer import ConfigOptimizer
from spotserve.planner.types import GPU, ParallelConfig

COST = load_cost("20B", PACKAGE_DATA)


def gpus(*insts):
    return [GPU(f"{i}/g{k}", i, k, 16 * 2**30) for i in insts for k in range(4)]


def test_added_instance_only_delays_the_new_replica():
    pol = Policy(COST)
    sp = get_approach("spotserve")
    frozen = ParallelConfig(1, 1, 8, 4, 1)
    first = pol.plan(gpus("a", "b", "c", "d"), 0.35, None, [], [], sp, frozen)
    assert first.config.dp == 2
    second = pol.plan(gpus("a", "b", "c", "d", "e", "f"), 0.35, first, [], [], sp, frozen)
    assert second.config.dp == 3 and second.est_seconds > 0
    off = pol.ready_offsets(second, sp)
    kept = [r for r in range(3) if set(g for p, g in second.placement.items() if p.replica == r)
            <= set(first.placement.values())]
    assert len(kept) == 2 and all(off[r] == 0.0 for r in kept)
    new = ({0, 1, 2} - set(kept)).pop()
    assert off[new] == pytest.approx(second.est_seconds)
    # no migration planner: nobody serves before the whole plan is done
    assert set(pol.ready_offsets(second, get_approach("no-migration-planner")).values()) == {second.est_seconds}
    # with an engine start, every replica the plan rebuilds pays it, one that receives nothing too
    # (the controller serves kept replicas straight through, whatever this says)
    slow = Policy(COST, engine_start_s=0.4).ready_offsets(second, sp)
    assert all(slow[r] == pytest.approx(off[r] + 0.4) for r in off)


def test_frozen_shape_and_rank_mapper_switches():
    opt = ConfigOptimizer(COST, fixed_shape=ParallelConfig(3, 2, 4, 2, 1))
    ch = opt.choose(20, 0.35)
    assert ch.config == ParallelConfig(2, 2, 4, 2, 1) and ch.extra is None
    assert opt.choose(7, 0.35).cannot_serve
    m = DeviceMapper(COST, by_rank=True).assign(ParallelConfig(1, 2, 4, 2, 1), None, gpus("b", "a"))
    assert [m.placement[p] for p in sorted(m.placement)] == [g.id for g in gpus("b", "a")]
    sw = Policy.switches(get_approach("no-mapper"), None)
    assert sw.rank_mapper and sw.memory_aware and sw.move_kv and sw.fixed_shape is None
    sw = Policy.switches(get_approach("no-arranger"), None)
    assert not sw.move_kv and not sw.rank_mapper


def test_disk_load_scales_with_bytes_per_instance():
    pol = Policy(COST)
    one = pol.disk_load_s(ParallelConfig(1, 1, 8, 4, 1))
    per_gpu = (COST.spec.num_layers * COST.layer_bytes + COST.embed_bytes) / 8
    assert one == pytest.approx(per_gpu * 4 / COST.bandwidth["disk_bytes_per_s"])
