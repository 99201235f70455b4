"""spotserve's tensor ops: the native kernels of spotserve._C with their pure-torch references.

Importing this module loads the extension, which registers torch.ops.spotserve.*; each op here
dispatches to the native kernel for the tensor's device and has a `*_ref` twin used by tests
and as the definition of what the kernel must compute.
"""
from __future__ import annotations

import torch

from spotserve import _C  # noqa: F401  (registers torch.ops.spotserve.*)

WITH_CUDA: bool = bool(_C.with_cuda)


@torch.library.register_fake("spotserve::reslice_copy")
def _reslice_copy_fake(dst, src, dim, src_start, dst_start, length):
    return None


@torch.library.register_fake("spotserve::fused_add_rms_norm")
def _fused_add_rms_norm_fake(x, residual, weight, eps):
    return None


def reslice_copy(dst: torch.Tensor, src: torch.Tensor, dim: int, src_start: int, dst_start: int, length: int) -> None:
    """Copy `src[..., src_start:src_start+length, ...]` (along `dim`) into the same-sized range of `dst`.

    Moves the overlap of two tensor-parallel shards, e.g. a tp=4 column shard into a tp=2 one.
    Raises RuntimeError on mismatched shapes, dtypes, devices or out-of-range slices.
    """
    torch.ops.spotserve.reslice_copy(dst, src, dim, src_start, dst_start, length)


def reslice_copy_ref(dst, src, dim, src_start, dst_start, length) -> None:
    dst.narrow(dim, dst_start, length).copy_(src.narrow(dim, src_start, length))


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: `residual += x`, then `x = rms_norm(residual) * weight` over the last dim."""
    torch.ops.spotserve.fused_add_rms_norm(x, residual, weight, eps)


def fused_add_rms_norm_ref(x, residual, weight, eps) -> None:
    residual.add_(x)
    h = residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    x.copy_(weight * h.to(x.dtype))
