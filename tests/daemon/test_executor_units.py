"""Single-process checks of the executor's parts: exact resolution of a plan (every needed element
exactly once, from a GPU that holds it), rounds within the staging limit, and a migration that
needs no network (local keeps + checkpoint reads)."""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from spotserve.daemon.executor import MigrationExecutor
from spotserve.daemon.layout import Layout
from spotserve.daemon.resolve import LOCAL, resolve
from spotserve.daemon.schedule import align, plan_rounds
from spotserve.models.checkpoint import write_random_checkpoint
from spotserve.models.loader import load_shard
from spotserve.models.spec import OPT_TINY
from spotserve.planner.types import ParallelConfig, Transfer

pytestmark = pytest.mark.timeout(120)
UNEVEN = replace(OPT_TINY, name="opt-tiny8u", num_heads=8, hidden=64, ffn=90, vocab=162)
LAYOUTS = [(1, 1, 4), (1, 2, 2), (2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 1, 2), (1, 3, 1)]


def layout(shape, gpus, bs=4):
    cfg = ParallelConfig(*shape, batch=1)
    return Layout.of(cfg, dict(zip(cfg.positions(), gpus)), bs)


@pytest.mark.parametrize("x,y", list(itertools.permutations(LAYOUTS, 2)))
def test_resolution_covers_every_need_exactly_once(x, y):
    """With no plan at all (every part is 'unplanned') and one old GPU gone, each new shard is covered
    exactly once, by a live holder of those elements or the checkpoint."""
    gx = [f"g{i}" for i in range(x[0] * x[1] * x[2])]
    gy = [f"g{i}" for i in range(y[0] * y[1] * y[2])][::-1]
    old, new = layout(x, gx), layout(y, gy)
    live = set(gx[:-1])
    res = resolve(UNEVEN, old, new, [], dtype_bytes=2, live=live)
    for dst in gy:
        for name, r in new.weight_ranges(UNEVEN, dst).items():
            parts = sorted((m.start, m.end, m.src) for m in res.moves if m.dst == dst and m.name == name)
            assert [p[0] for p in parts] == [r.start] + [p[1] for p in parts[:-1]] and parts[-1][1] == r.end
            for a, b, src in parts:
                if src is not None:
                    assert src in live
                    h = old.weight_ranges(UNEVEN, src)[name]
                    assert h.start <= a and b <= h.end


def test_plan_fraction_is_followed_and_kept_parts_stay():
    """tp 2 -> tp 1 on g0: g0 keeps its half; the plan says the other half comes from g1."""
    old, new = layout((1, 1, 2), ["g0", "g1"]), layout((1, 1, 1), ["g0"])
    plan = [Transfer("g1", "g0", "layer", 0, (1, 2, 2), 100)]
    res = resolve(UNEVEN, old, new, plan, dtype_bytes=2)
    fc1 = [m for m in res.moves if m.name == "model.decoder.layers.0.fc1.weight"]
    assert [(m.src, m.start, m.end, m.transfer) for m in fc1] == [("g0", 0, 45, LOCAL), ("g1", 45, 90, 0)]
    assert all(m.src == "g1" for m in res.moves if m.transfer == 0)


def test_rounds_respect_the_limit_and_coalesce():
    old, new = layout((1, 1, 4), ["g0", "g1", "g2", "g3"]), layout((1, 4, 1), ["g0", "g1", "g2", "g3"])
    res = resolve(UNEVEN, old, new, [], dtype_bytes=4)
    limit = 8 << 10
    rounds = plan_rounds(res.moves, limit, 1 << 30, 4)
    net = [m for m in res.moves if m.src not in (None, m.dst)]
    assert sum(len(msg.moves) for r in rounds for msg in r.messages) >= len(net)
    assert sum(m.nbytes for r in rounds for msg in r.messages for m in msg.moves) == sum(m.nbytes for m in net)
    for r in rounds:
        for g in ["g0", "g1", "g2", "g3"]:
            load = sum(msg.nbytes for msg in r.messages if g in (msg.src, msg.dst))
            assert load <= limit or len(r.messages) == 1
        assert len({(m.src, m.dst) for m in r.messages}) == len(r.messages)  # one message per pair


def test_local_and_checkpoint_only_migration(tmp_path):
    """g1 is gone: g0 (tp 2 -> tp 1) keeps its half and reads exactly the other half from disk."""
    write_random_checkpoint(UNEVEN, tmp_path, seed=1, dtype="fp32")
    old, new = layout((1, 1, 2), ["g0", "g1"]), layout((1, 1, 1), ["g0"])
    mine = load_shard(tmp_path, 1, 0, 2, 0)
    ex = MigrationExecutor(UNEVEN, "g0", {"g0": 0}, dtype=torch.float32, checkpoint=tmp_path)
    arrived = []
    out = ex.run(old, new, [], mine, live={"g0"}, on_arrival=arrived.append)
    want = load_shard(tmp_path, 1, 0, 1, 0)
    assert sorted(out.weights) == sorted(want)
    assert all(torch.equal(out.weights[n], t) for n, t in want.items())
    other = load_shard(tmp_path, 1, 0, 2, 1)
    sharded = sum(t.numel() * 4 for n, t in other.items() if t.shape != want[n].shape)
    assert out.stats.checkpoint_bytes == sharded  # replicated tensors were kept, not re-read
    assert out.stats.aliased > 0 and out.stats.messages_sent == 0
    assert set(arrived) == {("embed", -1), ("head", -1), *[("layer", i) for i in range(UNEVEN.num_layers)]}


def test_prepared_plan_is_reusable_and_gives_the_same_shards(tmp_path):
    """prepare() once (when the plan arrives), run() twice with it: same shards as an unprepared run."""
    write_random_checkpoint(UNEVEN, tmp_path, seed=2, dtype="fp32")
    old, new = layout((1, 1, 2), ["g0", "g1"]), layout((1, 1, 1), ["g0"])
    mine = load_shard(tmp_path, 1, 0, 2, 0)
    ex = MigrationExecutor(UNEVEN, "g0", {"g0": 0}, dtype=torch.float32, checkpoint=tmp_path)
    prep = ex.prepare(old, new, [], live={"g0"})
    assert prep.seconds > 0 and prep.rounds is not None
    outs = [ex.run(old, new, [], mine, live={"g0"}, prepared=prep) for _ in range(2)]
    plain = ex.run(old, new, [], mine, live={"g0"})
    for out in outs:
        assert out.stats.prepare_seconds == prep.seconds
        assert sorted(out.weights) == sorted(plain.weights)
        assert all(torch.equal(out.weights[n], t) for n, t in plain.weights.items())


def test_bad_inputs_raise_clear_errors(tmp_path):
    old, new = layout((1, 1, 2), ["g0", "g1"]), layout((1, 1, 1), ["g0"])
    with pytest.raises(ValueError, match="no rank"):
        MigrationExecutor(UNEVEN, "g9", {"g0": 0})
    ex = MigrationExecutor(UNEVEN, "g0", {"g0": 0}, dtype=torch.float32)
    with pytest.raises(ValueError, match="missing from its weights"):
        ex.run(old, new, [], {}, live={"g0"})
    write_random_checkpoint(UNEVEN, tmp_path, seed=1, dtype="fp32")
    with pytest.raises(ValueError, match="no checkpoint"):
        ex.run(old, new, [], load_shard(tmp_path, 1, 0, 2, 0), live={"g0"})
    mine = {n: torch.zeros(1) for n in old.weight_ranges(UNEVEN, "g0")}
    with pytest.raises(ValueError, match="old layout says"):
        ex.run(old, new, [], mine, live={"g0", "g1"})
    with pytest.raises(ValueError, match="no position"):
        resolve(UNEVEN, old, new, [Transfer("g1", "g5", "layer", 0, None, 1)])
    with pytest.raises(ValueError, match="placement"):
        Layout({0: (1, 2)}, {})
    assert align(1) == 64


@pytest.mark.gpu
def test_cuda_migration_into_daemon_buffers(tmp_path, start_daemon):
    """On the GPU: the executor's new shards are CUDA IPC buffers of a context daemon; after the
    migration (local keep + checkpoint read, reslice_copy on CUDA) a fresh attach sees the exact bytes."""
    from spotserve.daemon.mapping import dtype_name

    write_random_checkpoint(UNEVEN, tmp_path / "ck", seed=2, dtype="fp16")
    daemon = start_daemon(device="cuda:0")
    client = daemon.client()

    def alloc(name, shape, dtype):
        return client.attach(client.allocate(f"mig/{name}", shape, dtype_name(dtype)))

    old, new = layout((1, 1, 2), ["g0", "g1"]), layout((1, 1, 1), ["g0"])
    mine = {n: t.cuda() for n, t in load_shard(tmp_path / "ck", 1, 0, 2, 0).items()}
    ex = MigrationExecutor(UNEVEN, "g0", {"g0": 0}, dtype=torch.float16, device="cuda:0", checkpoint=tmp_path / "ck",
                           alloc=alloc)
    out = ex.run(old, new, [], mine, live={"g0"})
    torch.cuda.synchronize()
    want = load_shard(tmp_path / "ck", 1, 0, 1, 0)
    other = daemon.client()
    for name, t in want.items():
        assert torch.equal(out.weights[name].cpu(), t), name
        if name not in mine or mine[name].shape != t.shape:  # allocated in the daemon, not aliased
            assert torch.equal(other.attach(other.lookup(f"mig/{name}")).cpu(), t), name
    client.close()
    other.close()
