"""MigrationPlanner: every needed slice has exactly one source, memory bound at every step, order, fallbacks."""
from collections import defaultdict

import pytest
from hypothesis import given, settings, strategies as st

from planner_helpers import make_gpus, tiny_cost
from exact_oracle import check_exact
from spotserve.planner.exact import unit_bytes
from spotserve.planner import DeviceMapper, MigrationPlanner, ParallelConfig, ReconfigurationPlan, RunningRequest
from spotserve.planner.mapper import PositionTable, common_den, replica_shapes

COST = tiny_cost(10 ** 9)
L = COST.spec.num_layers


def pieces(cfg, placement, reqs_by_rep, den):
    """gpu -> {(kind, layer, request): (lo, hi)} of a layout, KV for the given requests per replica."""
    t = PositionTable(replica_shapes(cfg, None), L, den)
    out = defaultdict(dict)
    for i, pos in enumerate(t.positions):
        iv = (int(t.f_lo[i]), int(t.f_hi[i]))
        g = placement[pos]
        for layer in range(t.lay_lo[i], t.lay_hi[i]):
            out[g][("layer", layer, None)] = iv
            for rid in reqs_by_rep.get(pos.replica, []):
                out[g][("kv", layer, rid)] = iv
        if t.first[i]:
            out[g][("embed", None, None)] = iv
        if t.last[i]:
            out[g][("head", None, None)] = iv
    return out


def key_of(t):
    return (t.tensor, t.layer, t.request)


def check_plan(cur_cfg, cur_place, new_cfg, mapping, mig, reqs, gpus, lost_gpus=(), per_transfer=True):
    den = common_den(cur_cfg.tp, new_cfg.tp)
    old_reqs = defaultdict(list)
    for q in reqs:
        old_reqs[q.replica].append(q.request_id)
    new_reqs = defaultdict(list)
    for rid, rep in mig.continued.items():
        if rid not in mig.lost_kv:
            new_reqs[rep].append(rid)
    held = pieces(cur_cfg, cur_place, old_reqs, den)
    for g in lost_gpus:
        held.pop(g, None)
    need = pieces(new_cfg, mapping.placement, new_reqs, den)
    got = defaultdict(lambda: defaultdict(list))
    for t in mig.transfers:
        lo, hi, d = t.slice or (0, den, den)
        if d != den:  # fills elements at uneven split boundaries (slice over the elements), checked below
            assert t.tensor != "kv" and t.elems
            continue
        scale = den // d
        got[t.dst][key_of(t)].append((lo * scale, hi * scale))
        if t.src is not None:  # the source really holds it
            a, b = held[t.src][key_of(t)]
            assert a <= lo * scale and hi * scale <= b
        else:
            assert t.tensor != "kv"
    for g, keys in need.items():
        for key, (a, b) in keys.items():
            if key[0] in ("embed", "head"):  # only elements move there: exact check below
                continue
            parts = list(got[g].get(key, []))
            have = held.get(g, {}).get(key)
            if have is not None:
                parts.append((max(a, have[0]), min(b, have[1])) if have[0] < b and have[1] > a else (a, a))
            parts = sorted(p for p in parts if p[0] < p[1])
            # exactly one source per unit: the parts tile [a, b) without overlap
            pos = a
            for lo, hi in parts:
                assert lo == pos, (g, key, parts, (a, b))
                pos = hi
            assert pos == b, (g, key, parts, (a, b))
    # memory rule replay: drop an old piece after its last read unless kept
    budget = {g.id: COST.context_budget(g.memory_bytes) for g in gpus}
    # memory accounting of held pieces: tp-split bytes by fraction, replicated tensors whole
    units = unit_bytes(COST.spec, COST.dtype_bytes)
    unit = {k: (u.even + u.n * u.per_elem) / den for k, u in units.items()}
    tok = {q.request_id: q.tokens for q in reqs}

    def ub(key):
        return unit[key[0]] if key[0] != "kv" else tok[key[2]] * COST.kv_bytes_per_token_layer / den

    def rep(key):
        return 0 if key[0] == "kv" else units[key[0]].replicated

    last_read = {}
    for i, t in enumerate(mig.transfers):
        if t.src is not None:
            last_read[(t.src, key_of(t))] = i
    usage = defaultdict(float)
    drops = defaultdict(list)
    for g, keys in held.items():
        for key, (a, b) in keys.items():
            usage[g] += (b - a) * ub(key) + rep(key)
            k = need.get(g, {}).get(key)
            kept = 0 if k is None else max(0, min(b, k[1]) - max(a, k[0]))
            extra = (b - a - kept) * ub(key) + (rep(key) if k is None else 0)
            if extra > 0:
                if (g, key) in last_read:
                    drops[last_read[(g, key)]].append((g, extra))
                else:
                    usage[g] -= extra
    for i, t in enumerate(mig.transfers):
        usage[t.dst] += t.nbytes
        assert usage[t.dst] <= budget[t.dst] + 1e-6, f"step {i}: {t.dst} over budget"
        for g, extra in drops[i]:
            usage[g] -= extra
    # order: stage by stage of the destination
    stage = {g: p.stage for p, g in mapping.placement.items()}
    stages = [stage[t.dst] for t in mig.transfers]
    assert stages == sorted(stages)
    # exact bytes against the sharding rules and the executor's resolution of the plan
    live = [g.id for g in gpus if g.id not in lost_gpus] + [g for g in cur_place.values() if g not in lost_gpus
                                                             and g not in {x.id for x in gpus}]
    cont = {r: n for r, n in mig.continued.items() if r not in mig.lost_kv}
    check_exact(COST, cur_cfg, cur_place, new_cfg, mapping.placement, mig.transfers, cont, reqs,
                [g for g in cur_place.values() if g in set(live)], per_transfer)


@st.composite
def cases(draw):
    shape = st.tuples(st.integers(1, 5), st.sampled_from([1, 2, 3, 6]), st.sampled_from([1, 2, 4]))
    o, n = draw(shape), draw(shape)
    cur = ParallelConfig(draw(st.integers(1, 2)), *o)
    new = ParallelConfig(draw(st.integers(1, 2)), *n)
    counts = [3] * ((max(cur.world_size, new.world_size) + 2) // 3 + draw(st.integers(0, 1)))
    mem = draw(st.sampled_from([10 ** 9, 0]))
    gpus = make_gpus(counts, 10 ** 9)
    place = {p: gpus[i].id for i, p in enumerate(cur.positions())}
    reqs = [RunningRequest(f"q{r}.{j}", r, 8, draw(st.integers(1, 40)), 1, 2)
            for r in range(cur.dp) for j in range(draw(st.integers(0, 3)))]
    return cur, place, new, gpus, reqs, mem


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_plan_covers_needs_once_within_memory(case):
    cur, place, new, gpus, reqs, mem = case
    if mem == 0:  # tight: the budget is the larger of the old and new contexts of a GPU, plus a little
        from dataclasses import replace
        den = common_den(cur.tp, new.tp)
        worst = max(sum((b - a) for (a, b) in d.values()) for d in pieces(cur, place, {}, den).values())
        budget = int(worst * max(COST.layer_bytes, COST.embed_bytes, COST.head_bytes) / den) * 2 + 10 ** 6
        gpus = [replace(g, memory_bytes=budget) for g in gpus]
    current = ReconfigurationPlan(cur, place, [], 0.0)
    mapping = DeviceMapper(COST).assign(new, None, gpus, current, reqs)
    mig = MigrationPlanner(COST).migrate(new, None, mapping.placement, mapping.inherits, gpus, current, reqs)
    check_plan(cur, place, new, mapping, mig, reqs, gpus)
    assert mig.est_seconds >= 0


def test_lost_gpus_fall_back_to_disk_and_lose_kv():
    cur = ParallelConfig(1, 1, 3, 2)
    gpus = make_gpus([3, 3])
    gpus = [g for g in make_gpus([3, 3], 10 ** 9)]
    place = {p: gpus[i].id for i, p in enumerate(cur.positions())}
    reqs = [RunningRequest("a", 0, 8, 20, 3, 5)]
    current = ReconfigurationPlan(cur, place, [], 0.0)
    alive = gpus[1:]  # i0/g0 died without notice
    mapping = DeviceMapper(COST).assign(cur, None, alive, current, reqs)
    mig = MigrationPlanner(COST).migrate(cur, None, mapping.placement, mapping.inherits, alive, current, reqs)
    assert "a" in mig.lost_kv and not any(t.tensor == "kv" for t in mig.transfers)
    assert mig.disk_bytes > 0 and all(t.src is None for t in mig.transfers)
    check_plan(cur, place, cur, mapping, mig, reqs, alive, lost_gpus=["i0/g0"])


def test_leaving_gpus_are_sources_and_same_instance_preferred():
    cur = ParallelConfig(2, 1, 2, 1)
    gpus = make_gpus([2, 2, 2], 10 ** 9)
    place = {p: gpus[i].id for i, p in enumerate(cur.positions())}  # replicas on i0 and i1
    reqs = [RunningRequest("a", 1, 8, 30, 3, 5)]
    current = ReconfigurationPlan(cur, place, [], 0.0)
    usable = [g for g in gpus if g.instance != "i1"]
    leaving = {g.id: g.instance for g in gpus if g.instance == "i1"}
    mapping = DeviceMapper(COST).assign(cur, None, usable, current, reqs)
    mig = MigrationPlanner(COST).migrate(cur, None, mapping.placement, mapping.inherits, usable, current, reqs, leaving)
    assert mig.disk_bytes == 0 and not mig.lost_kv
    kv = [t for t in mig.transfers if t.tensor == "kv"]
    assert kv and all(t.request == "a" and t.src in leaving for t in kv)
    check_plan(cur, place, cur, mapping, mig, reqs, usable)


def test_sources_on_the_same_instance_are_preferred():
    cur = ParallelConfig(1, 1, 2, 1)
    new = ParallelConfig(2, 1, 1, 1)
    gpus = make_gpus([2, 2], 10 ** 9)
    place = {p: gpus[i + 2].id for i, p in enumerate(cur.positions())}  # old replica on i1
    current = ReconfigurationPlan(cur, place, [], 0.0)
    mapping = DeviceMapper(COST).assign(new, None, gpus, current, [])
    mig = MigrationPlanner(COST).migrate(new, None, mapping.placement, mapping.inherits, gpus, current, [])
    inst = {g.id: g.instance for g in gpus}
    local = [t for t in mig.transfers if inst[t.dst] == "i1"]
    assert local and all(inst[t.src] == "i1" for t in local)
    check_plan(cur, place, new, mapping, mig, [], gpus)


def test_impossible_budget_raises():
    cur = ParallelConfig(1, 1, 1, 1)
    gpus = make_gpus([1, 1], 10 ** 9)
    place = {p: gpus[0].id for p in cur.positions()}
    from dataclasses import replace
    small = [replace(gpus[1], memory_bytes=1000)]
    current = ReconfigurationPlan(cur, place, [], 0.0)
    with pytest.raises(ValueError, match="memory budget"):
        MigrationPlanner(COST).migrate(cur, None, {p: small[0].id for p in cur.positions()}, {}, small, current,
                                       [], {gpus[0].id: "i0"})


def test_swap_waits_for_frees_and_unblocks_via_disk():
    from dataclasses import replace
    cfg = ParallelConfig(1, 1, 2, 1)
    u = unit_bytes(COST.spec, COST.dtype_bytes)  # a tp=2 shard: half the split bytes, replicated ones whole
    shard = sum(k * (u[n].even + u[n].n * u[n].per_elem) // 2 + k * u[n].replicated
                for n, k in (("layer", 5), ("embed", 1), ("head", 1)))
    place = {p: f"i{p.shard}/g0" for p in cfg.positions()}
    swapped = {p: f"i{1 - p.shard}/g0" for p in cfg.positions()}
    current = ReconfigurationPlan(cfg, place, [], 0.0)
    mapping = type("M", (), {"placement": swapped})()
    # slack of one layer slice: transfers interleave with frees, nothing from disk
    roomy = [replace(g, memory_bytes=shard + COST.layer_bytes // 2 + 8) for g in make_gpus([1, 1])]
    mig = MigrationPlanner(COST).migrate(cfg, None, swapped, {}, roomy, current, [])
    assert mig.disk_bytes == 0
    check_plan(cfg, place, cfg, mapping, mig, [], roomy)
    # slack smaller than any slice: deadlock, one GPU drops its old shard and the other reloads it
    tight = [replace(g, memory_bytes=shard + 1000) for g in make_gpus([1, 1])]
    mig = MigrationPlanner(COST).migrate(cfg, None, swapped, {}, tight, current, [])
    assert mig.disk_bytes > 0
    check_plan(cfg, place, cfg, mapping, mig, [], tight)
