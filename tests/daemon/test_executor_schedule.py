"""Single-process checks of the executor's message schedule: which boxes are dense (against what torch
says of the real views), rounds within the staging and round limits, balanced splits, paced local
copies, and staging sized by the schedule."""
from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from spotserve.daemon.boxes import DenseSides, is_dense
from spotserve.daemon.executor import MigrationExecutor
from spotserve.daemon.layout import KVRequest, Layout, box_shape
from spotserve.daemon.resolve import resolve
from spotserve.daemon.schedule import align, plan_rounds, split
from spotserve.models.spec import OPT_TINY
from spotserve.planner.types import ParallelConfig

pytestmark = pytest.mark.timeout(120)
UNEVEN = replace(OPT_TINY, name="opt-tiny8u", num_heads=8, hidden=64, ffn=90, vocab=162)
LAYOUTS = [(1, 1, 4), (1, 2, 2), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 1, 2)]
PAIRS = list(itertools.permutations(LAYOUTS, 2))
REQS = [KVRequest("a", 0, 0, 9), KVRequest("b", 0, 0, 3), KVRequest("c", 0, 0, 17)]
BS = 4


def layout(shape, gpus, bs=BS):
    cfg = ParallelConfig(*shape, batch=1)
    return Layout.of(cfg, dict(zip(cfg.positions(), gpus)), bs)


def pair(x, y):
    gx = [f"g{i}" for i in range(x[0] * x[1] * x[2])]
    gy = [f"g{i}" for i in range(y[0] * y[1] * y[2])][::-1]
    old, new = layout(x, gx), layout(y, gy)
    return old, new, resolve(UNEVEN, old, new, [], REQS, dtype_bytes=2)


def test_is_dense():
    assert is_dense((4, 6), (4, 6)) and is_dense((4, 6), (2, 6)) and is_dense((4, 6), (1, 3))
    assert not is_dense((4, 6), (2, 3)) and not is_dense((4, 6), (4, 3))
    assert is_dense((3, 5, 2, 4, 4, 8), (2, 5, 2, 4, 4, 8))
    assert not is_dense((3, 5, 2, 4, 4, 8), (3, 1, 2, 4, 4, 8)) and is_dense((3, 5, 2, 4, 4, 8), (1, 1, 2, 4, 4, 8))
    assert not is_dense((3, 5, 2, 4, 4, 8), (1, 1, 2, 2, 4, 8))  # K and V halves of a head range are apart


def _views(spec, layout, gpu, m, old):
    """The real view a move reads (old) or writes (new) in a contiguous tensor of the layout's shape."""
    if m.kind == "w":
        r = layout.weight_ranges(spec, gpu)[m.name]
        t = torch.empty(box_shape(spec, m.name, r.dim, r.end - r.start))
        return t.narrow(m.dim, m.start - r.start, m.end - m.start)
    _, layers, heads = layout.kv_ranges(spec, gpu)
    nb = -(-next(r.num_tokens for r in REQS if r.request_id == m.name) // BS)
    t = torch.empty(nb, layers[1] - layers[0], 2, heads[1] - heads[0], BS, spec.head_dim)
    return t[m.t0 // BS:-(-m.t1 // BS), m.layer - layers[0]:m.layer_end - layers[0], :,
             m.start - heads[0]:m.end - heads[0]]


@pytest.mark.parametrize("x,y", PAIRS)
def test_dense_sides_match_torch_views(x, y):
    """The schedule decides from layouts alone what the executor then sees on real tensors, for every
    network move and for pieces of it cut by split()."""
    old, new, res = pair(x, y)
    dense = DenseSides(UNEVEN, old, new, REQS, BS)
    net = [m for m in res.moves if m.src not in (None, m.dst)]
    assert net
    for m in net:
        for p in split(m, max(1, m.nbytes // 3), BS):
            got = dense(p)
            want = (_views(UNEVEN, old, p.src, p, True).is_contiguous(),
                    _views(UNEVEN, new, p.dst, p, False).is_contiguous())
            assert got == want, (p, got, want)


def test_split_is_balanced_and_exact():
    old, new, res = pair((1, 1, 1), (1, 1, 2))
    m = max((m for m in res.moves if m.kind == "w"), key=lambda m: m.nbytes)
    row = m.nbytes // (m.end - m.start)
    for limit in (row, 3 * row + 1, m.nbytes // 2, m.nbytes - 1):
        ps = split(m, limit, BS)
        sizes = [p.end - p.start for p in ps]
        assert max(sizes) - min(sizes) <= 1 and all(p.nbytes <= limit for p in ps)
        assert [p.start for p in ps] == [m.start] + [p.end for p in ps[:-1]] and ps[-1].end == m.end
        assert len(ps) == -(-(m.end - m.start) // (limit // row))
    kv = next(m for m in res.moves if m.kind == "kv" and m.name == "c")
    ps = split(kv, kv.nbytes // 3, BS)
    assert all(p.t0 % BS == 0 for p in ps) and sum(p.nbytes for p in ps) == kv.nbytes


@pytest.mark.parametrize("x,y", PAIRS)
@pytest.mark.parametrize("solo,limit,cap", [(1 << 10, 6 << 10, 12 << 10), (512, 2 << 10, 2 << 10),
                                            (1 << 30, 8 << 10, 8 << 10)])
def test_rounds_with_dense_sides(x, y, solo, limit, cap):
    """Per round and worker: staged bytes within `limit`, bytes sent and received within `cap` (one
    message alone may exceed them); solo messages are dense on a side that is not staged;
    every network byte travels once; local moves keep their per-destination order."""
    old, new, res = pair(x, y)
    dense = DenseSides(UNEVEN, old, new, REQS, BS)
    rounds = plan_rounds(res.moves, limit, solo, BS, dense, cap)
    net = [m for m in res.moves if m.src not in (None, m.dst)]
    sent = defaultdict(int)
    for r in rounds:
        load = defaultdict(list)  # (worker, what) -> message bytes
        for msg in r.messages:
            load[(msg.src, "staged")] += [msg.nbytes] if msg.src_staged else []
            load[(msg.dst, "staged")] += [msg.nbytes] if msg.dst_staged else []
            load[(msg.src, "out")].append(msg.nbytes)
            load[(msg.dst, "in")].append(msg.nbytes)
            if msg.solo:
                (m,) = msg.moves
                s, d = dense(m)
                assert m.nbytes >= solo and (s or d) and (msg.src_staged or s) and (msg.dst_staged or d)
                assert msg.src_staged == (not s) and msg.dst_staged == (not d)
            else:
                assert msg.src_staged and msg.dst_staged
                assert msg.offsets == sorted(msg.offsets) and all(o % 64 == 0 for o in msg.offsets)
            for m in msg.moves:
                sent[(m.kind, m.src, m.dst, m.name, m.layer)] += m.nbytes
        for (g, what), sizes in load.items():  # one message alone may exceed the bound
            assert len(sizes) <= 1 or sum(sizes) <= (limit if what == "staged" else cap), (g, what, sizes)
    want = defaultdict(int)
    for m in net:
        want[(m.kind, m.src, m.dst, m.name, m.layer)] += m.nbytes
    assert sent == want
    local = [m for m in res.moves if m.src in (None, m.dst)]
    paced = [m for r in rounds for m in r.local]
    for g in {m.dst for m in local}:
        assert [m for m in paced if m.dst == g] == [m for m in local if m.dst == g]


def test_local_copies_are_paced_over_the_rounds():
    """tp 1 -> tp 2: g0 copies its own half while g1's half travels; the copies do not all ride in round 0."""
    old, new, res = pair((1, 1, 1), (1, 1, 2))
    rounds = plan_rounds(res.moves, 4 << 10, 1 << 10, BS, DenseSides(UNEVEN, old, new, REQS, BS), 4 << 10)
    assert len(rounds) > 3
    with_local = [k for k, r in enumerate(rounds) if any(m.dst == m.src for m in r.local)]
    assert with_local[0] == 0 and with_local[-1] >= len(rounds) // 2


def test_staging_sized_by_the_schedule():
    old, new, res = pair((1, 1, 4), (1, 4, 1))
    ex = MigrationExecutor(UNEVEN, "g0", {f"g{i}": i for i in range(4)}, dtype=torch.float16,
                           staging_bytes=64 << 10, depth=4, solo_bytes=1 << 10)
    prep = ex.prepare(old, new, [], REQS, allocate=True)
    need = ex.staging_of(prep.rounds)
    assert max(need) <= align(16 << 10) and sum(need) <= 64 << 10
    assert [0 if b is None else b.numel() for b in ex.buffers] == need
    kept = old.weight_ranges(UNEVEN, "g0")
    for name, r in new.weight_ranges(UNEVEN, "g0").items():
        o = kept.get(name)
        assert (name in prep.tensors) == (o is None or (o.start, o.end) != (r.start, r.end))
    assert prep.alloc_seconds > 0
