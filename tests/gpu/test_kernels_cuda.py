"""CUDA kernels of spotserve._C against their torch references (run on the device machine)."""
import pytest
import torch
from kernel_cases import TOL, paged_case, randn, rel_err

from spotserve import ops

pytestmark = pytest.mark.gpu
CUDA = "cuda"

# (heads, kv_heads, head_dim, block_size): OPT-6.7B, LLaMA-style GQA, GPT-NeoX-20B, small and odd dims.
SHAPES = [(32, 32, 128, 16), (32, 8, 128, 16), (64, 64, 96, 16), (8, 8, 64, 32), (4, 2, 80, 8), (4, 2, 256, 16),
          (6, 6, 8, 16), (12, 4, 16, 8), (8, 1, 32, 16)]


def _attention_pair(case, scale, partition_size=0):
    q, kc, vc, bt, lens, max_len = case
    got = torch.full(q.shape, float("nan"), dtype=q.dtype, device=CUDA)  # poison: every row must be written
    ops.paged_decode_attention(got, q, kc, vc, bt, lens, max_len, scale, partition_size)
    want = torch.empty(q.shape, dtype=torch.float32)
    ops.paged_decode_attention_ref(want, q.cpu().float(), kc.cpu().float(), vc.cpu().float(), bt.cpu(), lens.cpu(),
                                   max_len, scale)
    return got.float().cpu(), want


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}kv{}d{}b{}".format(*s))
@pytest.mark.parametrize("partition_size", [0, 32, 96, 4096])
def test_paged_decode_attention_cuda(dtype, shape, partition_size):
    heads, kv_heads, dim, bs = shape
    case = paged_case([1, 17, 512, 0, 300, 33], heads, kv_heads, dim, bs, dtype, device=CUDA, seed=dim + heads)
    got, want = _attention_pair(case, dim**-0.5, partition_size)
    assert torch.all(got[3] == 0)
    assert rel_err(got, want) < TOL[dtype]
    torch.testing.assert_close(got, want, rtol=4 * TOL[dtype], atol=4 * TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "h{}kv{}d{}b{}".format(*s))
@pytest.mark.parametrize("partition_size", [0, 96])
def test_paged_decode_attention_cuda_without_clusters(monkeypatch, shape, partition_size):
    # The split + merge-kernel path (pre-Hopper GPUs, or more than 8 splits) at few splits.
    monkeypatch.setenv("SPOTSERVE_ATTN_CLUSTER", "0")
    heads, kv_heads, dim, bs = shape
    case = paged_case([1, 17, 512, 0, 300, 33], heads, kv_heads, dim, bs, torch.float16, device=CUDA, seed=dim)
    got, want = _attention_pair(case, dim**-0.5, partition_size)
    assert rel_err(got, want) < TOL[torch.float16]


def test_paged_decode_attention_cuda_longer_context_than_planned():
    # max_context_len only shapes the launch: a longer context must still be computed in full.
    q, kc, vc, bt, lens, _ = paged_case([700, 65], 8, 8, 128, 16, torch.float16, device=CUDA, seed=4)
    got, want = _attention_pair((q, kc, vc, bt, lens, 64), 0.1)
    assert rel_err(got, want) < TOL[torch.float16]


@pytest.mark.parametrize("cluster", ["1", "0"])
@pytest.mark.parametrize("lens", [[532], [532, 1, 0, 17, 1000, 64, 700, 3]], ids=["b1", "b8"])
def test_paged_decode_attention_cuda_context_bucket(monkeypatch, cluster, lens):
    # CUDA graphs launch for a power-of-two context bucket: the splits planned for 1024 tokens
    # must share each sequence's shorter (or, for a stale bucket, longer) context among them.
    monkeypatch.setenv("SPOTSERVE_ATTN_CLUSTER", cluster)
    q, kc, vc, bt, ctx, _ = paged_case(lens, 32, 32, 128, 16, torch.float16, device=CUDA, seed=len(lens))
    # The graph's table is as wide as the bucket; its extra entries hold ids past the pool.
    bt = torch.cat([bt, torch.full((len(lens), 64 - bt.shape[1]), kc.shape[0] + 5, dtype=torch.int32,
                                   device=CUDA)], dim=1)
    for bucket in (1024, 512):
        got, want = _attention_pair((q, kc, vc, bt, ctx, bucket), 128**-0.5)
        assert torch.all(got[[i for i, n in enumerate(lens) if n == 0]] == 0)
        assert rel_err(got, want) < TOL[torch.float16], f"bucket {bucket}"


def test_paged_decode_attention_cuda_wide_block_table():
    # One token per block: 301 table entries, more than the kernel stages in shared memory.
    case = paged_case([300, 260, 5], 8, 2, 64, 1, torch.bfloat16, device=CUDA, seed=9)
    for partition_size in (0, 64):
        got, want = _attention_pair(case, 0.125, partition_size)
        assert rel_err(got, want) < TOL[torch.bfloat16], f"partition_size {partition_size}"


@pytest.mark.parametrize("batch", [1, 4, 64])  # 8 splits in a cluster, 4 splits, no split
def test_paged_decode_attention_cuda_graph_replay(batch):
    heads, kv_heads, dim, bs, max_len = 32, 32, 128, 16, 512
    g = torch.Generator().manual_seed(0)
    q0, kc, vc, bt0, lens0, _ = paged_case([max_len] * batch, heads, kv_heads, dim, bs, torch.float16, device=CUDA)
    q, bt, lens = q0.clone(), bt0.clone(), lens0.clone()
    out = torch.empty(q.shape, dtype=q.dtype, device=CUDA)
    ops.paged_decode_attention(out, q, kc, vc, bt, lens, max_len, dim**-0.5)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.paged_decode_attention(out, q, kc, vc, bt, lens, max_len, dim**-0.5)
    for step in range(3):  # new queries, shuffled tables and shorter lengths, written in place
        q.copy_(randn(*q.shape, gen=g, dtype=q.dtype, device=CUDA))
        bt.copy_(bt0[torch.randperm(batch, generator=g)])
        lens.copy_(torch.randint(1, max_len + 1, (batch,), generator=g, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = torch.empty(q.shape)
        ops.paged_decode_attention_ref(want, q.cpu().float(), kc.cpu().float(), vc.cpu().float(), bt.cpu(),
                                       lens.cpu(), max_len, dim**-0.5)
        assert rel_err(out.float().cpu(), want) < TOL[torch.float16], f"replay {step}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dim", [128, 20])  # vector and scalar paths
def test_write_kv_cache_cuda(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    kc = randn(6, 16, 4, dim, gen=g, dtype=dtype, device=CUDA)
    vc = randn(6, 16, 4, dim, gen=g, dtype=dtype, device=CUDA)
    kv = randn(9, 2, 4, dim, gen=g, dtype=dtype, device=CUDA)
    slots = torch.tensor([3, -1, 95, 0, 17, 40, 41, -1, 64], device=CUDA)
    want_k, want_v = kc.clone(), vc.clone()
    ops.write_kv_cache_ref(kv[:, 0], kv[:, 1], want_k, want_v, slots)
    ops.write_kv_cache(kv[:, 0], kv[:, 1], kc, vc, slots)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [4096, 6656, 6144, 20000, 50])  # vec 1/2/4 per thread, scalar path
@pytest.mark.parametrize("kind", ["layer", "layer_nobias", "rms"])
def test_fused_add_norm_cuda(dtype, hidden, kind):
    g = torch.Generator().manual_seed(hidden)
    x, res = randn(33, hidden, gen=g, dtype=dtype, device=CUDA), randn(33, hidden, gen=g, dtype=dtype, device=CUDA)
    w, b = randn(hidden, gen=g, dtype=dtype, device=CUDA), randn(hidden, gen=g, dtype=dtype, device=CUDA)
    x2, res2 = x.clone(), res.clone()
    if kind == "rms":
        ops.fused_add_rms_norm_ref(x2, res2, w, 1e-6)
        ops.fused_add_rms_norm(x, res, w, 1e-6)
    else:
        bias = b if kind == "layer" else None
        ops.fused_add_layer_norm_ref(x2, res2, w, bias, 1e-5)
        ops.fused_add_layer_norm(x, res, w, bias, 1e-5)
    assert torch.equal(res, res2)
    torch.testing.assert_close(x, x2, rtol=2 * TOL[dtype], atol=2 * TOL[dtype])


def test_fused_add_norm_cuda_unaligned_rows_take_the_scalar_path():
    g = torch.Generator().manual_seed(0)
    buf_x, buf_r = randn(4 * 64 + 1, gen=g, device=CUDA), randn(4 * 64 + 1, gen=g, device=CUDA)
    x, res = buf_x[1:].view(4, 64), buf_r[1:].view(4, 64)  # 4-byte offset: not 16-byte aligned
    w = randn(64, gen=g, device=CUDA)
    x2, res2 = x.clone(), res.clone()
    ops.fused_add_layer_norm_ref(x2, res2, w, None, 1e-5)
    ops.fused_add_layer_norm(x, res, w, None, 1e-5)
    torch.testing.assert_close(x, x2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim,rot", [(64, 64, 96, 24), (32, 8, 128, 128), (6, 6, 8, 2)])
@pytest.mark.parametrize("cache_float", [True, False])
def test_rotary_embedding_cuda(dtype, heads, kv_heads, dim, rot, cache_float):
    g = torch.Generator().manual_seed(dim)
    qkv = randn(37, heads + 2 * kv_heads, dim, gen=g, dtype=dtype, device=CUDA)
    q, k = qkv[:, :heads], qkv[:, heads:heads + kv_heads]
    cache = ops.rotary_cos_sin_cache(2048, rot, dtype=torch.float32 if cache_float else dtype, device=CUDA)
    pos = torch.randint(0, 2048, (37,), generator=g).to(CUDA)
    want = qkv.clone()
    ops.rotary_embedding_ref(want[:, :heads], want[:, heads:heads + kv_heads], pos, cache, rot)
    ops.rotary_embedding(q, k, pos, cache, rot)
    torch.testing.assert_close(qkv, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu"])
@pytest.mark.parametrize("cols", [4096, 50])
def test_bias_act_cuda(dtype, activation, cols):
    g = torch.Generator().manual_seed(cols)
    in_cols = 2 * cols if activation == "swiglu" else cols
    x = randn(17, in_cols, gen=g, dtype=dtype, device=CUDA, scale=2.0)
    b = randn(in_cols, gen=g, dtype=dtype, device=CUDA)
    for bias in (b, None):
        want = torch.empty(17, cols, dtype=dtype, device=CUDA)
        got = torch.full_like(want, float("nan"))
        ops.bias_act_ref(want, x, bias, activation)
        ops.bias_act(got, x, bias, activation)
        torch.testing.assert_close(got, want, rtol=2 * TOL[dtype], atol=2 * TOL[dtype])


def test_opcheck_cuda():
    g = torch.Generator().manual_seed(0)
    q, kc, vc, bt, lens, max_len = paged_case([40, 7], 8, 4, 64, 16, torch.float16, device=CUDA, strided_q=False)
    h = torch.float16
    checks = [
        (torch.ops.spotserve.fused_add_rms_norm.default,
         (randn(3, 256, gen=g, dtype=h, device=CUDA), randn(3, 256, gen=g, dtype=h, device=CUDA),
          randn(256, gen=g, dtype=h, device=CUDA), 1e-5)),
        (torch.ops.spotserve.fused_add_layer_norm.default,
         (randn(3, 256, gen=g, dtype=h, device=CUDA), randn(3, 256, gen=g, dtype=h, device=CUDA),
          randn(256, gen=g, dtype=h, device=CUDA), randn(256, gen=g, dtype=h, device=CUDA), 1e-5)),
        (torch.ops.spotserve.paged_decode_attention.default,
         (torch.empty(q.shape, dtype=h, device=CUDA), q, kc, vc, bt, lens, max_len, 0.125, 16)),
        (torch.ops.spotserve.write_kv_cache.default,
         (randn(2, 4, 64, gen=g, dtype=h, device=CUDA), randn(2, 4, 64, gen=g, dtype=h, device=CUDA), kc.clone(),
          vc.clone(), torch.tensor([1, 5], device=CUDA))),
        (torch.ops.spotserve.rotary_embedding.default,
         (randn(3, 8, 64, gen=g, dtype=h, device=CUDA), randn(3, 4, 64, gen=g, dtype=h, device=CUDA),
          torch.tensor([0, 2, 1], device=CUDA), ops.rotary_cos_sin_cache(4, 16, device=CUDA), 16)),
        (torch.ops.spotserve.bias_act.default,
         (torch.empty(2, 64, dtype=h, device=CUDA), randn(2, 64, gen=g, dtype=h, device=CUDA),
          randn(64, gen=g, dtype=h, device=CUDA), "gelu")),
    ]
    for op, args in checks:
        torch.library.opcheck(op, args)
