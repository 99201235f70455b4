"""Sharding rules: partition, pipeline stages, tp slices of every tensor, stage tensor lists."""
import pytest

from spotserve.models import get_spec, hf
from spotserve.models.sharding import partition, shard_shape, shard_slice, stage_layers, stage_tensor_names

ALL = ["opt-tiny", "gpt-neox-tiny", "llama-tiny", "opt-6.7b", "gpt-neox-20b", "llama-30b"]


@pytest.mark.parametrize("n", [0, 1, 5, 7, 17920, 50272])
@pytest.mark.parametrize("parts", [1, 2, 3, 5, 13])
def test_partition_is_balanced_contiguous_cover(n, parts):
    ranges = [partition(n, parts, i) for i in range(parts)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, e), (s, _) in zip(ranges, ranges[1:]):
        assert e == s
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first n % parts get the extra one


def test_partition_examples():
    assert partition(10, 3, 0) == (0, 4)
    assert partition(10, 3, 1) == (4, 7)
    assert partition(10, 3, 2) == (7, 10)
    assert partition(17920, 13, 0) == (0, 1379)  # LLaMA-30B's ffn at tp=13: 1379 x 6 + 1378 x 7
    assert partition(17920, 13, 12) == (17920 - 1378, 17920)


@pytest.mark.parametrize("args", [(5, 0, 0), (5, 2, 2), (5, 2, -1), (-1, 2, 0), (5, 2.0, 0), (5, True, 0)])
def test_partition_rejects_bad_args(args):
    with pytest.raises(ValueError):
        partition(*args)


def test_stage_layers():
    assert [list(stage_layers(5, 2, s)) for s in range(2)] == [[0, 1, 2], [3, 4]]
    assert [len(stage_layers(60, 7, s)) for s in range(7)] == [9, 9, 9, 9, 8, 8, 8]
    with pytest.raises(ValueError):
        stage_layers(5, 6, 0)
    with pytest.raises(ValueError):
        stage_layers(5, 2, 2)


def test_llama_30b_uneven_ffn_at_tp13():
    spec = get_spec("llama-30b")
    up = hf.layer_prefix(spec, 7) + "mlp.up_proj.weight"
    down = hf.layer_prefix(spec, 7) + "mlp.down_proj.weight"
    assert shard_slice(spec, up, 13, 0) == (0, 0, 1379)
    assert shard_slice(spec, down, 13, 12) == (1, 17920 - 1378, 17920)
    q = hf.layer_prefix(spec, 7) + "self_attn.q_proj.weight"
    assert shard_slice(spec, q, 13, 1) == (0, 4 * 128, 8 * 128)  # 4 heads of 128 per rank
    assert shard_shape(spec, hf.layer_prefix(spec, 0) + "self_attn.o_proj.weight", 13, 2) == (6656, 512)


def test_neox_fused_qkv_by_head_and_row_bias_replicated():
    spec = get_spec("gpt-neox-20b")
    pre = hf.layer_prefix(spec, 3)
    assert shard_slice(spec, pre + "attention.query_key_value.weight", 4, 1) == (0, 16 * 288, 32 * 288)
    assert shard_slice(spec, pre + "attention.query_key_value.bias", 4, 1) == (0, 16 * 288, 32 * 288)
    assert shard_slice(spec, pre + "attention.dense.weight", 4, 1) == (1, 16 * 96, 32 * 96)
    assert shard_slice(spec, pre + "attention.dense.bias", 4, 1) is None
    assert shard_slice(spec, pre + "mlp.dense_4h_to_h.bias", 4, 1) is None
    assert shard_slice(spec, pre + "mlp.dense_h_to_4h.bias", 4, 3) == (0, 3 * 6144, 24576)
    assert shard_slice(spec, pre + "input_layernorm.weight", 4, 1) is None
    assert shard_slice(spec, "embed_out.weight", 4, 3) == (0, 3 * 12608, 50432)


def test_opt_vocab_uneven_positions_replicated():
    spec = get_spec("opt-tiny")  # vocab 160 at tp=3: 54, 53, 53
    assert [shard_slice(spec, "model.decoder.embed_tokens.weight", 3, r) for r in range(3)] == \
        [(0, 0, 54), (0, 54, 107), (0, 107, 160)]
    assert shard_slice(spec, "model.decoder.embed_positions.weight", 3, 1) is None
    assert shard_slice(spec, "model.decoder.layers.2.self_attn.out_proj.bias", 3, 1) is None
    assert shard_slice(spec, "model.decoder.layers.2.self_attn.k_proj.bias", 3, 1) == (0, 16, 32)


@pytest.mark.parametrize("name", ALL)
def test_every_split_tensor_covers_dim_exactly(name):
    spec = get_spec(name)
    shapes = hf.tensor_shapes(spec)
    for tp in [t for t in range(1, 14) if spec.valid_tp(t)]:
        for tname, shape in shapes.items():
            slices = [shard_slice(spec, tname, tp, r) for r in range(tp)]
            if slices[0] is None:
                assert all(s is None for s in slices)
                continue
            dim = slices[0][0]
            assert all(s[0] == dim for s in slices)
            assert slices[0][1] == 0 and slices[-1][2] == shape[dim]
            assert all(a[2] == b[1] for a, b in zip(slices, slices[1:]))


def test_bad_tp_and_names():
    spec = get_spec("llama-tiny")  # 6 heads
    with pytest.raises(ValueError, match="tp=4"):
        shard_slice(spec, "model.norm.weight", 4, 0)
    with pytest.raises(ValueError):
        shard_slice(spec, "model.norm.weight", 2, 2)
    with pytest.raises(ValueError, match="no tensor"):
        shard_slice(spec, "model.layers.9.mlp.up_proj.weight", 2, 0)


@pytest.mark.parametrize("name", ["opt-tiny", "gpt-neox-tiny", "llama-tiny", "llama-30b"])
@pytest.mark.parametrize("pp", [1, 2, 3, 5])
def test_stage_tensor_names_partition_the_model(name, pp):
    spec = get_spec(name)
    stages = [stage_tensor_names(spec, pp, s) for s in range(pp)]
    seen = [n for names in stages for n in names]
    emb = hf.token_embedding_name(spec)
    expected = set(hf.tensor_shapes(spec))
    assert set(seen) == expected | ({emb} if spec.tie_word_embeddings else set())
    for names in stages:
        assert len(names) == len(set(names))
    # Each tensor is on exactly one stage, except a tied embedding used as LM head on the last stage.
    dup = {n for n in seen if seen.count(n) > 1}
    assert dup == ({emb} if spec.tie_word_embeddings and pp > 1 else set())
    assert emb in stages[0] and hf.head_source(spec) in stages[-1]
    for s, names in enumerate(stages):
        layers = {hf.layer_of(n) for n in names} - {None}
        assert layers == set(stage_layers(spec.num_layers, pp, s))


def test_sharding_and_hf_are_torch_free():
    """The policy core imports these; they must not pull torch in."""
    import subprocess
    import sys

    code = ("import sys, spotserve.models.sharding, spotserve.models.hf; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
