"""Engine pieces without a model: config validation, block manager, scheduler, sampling, KV re-slicing."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from spotserve.engine.block_manager import BlockManager, OutOfBlocks
from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import DistContext, World
from spotserve.engine.kv_cache import KVCache
from spotserve.engine.kv_reshard import RequestKV, assemble, kv_slice, kv_transfer_slices, reblock
from spotserve.engine.sampling import sample, sample_one
from spotserve.engine.scheduler import Scheduler
from spotserve.engine.sequence import SamplingParams, Sequence, SeqStatus
from spotserve.models import get_spec


@pytest.mark.parametrize("field,value", [("pp", 0), ("tp", -1), ("block_size", 0), ("micro_batches", 1.5),
                                         ("dtype", "int8"), ("timeout_s", 0), ("device", "tpu")])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig("/ckpt", **{field: value})


@pytest.mark.parametrize("kw,field", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                      ({"top_p": 0}, "top_p"), ({"seed": -3}, "seed")])
def test_sampling_params_validated(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_sequence_finishes_at_max_tokens_or_stop():
    seq = Sequence("r", [1, 2, 3], SamplingParams(3, stop_token_ids=(9,)))
    seq.append(4)
    assert seq.num_cached == 3 and seq.pending == [4] and not seq.finished
    seq.append(9)
    assert seq.finished and seq.finish_reason == "stop"
    with pytest.raises(ValueError, match="finished"):
        seq.append(5)
    long = Sequence("s", [1], SamplingParams(2), output=[5, 6])
    assert long.finished and long.finish_reason == "length"
    with pytest.raises(ValueError, match="committed"):
        Sequence("t", [1], output=[2], num_committed=2)


def test_block_manager_allocates_frees_and_refuses():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("a", 8) == [0, 1]  # already covered
    assert bm.allocate("b", 4) == [2]
    with pytest.raises(OutOfBlocks, match="needs 2 more"):
        bm.allocate("c", 5)
    assert "c" not in bm.tables and bm.num_free == 1
    bm.truncate("a", 3)
    assert bm.table("a") == [0] and bm.num_free == 2
    bm.free("a")
    bm.free("unknown")
    assert bm.num_free == 3
    with pytest.raises(KeyError, match="'a'"):
        bm.table("a")


def test_scheduler_admits_fcfs_under_budgets_and_frees_finished():
    bm = BlockManager(num_blocks=6, block_size=2)
    sch = Scheduler(bm, max_batch=2, max_batch_tokens=8)
    a = Sequence("a", [1, 2, 3], SamplingParams(2))
    b = Sequence("b", [1] * 4, SamplingParams(4))
    c = Sequence("c", [7], SamplingParams(4))
    for s in (a, b, c):
        sch.add(s)
    batch = sch.schedule()
    assert [s.req_id for s in batch] == ["a", "b"]  # max_batch = 2
    sch.postprocess(batch, [10, 11])
    assert a.output == [10] and a.num_cached == 3
    batch = sch.schedule()
    assert [s.req_id for s in batch] == ["a", "b"]
    assert [s.pending for s in batch] == [[10], [11]]
    done = sch.postprocess(batch, [12, 13])
    assert done == [a] and a.finished and "a" not in bm.tables
    batch = sch.schedule()
    assert [s.req_id for s in batch] == ["b", "c"]  # c joins between steps


def test_scheduler_preempts_latest_when_out_of_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    sch = Scheduler(bm, max_batch=4, max_batch_tokens=64)
    a, b = Sequence("a", [1, 2], SamplingParams(8)), Sequence("b", [3, 4], SamplingParams(8))
    sch.add(a)
    sch.add(b)
    sch.postprocess(sch.schedule(), [5, 6])  # both now need a second block: only one is free
    batch = sch.schedule()
    assert batch == [a]
    assert b.status == SeqStatus.WAITING and b.num_cached == 0 and b.pending == [3, 4, 6]
    assert bm.table("a") == [0, 2]


def test_scheduler_refuses_a_request_larger_than_the_cache():
    sch = Scheduler(BlockManager(2, 2), 4, 64)
    sch.add(Sequence("big", list(range(9)), SamplingParams(2)))
    with pytest.raises(ValueError, match="big"):
        sch.schedule()


def test_greedy_and_top_p_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]])
    assert sample(logits, [SamplingParams(), SamplingParams()], [0, 0]) == [1, 3]
    # top_p small keeps only the top token whatever the seed.
    tight = SamplingParams(temperature=5.0, top_p=0.05, seed=1)
    assert {sample_one(logits[0], tight, i) for i in range(20)} == {1}
    # Same (seed, index) -> same draw; a hot temperature spreads the draws over several tokens.
    hot = SamplingParams(temperature=50.0, seed=3)
    draws = [sample_one(logits[0], hot, i) for i in range(40)]
    assert draws == [sample_one(logits[0], hot, i) for i in range(40)]
    assert len(set(draws)) > 1
    # top_p = 0.9 never draws the tail token that lies outside the nucleus.
    probs = torch.softmax(logits[1] / 1.0, -1)  # [0.047, 0.006, 0.006, 0.94]
    assert probs[3] > 0.9
    nucleus = SamplingParams(temperature=1.0, top_p=0.9, seed=0)
    assert {sample_one(logits[1], nucleus, i) for i in range(50)} == {3}


SPEC = get_spec("llama-tiny")
LAYOUTS = [(pp, tp) for pp in range(1, 6) for tp in (1, 2, 3, 6)]


def _pieces(full: torch.Tensor, pp: int, tp: int, num_tokens: int, block_size: int) -> list[RequestKV]:
    out = []
    for s, r in itertools.product(range(pp), range(tp)):
        (l0, l1), (h0, h1) = kv_slice(SPEC, pp, tp, s, r)
        out.append(RequestKV("r", num_tokens, block_size, (l0, l1), (h0, h1), full[:, l0:l1, :, h0:h1].clone()))
    return out


@settings(max_examples=40, deadline=None)
@given(src=st.sampled_from(LAYOUTS), dst=st.sampled_from(LAYOUTS), num_tokens=st.integers(1, 13),
       bs=st.sampled_from([1, 4, 5]), dst_bs=st.sampled_from([2, 4, 8]))
def test_kv_reshard_rebuilds_every_position(src, dst, num_tokens, bs, dst_bs):
    """Pieces laid out for src re-slice exactly into the pieces of dst (any pp, tp and block sizes)."""
    nb = -(-num_tokens // bs)
    full = torch.randn(nb, SPEC.num_layers, 2, SPEC.kv_heads, bs, SPEC.head_dim)
    pieces = _pieces(full, *src, num_tokens, bs)
    tokens = full.permute(1, 2, 3, 0, 4, 5).reshape(SPEC.num_layers, 2, SPEC.kv_heads, nb * bs, SPEC.head_dim)
    for s, r in itertools.product(range(dst[0]), range(dst[1])):
        got = assemble(pieces, SPEC, *dst, s, r, block_size=dst_bs)
        (l0, l1), (h0, h1) = kv_slice(SPEC, *dst, s, r)
        assert (got.layers, got.heads, got.block_size) == ((l0, l1), (h0, h1), dst_bs)
        flat = got.data.permute(1, 2, 3, 0, 4, 5).reshape(l1 - l0, 2, h1 - h0, -1, SPEC.head_dim)
        assert torch.equal(flat[:, :, :, :num_tokens], tokens[l0:l1, :, h0:h1, :num_tokens])
    # The transfer list covers each destination slice exactly once.
    for s, r in itertools.product(range(dst[0]), range(dst[1])):
        cells = [(layer, head) for t in kv_transfer_slices(SPEC, src, dst) if t.dst == (s, r)
                 for layer in range(*t.layers) for head in range(*t.heads)]
        (l0, l1), (h0, h1) = kv_slice(SPEC, *dst, s, r)
        assert sorted(cells) == [(layer, head) for layer in range(l0, l1) for head in range(h0, h1)]


def test_assemble_refuses_incomplete_or_mixed_pieces():
    full = torch.randn(2, SPEC.num_layers, 2, SPEC.kv_heads, 4, SPEC.head_dim)
    pieces = _pieces(full, 2, 2, 6, 4)
    with pytest.raises(ValueError, match="cover"):
        assemble(pieces[:3], SPEC, 1, 1, 0, 0)
    pieces[0].req_id = "other"
    with pytest.raises(ValueError, match="several requests"):
        assemble(pieces, SPEC, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="KV positions"):
        assemble(pieces[1:2], SPEC, 2, 2, 0, 1, num_tokens=7)


def test_request_kv_bytes_roundtrip_and_errors():
    kv = RequestKV("r1", 6, 4, (1, 3), (0, 2), torch.randn(2, 2, 2, 2, 4, 8))
    back = RequestKV.from_bytes(kv.to_bytes())
    assert (back.req_id, back.num_tokens, back.block_size, back.layers, back.heads) == ("r1", 6, 4, (1, 3), (0, 2))
    assert torch.equal(back.data, kv.data)
    with pytest.raises(ValueError, match="does not match"):
        RequestKV("r", 9, 4, (0, 2), (0, 2), torch.randn(2, 2, 2, 2, 4, 8))
    from safetensors.torch import save
    with pytest.raises(ValueError, match="not a spotserve RequestKV"):
        RequestKV.from_bytes(save({"x": torch.zeros(1)}))


def test_kv_cache_layout_write_read_and_blocks():
    """Per-layer k/v caches are contiguous kernel-layout views; export/import go through RequestKV layout."""
    from spotserve import ops

    cache = KVCache(num_blocks=6, num_layers=2, kv_heads=3, block_size=4, head_dim=5)
    k_cache, v_cache = cache.layer(1)
    assert k_cache.shape == (6, 4, 3, 5) and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert cache.bytes_per_token == 2 * 2 * 3 * 5 * 4
    table = [4, 1, 3]
    slots = cache.slots(table, 0, 10)
    assert slots[:5] == [16, 17, 18, 19, 4] and slots[9] == 13
    k, v = torch.randn(10, 3, 5), torch.randn(10, 3, 5)
    ops.write_kv_cache(k, v, k_cache, v_cache, torch.tensor(slots))
    rk, rv = cache.read(1, torch.tensor(table), 10)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    assert torch.equal(cache.data[0], torch.zeros_like(cache.data[0]))  # other layer untouched
    exported = cache.export_blocks(table)
    assert exported.shape == (3, 2, 2, 3, 4, 5)  # [blocks, layers, K/V, kv_heads, block_size, head_dim]
    flat = exported.permute(1, 2, 3, 0, 4, 5).reshape(2, 2, 3, 12, 5)
    assert torch.equal(flat[1, 0, :, :10], k.transpose(0, 1)) and torch.equal(flat[1, 1, :, :10], v.transpose(0, 1))
    other = KVCache(6, 2, 3, 4, 5)
    other.import_blocks([0, 2, 5], exported)
    assert torch.equal(other.read(1, torch.tensor([0, 2, 5]), 10)[0], rk)
    with pytest.raises(ValueError, match="do not fit"):
        other.import_blocks([0, 2], exported)
    assert torch.equal(reblock(exported, 10, 4), exported)


def test_static_decoder_buckets():
    from spotserve.engine.graphs import batch_buckets

    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(3) == [1, 2, 3] and batch_buckets(1) == [1] and batch_buckets(12) == [1, 2, 4, 8, 12]


def test_context_positions_and_single_process():
    ctx = DistContext(World(5, 12, 1.0, "gloo"), dp=2, pp=3, tp=2, replica=1, stage=2, shard=1)
    assert ctx.rank_of(0, 0) == 6 and ctx.sampler_rank == 10 and ctx.rank_of(2, 1, replica=0) == 5
    assert ctx.describe(9) == "rank 9 (replica 1, stage 1, shard 1)"
    assert ctx.is_last and not ctx.is_first
    lone = DistContext.single()
    t = torch.ones(3)
    assert lone.comm.all_reduce(t) is t and lone.broadcast_replica(t, 0) is t
