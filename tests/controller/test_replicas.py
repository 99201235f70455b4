"""unchanged_replicas: which replicas a plan leaves as they are (they serve through a reconfiguration)."""
from spotserve.controller.replicas import unchanged_replicas
from spotserve.planner.types import ParallelConfig, Position, ReconfigurationPlan, RunningRequest, Transfer


def plan(dp, layout, tp=2, transfers=(), continued=None, extra=None):
    """layout: replica -> GPU ids in (stage, shard) order, pp = 1."""
    cfg = ParallelConfig(dp, 1, tp, 4)
    placement = {Position(r, 0, k): g for r, gs in layout.items() for k, g in enumerate(gs)}
    return ReconfigurationPlan(cfg, placement, list(transfers), 0.0, extra=extra, continued=continued or {})


def req(rid, replica):
    return RunningRequest(rid, replica, 8, 10, 2, 5)


OLD = plan(3, {0: ["a/0", "a/1"], 1: ["b/0", "b/1"], 2: ["c/0", "c/1"]})


def layer(src, dst):
    return Transfer(src, dst, "layer", 0, (0, 1, 2), 10)


def test_replicas_on_the_same_gpus_in_the_same_positions_are_unchanged_even_renumbered():
    # a/1 is lost: old replica 0 is rebuilt on a/0 + d/0 as new replica 1; old 1 becomes new 0
    new = plan(3, {0: ["b/0", "b/1"], 1: ["a/0", "d/0"], 2: ["c/0", "c/1"]}, transfers=[layer("a/1", "d/0")])
    assert unchanged_replicas(OLD, new) == {0: 1, 2: 2}


def test_swapped_shards_a_receiver_or_another_shape_is_a_change():
    swapped = plan(3, {0: ["a/1", "a/0"], 1: ["b/0", "b/1"], 2: ["c/0", "c/1"]})
    assert unchanged_replicas(OLD, swapped) == {1: 1, 2: 2}
    receives = plan(3, {0: ["a/0", "a/1"], 1: ["b/0", "b/1"], 2: ["c/0", "c/1"]}, transfers=[layer("c/0", "b/1")])
    assert unchanged_replicas(OLD, receives) == {0: 0, 2: 2}  # c may send: a source stays unchanged
    placement = {Position(0, 0, 0): "a/0", Position(1, 0, 0): "b/0", Position(2, 0, 0): "c/0",
                 Position(2, 0, 1): "c/1"}
    tp1 = ReconfigurationPlan(ParallelConfig(2, 1, 1, 4), placement, [], 0.0, extra=ParallelConfig(1, 1, 2, 2))
    assert unchanged_replicas(OLD, tp1) == {}  # the extra on c keeps its GPUs but changes its batch
    same = ReconfigurationPlan(ParallelConfig(2, 1, 1, 4), placement, [], 0.0, extra=ParallelConfig(1, 1, 2, 4))
    assert unchanged_replicas(OLD, same) == {2: 2}


def test_a_replica_whose_requests_the_plan_moves_elsewhere_is_changed():
    running = [req("r0", 0), req("r1", 1), req("r2", 1)]
    new = plan(3, {0: ["a/0", "a/1"], 1: ["b/0", "b/1"], 2: ["c/0", "c/1"]},
               continued={"r0": 0, "r1": 1, "r2": 2})
    assert unchanged_replicas(OLD, new, running) == {0: 0, 2: 2}
    stays = plan(3, {0: ["a/0", "a/1"], 1: ["b/0", "b/1"], 2: ["c/0", "c/1"]}, continued={"r0": 0, "r1": 1, "r2": 1})
    assert unchanged_replicas(OLD, stays, running) == {0: 0, 1: 1, 2: 2}


def test_no_current_layout_or_nothing_to_serve():
    assert unchanged_replicas(None, OLD) == {}
    assert unchanged_replicas(OLD, ReconfigurationPlan(None, {}, [], 0.0, cannot_serve="too few GPUs")) == {}
