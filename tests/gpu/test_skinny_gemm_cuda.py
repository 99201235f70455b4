"""The CUDA skinny GEMM (decode-batch linear layers) against float64 references and cuBLAS (device machine)."""
import pytest
import torch
import torch.nn.functional as F
from kernel_cases import TOL, randn

from spotserve import ops
from spotserve.engine import layers

pytestmark = pytest.mark.gpu
CUDA = "cuda"
DTYPES = [torch.float16, torch.bfloat16]


def _case(m, n, k, dtype, bias, seed=0):
    # Drawn on the GPU: the 6.7B weights are 67M elements, slow to draw on the host.
    g = torch.Generator(device=CUDA).manual_seed(seed * 1000 + m * 7 + n + k)
    x = torch.randn(m, k, generator=g, device=CUDA).to(dtype)
    w = (torch.randn(n, k, generator=g, device=CUDA) * k**-0.5).to(dtype)  # outputs of order 1
    b = torch.randn(n, generator=g, device=CUDA).to(dtype) if bias else None
    return x, w, b


def _want(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _check(got, x, w, b):
    dtype = x.dtype
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (*x.shape[:-1], w.shape[0])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _want(x, w, b), rtol=TOL[dtype], atol=TOL[dtype])


# (N, K): edge tiles (N < 16, N not a multiple of 16 or 32, K < one 64-element chunk, K with an
# 8-element tail), a tensor-parallel-sized shard, and the OPT-6.7B layer shapes.
SHAPES = [(1, 8), (5, 24), (17, 72), (33, 136), (1000, 4104)]
OPT_SHAPES = [(12288, 4096), (4096, 4096), (16384, 4096), (4096, 16384)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_gemm_cuda(dtype, m, shape, bias):
    x, w, b = _case(m, *shape, dtype, bias)
    _check(ops.skinny_gemm(x, w, b), x, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", OPT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_skinny_gemm_cuda_opt_shapes(dtype, shape):
    for m in (1, 2, 5, 8):  # both tile heights (one 16-row tile up to 4 rows, two above)
        x, w, b = _case(m, *shape, dtype, m % 2 == 1)
        _check(ops.skinny_gemm(x, w, b), x, w, b)


@pytest.mark.parametrize("split_k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("shape", [(40, 4096), (512, 1032), (7, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_skinny_gemm_cuda_forced_split(split_k, m, shape):
    # Clusters of 1..8 CTAs along K, including more CTAs than 64-element chunks (empty members).
    x, w, b = _case(m, *shape, torch.float16, True, seed=split_k)
    _check(ops.skinny_gemm(x, w, b, split_k), x, w, b)


def test_skinny_gemm_cuda_matches_cublas():
    x, w, b = _case(4, 4096, 4096, torch.float16, True)
    got, cublas = ops.skinny_gemm(x, w, b), F.linear(x, w, b)
    # Both round one float32 sum; they may differ by the summation order only.
    torch.testing.assert_close(got, cublas, rtol=2e-3, atol=2e-3)


def test_skinny_gemm_cuda_strided_unaligned_and_fallback_inputs():
    g = torch.Generator().manual_seed(3)
    w = randn(48, 96, gen=g, dtype=torch.float16, device=CUDA, scale=0.1)
    b = randn(48, gen=g, dtype=torch.float16, device=CUDA)
    buf = randn(6, 96 + 16, gen=g, dtype=torch.float16, device=CUDA)
    cases = {
        "row stride != K (kernel reads ldx)": buf[:, :96],
        "2-byte offset rows (copied first)": buf[:, 1:97],
        "3-d batch": buf[:, :96].reshape(2, 3, 96),
        "9 rows (cuBLAS)": randn(9, 96, gen=g, dtype=torch.float16, device=CUDA),
        "one row, vector": buf[0, :96],
    }
    for name, x in cases.items():
        got = ops.skinny_gemm(x, w, b)
        assert got.shape == (*x.shape[:-1], 48), name
        torch.testing.assert_close(got.double(), _want(x, w, b), rtol=TOL[torch.float16], atol=TOL[torch.float16],
                                   msg=lambda s, name=name: f"{name}: {s}")
    # Shapes the kernel does not take go to the library GEMM with the same result.
    odd_k = randn(3, 100, gen=g, dtype=torch.bfloat16, device=CUDA)
    w100 = randn(20, 100, gen=g, dtype=torch.bfloat16, device=CUDA, scale=0.1)
    _check(ops.skinny_gemm(odd_k, w100), odd_k, w100, None)
    x32, w32 = randn(2, 64, gen=g, device=CUDA), randn(8, 64, gen=g, device=CUDA)
    torch.testing.assert_close(ops.skinny_gemm(x32, w32), F.linear(x32, w32), rtol=1e-4, atol=1e-4)
    wt = randn(64, 8, gen=g, dtype=torch.float16, device=CUDA).t()  # non-contiguous weight
    xh = x32.half()
    torch.testing.assert_close(ops.skinny_gemm(xh, wt).double(), _want(xh, wt, None), rtol=2e-3, atol=2e-3)
    assert ops.skinny_gemm(torch.zeros(0, 64, dtype=torch.float16, device=CUDA), wt).shape == (0, 8)


@pytest.mark.parametrize("m", [1, 8])
def test_skinny_gemm_cuda_graph_replay(m):
    x, w, b = _case(m, 4096, 4096, torch.bfloat16, True)
    ops.skinny_gemm(x, w, b)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ops.skinny_gemm(x, w, b)
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        x.copy_(randn(*x.shape, gen=g, dtype=x.dtype, device=CUDA))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y.double(), _want(x, w, b), rtol=TOL[x.dtype], atol=TOL[x.dtype],
                                   msg=lambda s, step=step: f"replay {step}: {s}")


def test_skinny_gemm_opcheck_cuda():
    x, w, b = _case(3, 40, 64, torch.float16, True)
    torch.library.opcheck(torch.ops.spotserve.skinny_gemm.default, (x, w, b, 0))
    torch.library.opcheck(torch.ops.spotserve.skinny_gemm.default, (x, w, None, 2))


def test_engine_linear_uses_the_kernel_for_decode_batches():
    x, w, b = _case(8, 256, 512, torch.float16, True)
    assert torch.equal(layers.linear(x, w, b), ops.skinny_gemm(x, w, b))
    x9 = torch.cat([x, x[:1]])
    assert torch.equal(layers.linear(x9, w, b), F.linear(x9, w, b))
