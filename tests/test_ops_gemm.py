"""skinny_gemm (the decode-batch linear layer) on the CPU: reference, registration, errors, engine layer."""
import pytest
import torch
import torch.nn.functional as F
from kernel_cases import TOL, randn

from spotserve import ops
from spotserve.engine import layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), ()], ids=lambda s: "x".join(map(str, s)) or "vector")
def test_skinny_gemm_matches_reference(dtype, with_bias, lead):
    g = torch.Generator().manual_seed(len(lead))
    x = randn(*lead, 40, gen=g, dtype=dtype)
    w = randn(24, 40, gen=g, dtype=dtype, scale=40**-0.5)
    b = randn(24, gen=g, dtype=dtype) if with_bias else None
    got = ops.skinny_gemm(x, w, b)
    assert got.shape == (*lead, 24) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, ops.skinny_gemm_ref(x, w, b), rtol=2 * TOL[dtype], atol=2 * TOL[dtype])
    torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), None if b is None else b.float()),
                               rtol=4 * TOL[dtype], atol=4 * TOL[dtype])


def test_skinny_gemm_empty_batch():
    got = ops.skinny_gemm(torch.zeros(0, 8), torch.ones(3, 8), torch.ones(3))
    assert got.shape == (0, 3)


def test_skinny_gemm_rejects_bad_arguments():
    x, w = torch.zeros(2, 8), torch.zeros(3, 8)
    with pytest.raises(ValueError, match="K = 7"):
        ops.skinny_gemm(torch.zeros(2, 7), w)
    with pytest.raises(ValueError, match="weight must be"):
        ops.skinny_gemm(x, torch.zeros(3, 8, 1))
    with pytest.raises(ValueError, match="dtype"):
        ops.skinny_gemm(x, w.half())
    with pytest.raises(ValueError, match="bias must be"):
        ops.skinny_gemm(x, w, torch.zeros(4))
    with pytest.raises(ValueError, match="bias has dtype"):
        ops.skinny_gemm(x, w, torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="split_k"):
        ops.skinny_gemm(x, w, None, 9)
    with pytest.raises(ValueError, match="scalar"):
        ops.skinny_gemm(torch.tensor(1.0), w)


def test_skinny_gemm_opcheck_and_compile():
    g = torch.Generator().manual_seed(0)
    x, w, b = randn(3, 16, gen=g), randn(5, 16, gen=g), randn(5, gen=g)
    torch.library.opcheck(torch.ops.spotserve.skinny_gemm.default, (x, w, b, 0))
    torch.library.opcheck(torch.ops.spotserve.skinny_gemm.default, (x.view(3, 1, 16), w, None, 2))

    def f(x, w, b):
        return torch.ops.spotserve.skinny_gemm(x, w, b) * 2

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b)
    torch.testing.assert_close(out, 2 * F.linear(x, w, b))


def test_engine_linear_is_f_linear_on_cpu():
    g = torch.Generator().manual_seed(1)
    x, w, b = randn(4, 32, gen=g, dtype=torch.float16), randn(8, 32, gen=g, dtype=torch.float16), None
    assert torch.equal(layers.linear(x, w, b), F.linear(x, w, b))
