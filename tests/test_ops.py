"""spotserve._C ops against their pure-torch references, and opcheck of their registrations."""
import pytest
import torch

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
