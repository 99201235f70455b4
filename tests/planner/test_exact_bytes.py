"""Exact migration bytes: replicated tensors whole, tied embeddings once, uneven ffn / vocab splits by partition."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from planner_helpers import make_gpus
from exact_oracle import check_exact, cost_for
from spotserve.models import hf, sharding
from spotserve.planner import DeviceMapper, MigrationPlanner, ParallelConfig, ReconfigurationPlan, RunningRequest
from spotserve.planner.exact import unit_bytes


def model_bytes(spec, db):
    """Every tensor of the checkpoint once (a tied head is the embedding)."""
    return sum(math.prod(s) for s in hf.shape_map(spec).values()) * db


def plan(cost, cur, new, n_inst, per=8, reqs=(), cur_place=None):
    gpus = make_gpus([per] * n_inst, 10 ** 12)
    if cur is None:
        current, cur_place = None, None
    else:
        cur_place = cur_place or {p: gpus[i].id for i, p in enumerate(cur.positions())}
        current = ReconfigurationPlan(cur, cur_place, [], 0.0)
    mapping = DeviceMapper(cost).assign(new, None, gpus, current, list(reqs))
    mig = MigrationPlanner(cost).migrate(new, None, mapping.placement, mapping.inherits, gpus, current, list(reqs))
    return cur_place, mapping, mig


def test_unit_classes_sum_to_the_checkpoint():
    for name in ("opt-tiny", "gpt-neox-tiny", "llama-tiny", "opt-6.7b", "llama-30b"):
        cost = cost_for(name, [1])
        u, spec, db = unit_bytes(cost.spec, 2), cost.spec, 2
        whole = lambda k: u[k].even + u[k].n * u[k].per_elem + u[k].replicated  # noqa: E731
        head = whole("head") if not spec.tie_word_embeddings else u["head"].replicated
        assert spec.num_layers * whole("layer") + whole("embed") + head == model_bytes(spec, db)
        # replicated bytes of a layer: exactly the tensors shard_slice leaves whole
        pre = hf.layer_prefix(spec, 0)
        rep = sum(math.prod(s) for n, s in hf.shape_map(spec).items()
                  if n.startswith(pre) and sharding.shard_slice(spec, n, 1, 0) is None) * db
        assert u["layer"].replicated == rep > 0


@pytest.mark.parametrize("name", ["opt-tiny", "opt-6.7b"])
def test_tied_pp1_counts_the_embedding_once(name):
    cost = cost_for(name, [1, 2])
    _, mapping, mig = plan(cost, None, ParallelConfig(1, 1, 1, 1), 1)
    assert sum(t.nbytes for t in mig.transfers) == model_bytes(cost.spec, cost.dtype_bytes)
    assert not any(t.tensor == "head" and t.elems for t in mig.transfers)  # the head brings only the final norm
    check_exact(cost, None, {}, ParallelConfig(1, 1, 1, 1), mapping.placement, mig.transfers)
    # the mapper counts a kept tied pp=1 position once too, and memory holds one copy of the vocab
    cur = ParallelConfig(1, 1, 1, 1)
    _, mapping, mig = plan(cost, cur, cur, 1)
    assert mig.transfers == [] and mapping.reused_bytes == model_bytes(cost.spec, cost.dtype_bytes)
    weights = cost.spec.num_layers * cost.layer_bytes + cost.embed_bytes + cost.first_head_bytes
    assert weights == model_bytes(cost.spec, cost.dtype_bytes)  # the pp=1 memory model's weights


@pytest.mark.parametrize("name,old,new", [
    ("llama-30b", (1, 4), (1, 13)),   # ffn 17920 over 13: uneven
    ("llama-30b", (2, 13), (1, 4)),
    ("paper-30b", (2, 8), (1, 7)),    # tied OPT vocab 50272 over 7: uneven, tied head on the last stage
    ("opt-tiny", (1, 2), (2, 3)),     # vocab 160 over 3
    ("llama-tiny", (2, 3), (3, 6)),   # ffn 80 over 3 and 6
    ("opt-6.7b", (2, 2), (1, 8)),     # even splits
])
def test_uneven_splits_are_byte_exact(name, old, new):
    cost = cost_for(name, [1, 2, 4, 7, 8, 13, 3, 6])
    cur, nxt = ParallelConfig(1, *old, 1), ParallelConfig(2, *new, 1)
    per = max(cur.world_size, nxt.world_size)
    place, mapping, mig = plan(cost, cur, nxt, 2, per)
    assert any(t.src is not None for t in mig.transfers)
    check_exact(cost, cur, place, nxt, mapping.placement, mig.transfers)


def test_replicated_tensors_travel_whole_once_per_destination():
    cost = cost_for("gpt-neox-tiny", [1, 2, 3, 6])
    cur, nxt = ParallelConfig(1, 1, 2, 1), ParallelConfig(1, 1, 6, 1)
    place, mapping, mig = plan(cost, cur, nxt, 1)
    u = unit_bytes(cost.spec, cost.dtype_bytes)["layer"]
    for layer in range(cost.spec.num_layers):
        for dst in set(mapping.placement.values()):
            ts = [t for t in mig.transfers if t.tensor == "layer" and t.layer == layer and t.dst == dst]
            split = sum(u.even * (t.slice[1] - t.slice[0]) // t.slice[2] + u.per_elem * sum(b - a for a, b in t.elems)
                        for t in ts)
            # GPUs of the old layout keep their norms; the four fresh ones receive them whole, once
            assert sum(t.nbytes for t in ts) - split == (0 if dst in place.values() else u.replicated)
    check_exact(cost, cur, place, nxt, mapping.placement, mig.transfers)


shape = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3, 6]))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(["opt-tiny", "llama-tiny", "gpt-neox-tiny"]), o=shape, n=shape,
       odp=st.integers(1, 2), ndp=st.integers(1, 2), lost=st.integers(0, 2), data=st.data())
def test_random_reconfigurations_are_byte_exact(name, o, n, odp, ndp, lost, data):
    cost = cost_for(name, [1, 2, 3, 6], dtype="fp32")
    cur, nxt = ParallelConfig(odp, *o, 1), ParallelConfig(ndp, *n, 1)
    gpus = make_gpus([4] * ((max(cur.world_size, nxt.world_size) + lost + 3) // 4), 10 ** 12)
    perm = data.draw(st.permutations(range(len(gpus))))
    place = {p: gpus[perm[i]].id for i, p in enumerate(cur.positions())}
    reqs = [RunningRequest(f"q{r}", r, 4, data.draw(st.integers(1, 20)), 1, 2) for r in range(odp)]
    usable = gpus[lost:]
    current = ReconfigurationPlan(cur, place, [], 0.0)
    mapping = DeviceMapper(cost).assign(nxt, None, usable, current, reqs)
    mig = MigrationPlanner(cost).migrate(nxt, None, mapping.placement, mapping.inherits, usable, current, reqs)
    alive = {g.id for g in usable}
    cont = {r: k for r, k in mig.continued.items() if r not in mig.lost_kv}
    check_exact(cost, cur, place, nxt, mapping.placement, mig.transfers, cont, reqs,
                [g for g in place.values() if g in alive])
