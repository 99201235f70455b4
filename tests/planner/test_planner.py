"""Planner facade and shared types: one call from GPUs to a validated ReconfigurationPlan."""
import pytest

from planner_helpers import GB16
from spotserve.planner import (GPU, Instance, ParallelConfig, Planner, Position, ReconfigurationPlan,
                               RequestDecision, RunningRequest, Transfer, gpus_of)


def test_types_validate():
    with pytest.raises(ValueError):
        ParallelConfig(1, 1, 1, 3, 2)
    with pytest.raises(ValueError):
        Position(-1, 0, 0)
    with pytest.raises(ValueError):
        GPU("a", "i", 0, 0)
    with pytest.raises(ValueError):
        Transfer(None, "a", "kv", 0, None, 1, "r")
    with pytest.raises(ValueError):
        Transfer("a", "b", "layer", 0, (2, 1, 4), 1)
    with pytest.raises(ValueError):
        RequestDecision("r", 0, "drop")
    with pytest.raises(ValueError):
        ReconfigurationPlan(None, {}, [], 0.0)
    cfg = ParallelConfig(2, 2, 2, 4, 2)
    assert cfg.world_size == 8 and len(set(cfg.positions())) == 8
    with pytest.raises(ValueError, match="exactly"):
        ReconfigurationPlan(cfg, {}, [], 0.0)


def test_plan_from_scratch_loads_from_disk_and_cannot_serve_is_explicit(cost20b):
    planner = Planner(cost20b)
    gpus = gpus_of([Instance(f"i{k}", 4) for k in range(4)], GB16)
    plan = planner.plan(gpus, 0.35)
    assert plan.serving and set(plan.placement) == set(plan.positions())
    assert plan.disk_bytes == sum(t.nbytes for t in plan.transfers) > 0 and plan.est_seconds > 0
    one = planner.plan(gpus[:4], 0.35, current=plan)
    assert one.config is None and one.cannot_serve and not one.transfers


def test_losing_an_instance_keeps_the_rest_in_place(cost20b):
    planner = Planner(cost20b)
    gpus = gpus_of([Instance(f"i{k}", 4) for k in range(8)], GB16)
    p0 = planner.plan(gpus, 0.35)
    reqs = [RunningRequest(f"r{r}", r, 512, 600, 88, 40) for r in range(p0.config.dp)]
    rest = [g for g in gpus if g.instance != "i5"]
    p1 = planner.plan(rest, 0.35, current=p0, requests=reqs, leaving=[g for g in gpus if g.instance == "i5"])
    assert p1.serving and set(p1.placement.values()) <= {g.id for g in rest}
    total = sum(cost20b.layer_bytes for _ in range(44)) + cost20b.embed_bytes + cost20b.head_bytes
    assert p1.reused_bytes >= (p1.config.world_size - 8) * total / p1.config.tp * 0.99
    with pytest.raises(ValueError, match="both"):
        planner.plan(rest, 0.35, current=p0, leaving=rest[:1])
