"""DeviceMapper: weights against a scalar recount, optimality against brute force, tp-group locality."""
import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from planner_helpers import make_gpus, tiny_cost
from spotserve.models import hf, sharding
from spotserve.planner import DeviceMapper, ParallelConfig, ReconfigurationPlan, RunningRequest, stage_layer_ranges

COST = tiny_cost(10 ** 9)
L = COST.spec.num_layers


def split_and_whole(spec, names, dtype_bytes=4):
    """(tp-split bytes, replicated bytes) of HF tensors ``names``, from the sharding rules."""
    shapes = hf.shape_map(spec)
    split = whole = 0
    for n in names:
        size = math.prod(shapes.get(n) or (spec.vocab, spec.hidden)) * dtype_bytes
        if sharding.shard_slice(spec, n, 1, 0) is None:
            whole += size
        else:
            split += size
    return split, whole


SPEC = COST.spec
LAYER = split_and_whole(SPEC, [n for n in hf.shape_map(SPEC) if n.startswith(hf.layer_prefix(SPEC, 0))])
EMBED = split_and_whole(SPEC, hf.embedding_names(SPEC))
HEAD = split_and_whole(SPEC, hf.final_norm_names(SPEC) + [hf.lm_head_name(SPEC)])


def reference_weight(new_cfg, new_pos, old_cfg, old_pos, kv_layer_bytes):
    """Context bytes in place, counted layer by layer with exact fractions; replicated tensors whole
    (where the shards overlap)."""
    nl = stage_layer_ranges(L, new_cfg.pp)[new_pos.stage]
    ol = stage_layer_ranges(L, old_cfg.pp)[old_pos.stage]
    frac = max(Fraction(0), min(Fraction(new_pos.shard + 1, new_cfg.tp), Fraction(old_pos.shard + 1, old_cfg.tp)) -
               max(Fraction(new_pos.shard, new_cfg.tp), Fraction(old_pos.shard, old_cfg.tp)))
    total = Fraction(0)
    if frac == 0:
        return 0.0

    def add(split_whole, extra=0):
        return (split_whole[0] + extra) * frac + split_whole[1]
    for layer in range(L):
        if nl[0] <= layer < nl[1] and ol[0] <= layer < ol[1]:
            total += add(LAYER, kv_layer_bytes)
    if new_pos.stage == 0 and old_pos.stage == 0:
        total += add(EMBED)
    if new_pos.stage == new_cfg.pp - 1 and old_pos.stage == old_cfg.pp - 1:
        total += add(HEAD)
    return float(total)


shape = st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3, 6]), st.sampled_from([1, 2, 4])).filter(
    lambda s: s[0] * s[1] <= 6)


@st.composite
def cases(draw):
    old = draw(shape)
    new = draw(shape)
    old_dp = draw(st.integers(1, max(1, 6 // (old[0] * old[1]))))
    new_dp = draw(st.integers(1, max(1, 6 // (new[0] * new[1]))))
    old_cfg = ParallelConfig(old_dp, old[0], old[1], old[2])
    new_cfg = ParallelConfig(new_dp, new[0], new[1], new[2])
    n = max(old_cfg.world_size, new_cfg.world_size) + draw(st.integers(0, 1))
    gpus = make_gpus([min(3, n - 3 * k) for k in range((n + 2) // 3)], 10 ** 9)
    perm = draw(st.permutations(range(len(gpus))))
    placement = {p: gpus[perm[i]].id for i, p in enumerate(old_cfg.positions())}
    current = ReconfigurationPlan(old_cfg, placement, [], 0.0)
    reqs = [RunningRequest(f"r{r}.{j}", r, 4, draw(st.integers(0, 30)), 0, 3)
            for r in range(old_dp) for j in range(draw(st.integers(0, 2)))]
    lost = draw(st.integers(0, 1))  # drop some GPUs: their context is gone
    usable = gpus[lost:] if len(gpus) - lost >= new_cfg.world_size else gpus
    return new_cfg, usable, current, reqs


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_weights_match_reference_and_mapping_is_optimal(case):
    new_cfg, gpus, current, reqs = case
    mapper = DeviceMapper(COST)
    inherits = mapper.choose_inherits(new_cfg, None, current, gpus, reqs)
    W, table = mapper.weight_matrix(new_cfg, None, gpus, current, reqs, inherits)
    old_of = {g: p for p, g in current.placement.items()}
    for i, pos in enumerate(table.positions):
        for j, g in enumerate(gpus):
            if g.id not in old_of:
                assert W[i, j] == 0
                continue
            op = old_of[g.id]
            kv = 0.0
            if inherits.get(pos.replica) == op.replica:
                toks = sorted((q.tokens for q in reqs if q.replica == op.replica), reverse=True)[:new_cfg.batch]
                kv = sum(toks) * COST.kv_bytes_per_token_layer
            assert W[i, j] == pytest.approx(reference_weight(new_cfg, pos, current.config, op, kv), rel=1e-9, abs=1e-6)
    mapping = mapper.assign(new_cfg, None, gpus, current, reqs)
    assert sorted(mapping.placement) == sorted(new_cfg.positions())
    assert len(set(mapping.placement.values())) == new_cfg.world_size
    col = {g.id: j for j, g in enumerate(gpus)}
    got = sum(W[i, col[mapping.placement[p]]] for i, p in enumerate(table.positions))
    assert got == pytest.approx(mapping.reused_bytes, rel=1e-9)
    best = max(W[range(len(table)), list(cols)].sum()
               for cols in itertools.permutations(range(len(gpus)), len(table)))
    assert got == pytest.approx(best, rel=1e-9)


def test_same_config_stays_in_place():
    cfg = ParallelConfig(2, 2, 3, 2)
    gpus = make_gpus([3, 3, 3, 3], 10 ** 9)
    placement = {p: gpus[(i * 5) % 12].id for i, p in enumerate(cfg.positions())}
    cur = ReconfigurationPlan(cfg, placement, [], 0.0)
    reqs = [RunningRequest("a", 1, 4, 10, 2, 5)]
    m = DeviceMapper(COST).assign(cfg, None, gpus, cur, reqs)
    # the replica with KV keeps its number-independent identity: every GPU keeps its old position's context
    inv = {g: p for p, g in placement.items()}
    for pos, g in m.placement.items():
        old = inv[g]
        assert (old.stage, old.shard) == (pos.stage, pos.shard)
        assert (old.replica == 1) == (m.inherits[pos.replica] == 1)


def test_fresh_gpus_keep_tp_groups_inside_instances():
    cfg = ParallelConfig(2, 3, 2, 1)
    gpus = make_gpus([4, 2, 4, 2], 10 ** 9)
    m = DeviceMapper(COST).assign(cfg, None, gpus)
    inst = {g.id: g.instance for g in gpus}
    for r in range(2):
        for s in range(3):
            assert len({inst[m.placement[(p := type(next(iter(m.placement)))(r, s, k))]] for k in range(2)}) == 1


def test_too_few_gpus_raises():
    with pytest.raises(ValueError, match="positions"):
        DeviceMapper(COST).assign(ParallelConfig(1, 2, 2, 1), None, make_gpus([3]))
