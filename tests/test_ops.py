"""spotserve._C ops against their pure-torch references, and opcheck of their registrations."""
import pytest
import torch
import torch.nn.functional as F
from kernel_cases import TOL, paged_case, randn

from spotserve import ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_reslice_copy_matches_reference(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    src = torch.randn(6, 10, 4, generator=g).to(dtype)
    shape = list(src.shape)
    shape[dim] = 7
    dst = torch.randn(*shape, generator=g).to(dtype)
    want = dst.clone()
    length = min(3, src.shape[dim] - 1)
    ops.reslice_copy_ref(want, src, dim, 1, 2, length)
    ops.reslice_copy(dst, src, dim, 1, 2, length)
    assert torch.equal(dst, want)


def test_reslice_copy_tp4_to_tp2_reassembles_column_shards():
    full = torch.randn(16, 8)
    shards4 = full.chunk(4, dim=0)
    shard2 = torch.empty(8, 8)
    for i in range(2):  # tp=2 rank 1 = rows 8..16 = tp=4 ranks 2 and 3
        ops.reslice_copy(shard2, shards4[2 + i], 0, 0, 4 * i, 4)
    assert torch.equal(shard2, full[8:])


def test_reslice_copy_rejects_bad_ranges():
    dst, src = torch.zeros(4, 4), torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="source range"):
        ops.reslice_copy(dst, src, 0, 2, 0, 3)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        ops.reslice_copy(dst, src.half(), 0, 0, 0, 1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        ops.reslice_copy(dst, torch.zeros(4, 5), 0, 0, 0, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_fused_add_rms_norm_matches_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g).to(dtype)
    res = torch.randn(5, 64, generator=g).to(dtype)
    w = torch.randn(64, generator=g).to(dtype)
    x2, res2 = x.clone(), res.clone()
    ops.fused_add_rms_norm_ref(x2, res2, w, 1e-6)
    ops.fused_add_rms_norm(x, res, w, 1e-6)
    assert torch.equal(res, res2)
    torch.testing.assert_close(x, x2, rtol=tol, atol=tol)


def test_opcheck_registrations():
    src = torch.randn(3, 8)
    torch.library.opcheck(torch.ops.spotserve.reslice_copy.default, (torch.zeros(3, 6), src, 1, 2, 1, 4))
    torch.library.opcheck(
        torch.ops.spotserve.fused_add_rms_norm.default, (torch.randn(2, 16), torch.randn(2, 16), torch.randn(16), 1e-5)
    )


def test_ops_work_under_torch_compile():
    def f(x, res, w):
        torch.ops.spotserve.fused_add_rms_norm(x, res, w, 1e-5)
        return x * 2

    x, res, w = torch.randn(2, 16), torch.randn(2, 16), torch.randn(16)
    want_x, want_res = x.clone(), res.clone()
    ops.fused_add_rms_norm_ref(want_x, want_res, w, 1e-5)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, res, w)
    torch.testing.assert_close(out, want_x * 2)
    torch.testing.assert_close(res, want_res)


# ---- fused residual add + LayerNorm ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("hidden", [48, 64])
def test_fused_add_layer_norm_matches_reference(dtype, with_bias, hidden):
    g = torch.Generator().manual_seed(hidden)
    x, res = randn(7, hidden, gen=g, dtype=dtype), randn(7, hidden, gen=g, dtype=dtype, scale=3.0)
    w = randn(hidden, gen=g, dtype=dtype)
    b = randn(hidden, gen=g, dtype=dtype) if with_bias else None
    x2, res2 = x.clone(), res.clone()
    ops.fused_add_layer_norm_ref(x2, res2, w, b, 1e-5)
    ops.fused_add_layer_norm(x, res, w, b, 1e-5)
    assert torch.equal(res, res2)
    torch.testing.assert_close(x, x2, rtol=TOL[dtype], atol=TOL[dtype])


def test_fused_add_layer_norm_rejects_mismatched_weight():
    x, res = torch.randn(2, 16), torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight must be"):
        ops.fused_add_layer_norm(x, res, torch.randn(8), None, 1e-5)
    with pytest.raises(ValueError, match="bias must be"):
        ops.fused_add_layer_norm(x, res, torch.randn(16), torch.randn(4), 1e-5)


# ---- paged decode attention and the KV cache write ----

ATTN_SHAPES = [(4, 4, 16, 4), (6, 2, 8, 16), (4, 1, 32, 8)]  # heads, kv_heads, head_dim, block_size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "h{}kv{}d{}b{}".format(*s))
def test_paged_decode_attention_matches_reference(dtype, shape):
    heads, kv_heads, dim, bs = shape
    q, kc, vc, bt, lens, max_len = paged_case([1, 7, 33, 0, 16], heads, kv_heads, dim, bs, dtype, seed=dim)
    want = torch.full_like(q, float("nan")).contiguous()
    got = torch.full_like(want, float("nan"))
    ops.paged_decode_attention_ref(want, q, kc, vc, bt, lens, max_len, dim**-0.5)
    ops.paged_decode_attention(got, q, kc, vc, bt, lens, max_len, dim**-0.5)
    assert torch.all(got[3] == 0)  # the padding row (context 0) is zeros
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_paged_decode_attention_is_attention():
    # One cached token: softmax weight 1, so the output is that token's V row exactly. And a
    # two-token context whose keys are equal weighs the two V rows equally.
    q, kc, vc, bt, lens, _ = paged_case([1, 2], 2, 2, 8, 4, torch.float32, seed=3, strided_q=False)
    blk1 = int(bt[1, 0])
    kc[blk1, 1] = kc[blk1, 0]
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, kc, vc, bt, lens, 2, 0.3)
    assert torch.equal(out[0], vc[int(bt[0, 0]), 0])
    torch.testing.assert_close(out[1], (vc[blk1, 0] + vc[blk1, 1]) / 2)


def test_paged_decode_attention_ignores_block_placement():
    q, kc, vc, bt, lens, max_len = paged_case([9, 21], 4, 2, 16, 4, torch.float32, seed=5)
    out1 = torch.empty(q.shape)
    ops.paged_decode_attention(out1, q, kc, vc, bt, lens, max_len, 0.25)
    perm = torch.randperm(kc.shape[0], generator=torch.Generator().manual_seed(1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    bt2 = bt.clone()
    live = bt < kc.shape[0]
    bt2[live] = inv[bt[live].long()].int()  # block b moves to slot inv[b]
    out2 = torch.empty(q.shape)
    ops.paged_decode_attention(out2, q, kc[perm], vc[perm], bt2, lens, max_len, 0.25)
    torch.testing.assert_close(out1, out2, rtol=1e-6, atol=1e-6)


def test_paged_decode_attention_rejects_bad_arguments():
    q, kc, vc, bt, lens, max_len = paged_case([5, 9], 4, 2, 8, 4, torch.float32, seed=2)
    out = torch.empty(q.shape)
    with pytest.raises(ValueError, match="block_tables must be"):
        ops.paged_decode_attention(out, q, kc, vc, bt.long(), lens, max_len, 1.0)
    with pytest.raises(ValueError, match="not a multiple"):
        ops.paged_decode_attention(torch.empty(2, 3, 8), torch.randn(2, 3, 8), kc, vc, bt, lens, max_len, 1.0)
    with pytest.raises(ValueError, match="max_context_len"):
        ops.paged_decode_attention(out, q, kc, vc, bt, lens, 10**6, 1.0)
    with pytest.raises(ValueError, match="context_lens\\[1\\]"):
        ops.paged_decode_attention(out, q, kc, vc, bt, torch.tensor([5, 99], dtype=torch.int32), max_len, 1.0)
    bad = bt.clone()
    bad[0, 0] = kc.shape[0]
    with pytest.raises(ValueError, match="block_tables\\[0\\]\\[0\\]"):
        ops.paged_decode_attention(out, q, kc, vc, bad, lens, max_len, 1.0)
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_decode_attention(out, q, kc.half(), vc, bt, lens, max_len, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_write_kv_cache_matches_reference(dtype):
    g = torch.Generator().manual_seed(7)
    kc, vc = randn(5, 4, 3, 8, gen=g, dtype=dtype), randn(5, 4, 3, 8, gen=g, dtype=dtype)
    kv = randn(6, 2, 3, 8, gen=g, dtype=dtype)
    key, value = kv[:, 0], kv[:, 1]  # strided rows, as slices of a fused projection
    slots = torch.tensor([3, -1, 19, 0, 7, -1], dtype=torch.int64)
    want_k, want_v = kc.clone(), vc.clone()
    ops.write_kv_cache_ref(key, value, want_k, want_v, slots)
    ops.write_kv_cache(key, value, kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert torch.equal(kc[0, 3], key[0]) and torch.equal(vc[4, 3], value[2])


def test_write_kv_cache_rejects_bad_slots():
    kc, vc = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    key = torch.randn(1, 1, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        ops.write_kv_cache(key, key, kc, vc, torch.tensor([8]))
    with pytest.raises(ValueError, match="slot_mapping must be"):
        ops.write_kv_cache(key, key, kc, vc, torch.tensor([1], dtype=torch.int32))


def test_decode_after_cache_write_equals_dense_attention():
    # Prefill 11 tokens through write_kv_cache, then decode: same as SDPA on the dense K/V.
    g = torch.Generator().manual_seed(11)
    heads, kv_heads, dim, bs, n = 4, 2, 16, 4, 11
    kc, vc = torch.zeros(8, bs, kv_heads, dim), torch.zeros(8, bs, kv_heads, dim)
    table = torch.tensor([[5, 2, 7, 0]], dtype=torch.int32)
    slots = torch.tensor([int(table[0, t // bs]) * bs + t % bs for t in range(n)])
    k, v = randn(n, kv_heads, dim, gen=g), randn(n, kv_heads, dim, gen=g)
    ops.write_kv_cache(k, v, kc, vc, slots)
    q = randn(1, heads, dim, gen=g)
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, kc, vc, table, torch.tensor([n], dtype=torch.int32), n, dim**-0.5)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                           v.transpose(0, 1).unsqueeze(0), enable_gqa=True)
    torch.testing.assert_close(out, dense[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


# ---- rotary embedding ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [16, 4])  # full head, and GPT-NeoX's 25%
@pytest.mark.parametrize("cache_dtype", ["float32", "same"])
def test_rotary_embedding_matches_reference(dtype, rotary_dim, cache_dtype):
    g = torch.Generator().manual_seed(rotary_dim)
    qkv = randn(9, 4 + 2 + 2, 16, gen=g, dtype=dtype)  # [tokens, q heads | k heads | v heads, dim]
    q, k = qkv[:, :4], qkv[:, 4:6]
    cache = ops.rotary_cos_sin_cache(64, rotary_dim, dtype=torch.float32 if cache_dtype == "float32" else dtype)
    pos = torch.randint(0, 64, (9,), generator=g)
    want = qkv.clone()
    ops.rotary_embedding_ref(want[:, :4], want[:, 4:6], pos, cache, rotary_dim)
    v_before = qkv[:, 6:].clone()
    ops.rotary_embedding(q, k, pos, cache, rotary_dim)
    torch.testing.assert_close(qkv, want, rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(qkv[:, 6:], v_before)  # v heads untouched
    assert torch.equal(qkv[:, :6, rotary_dim:], want[:, :6, rotary_dim:])  # pass-through dims


def test_rotary_embedding_matches_hugging_face_gpt_neox():
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(0)
    tokens, heads, dim, rot = 6, 3, 32, 8
    q, k = randn(tokens, heads, dim, gen=g), randn(tokens, heads, dim, gen=g)
    pos = torch.arange(10, 10 + tokens)
    cache = ops.rotary_cos_sin_cache(64, rot)
    cos, sin = cache[pos].chunk(2, dim=-1)
    cos, sin = torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]  # HF: [batch, tokens, rot]
    hq, hk = q.transpose(0, 1)[None].clone(), k.transpose(0, 1)[None].clone()  # [1, heads, tokens, dim]
    hq[..., :rot], hk[..., :rot] = apply_rotary_pos_emb(hq[..., :rot], hk[..., :rot], cos, sin)
    ops.rotary_embedding(q, k, pos, cache, rot)
    torch.testing.assert_close(q, hq[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, hk[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_rotary_embedding_rejects_bad_arguments():
    q, k = torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    cache = ops.rotary_cos_sin_cache(4, 8)
    with pytest.raises(ValueError, match="positions\\[1\\]"):
        ops.rotary_embedding(q, k, torch.tensor([0, 4]), cache, 8)
    with pytest.raises(ValueError, match="rotary_dim"):
        ops.rotary_embedding(q, k, torch.tensor([0, 1]), cache, 7)
    with pytest.raises(ValueError, match="contiguous heads"):
        ops.rotary_embedding(q.transpose(0, 1), k, torch.tensor([0, 1]), cache, 8)


# ---- fused bias + activation ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_act_matches_reference(dtype, activation, with_bias):
    g = torch.Generator().manual_seed(len(activation))
    x = randn(5, 3, 24, gen=g, dtype=dtype, scale=2.0)
    b = randn(24, gen=g, dtype=dtype) if with_bias else None
    cols = 12 if activation == "swiglu" else 24
    want, got = torch.empty(5, 3, cols, dtype=dtype), torch.empty(5, 3, cols, dtype=dtype)
    ops.bias_act_ref(want, x, b, activation)
    ops.bias_act(got, x, b, activation)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("name", ["relu", "gelu", "gelu_fast", "gelu_new", "silu"])
def test_bias_act_matches_hugging_face_activations(name):
    from transformers.activations import ACT2FN

    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(1)) * 3
    out = torch.empty_like(x)
    ops.bias_act(out, x, None, name)
    torch.testing.assert_close(out, ACT2FN[name](x), rtol=1e-5, atol=1e-5)


def test_bias_act_in_place_and_errors():
    x = torch.randn(3, 8)
    want = torch.relu(x)
    ops.bias_act(x, x, None, "relu")
    assert torch.equal(x, want)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ops.bias_act(x, x, None, "tanh")
    with pytest.raises(ValueError, match="last dim must be 4"):
        ops.bias_act(torch.empty(3, 8), x, None, "swiglu")


def test_opcheck_new_ops():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, bt, lens, max_len = paged_case([3, 6], 4, 2, 8, 4, torch.float32, seed=1, strided_q=False)
    checks = [
        (torch.ops.spotserve.fused_add_layer_norm.default,
         (randn(2, 16, gen=g), randn(2, 16, gen=g), randn(16, gen=g), randn(16, gen=g), 1e-5)),
        (torch.ops.spotserve.paged_decode_attention.default, (torch.empty(q.shape), q, kc, vc, bt, lens, max_len, 0.3)),
        (torch.ops.spotserve.write_kv_cache.default,
         (randn(2, 2, 8, gen=g), randn(2, 2, 8, gen=g), kc.clone(), vc.clone(), torch.tensor([1, 5]))),
        (torch.ops.spotserve.rotary_embedding.default,
         (randn(3, 2, 8, gen=g), randn(3, 1, 8, gen=g), torch.tensor([0, 2, 1]), ops.rotary_cos_sin_cache(4, 4), 4)),
        (torch.ops.spotserve.bias_act.default, (torch.empty(2, 4), randn(2, 8, gen=g), randn(8, gen=g), "swiglu")),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)
