"""Tensor-parallel layers (Megatron style) built from the slices sharding.shard_slice assigns a shard.

Each layer checks that the slice it is given matches the sharding rule for its HF tensor name, so
checkpoint loading, the engine and migration re-slicing share one definition. Collectives go
through a `comm` object (dist.TPComm, or LOCAL for tp=1) with all_reduce(t) and all_gather(t).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spotserve import ops
from spotserve.models import sharding
from spotserve.models.spec import ModelSpec

_SKINNY_DTYPES = (torch.float16, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); decode-sized CUDA batches go through ops.skinny_gemm.

    x [tokens, in] with at most ops.SKINNY_MAX_ROWS tokens, fp16/bf16 on CUDA: the skinny GEMM
    kernel, which streams the weight once at near copy bandwidth where cuBLAS's GEMV-shaped
    kernels leave bandwidth unused and add split-K reduction kernels. Anything else: F.linear.
    """
    if (x.is_cuda and ops.WITH_CUDA and x.dtype in _SKINNY_DTYPES and x.dim() == 2
            and x.shape[0] <= ops.SKINNY_MAX_ROWS):
        return ops.skinny_gemm(x, weight, bias)
    return F.linear(x, weight, bias)


class LocalComm:
    """The tp=1 communicator: every collective is the identity."""

    size = 1
    rank = 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]


LOCAL = LocalComm()


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


def _checked(spec: ModelSpec, weights: dict, name: str, comm, dim: int | None) -> torch.Tensor:
    """weights[name], after checking its sharding rule splits along `dim` (None: replicated) and its shape."""
    if name not in weights:
        raise ValueError(f"{spec.name}: weight {name!r} missing from this shard's tensors")
    t = weights[name]
    rule = sharding.shard_slice(spec, name, comm.size, comm.rank)
    got_dim = None if rule is None else rule[0]
    if got_dim != dim:
        raise ValueError(f"{spec.name}: {name!r} is split along dim {got_dim} by the sharding rules, "
                         f"this layer expects {dim}")
    if rule is not None and t.shape[rule[0]] != rule[2] - rule[1]:
        raise ValueError(f"{spec.name}: {name!r} has {t.shape[rule[0]]} rows/cols along dim {rule[0]}, "
                         f"the tp={comm.size} rank={comm.rank} shard has {rule[2] - rule[1]}")
    return t


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: the output features are split across shards (no communication)."""

    def __init__(self, spec: ModelSpec, weights: dict, prefix: str, comm, bias: bool):
        super().__init__()
        self.weight = _param(_checked(spec, weights, prefix + ".weight", comm, 0))
        self.bias = _param(_checked(spec, weights, prefix + ".bias", comm, 0)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = sum over shards of x_local W_local^T, then + b (replicated bias, added once after the sum).

    With reduce=False the caller sums several partial outputs with one all-reduce and adds the bias
    itself (GPT-NeoX's parallel attention + MLP residual).
    """

    def __init__(self, spec: ModelSpec, weights: dict, prefix: str, comm, bias: bool):
        super().__init__()
        self.comm = comm
        self.weight = _param(_checked(spec, weights, prefix + ".weight", comm, 1))
        self.bias = _param(_checked(spec, weights, prefix + ".bias", comm, None)) if bias else None

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        if reduce and self.comm.size == 1:
            return linear(x, self.weight, self.bias)  # bias in the GEMM's epilogue
        y = linear(x, self.weight)
        if not reduce:
            return y
        y = self.comm.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def accumulate(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """out += x W_local^T in one GEMM (beta = 1), unreduced and without the bias; returns out."""
        return out.addmm_(x, self.weight.t())


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocab split across shards: each looks up its own ids, the sum is the row."""

    def __init__(self, spec: ModelSpec, weights: dict, name: str, comm):
        super().__init__()
        self.comm = comm
        self.weight = _param(_checked(spec, weights, name, comm, 0))
        self.start, self.end = sharding.partition(spec.vocab, comm.size, comm.rank)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        local = torch.where(mine, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """logits = h W^T with W split along the vocab; the shards' logits are gathered into the full row."""

    def __init__(self, spec: ModelSpec, weights: dict, name: str, comm):
        super().__init__()
        self.comm = comm
        self.weight = _param(_checked(spec, weights, name, comm, 0))
        self.sizes = [sharding.partition(spec.vocab, comm.size, r) for r in range(comm.size)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = linear(h, self.weight)
        if self.comm.size == 1:
            return local
        # Uneven vocab splits: pad every shard to the largest so the gather has equal sizes.
        width = max(e - s for s, e in self.sizes)
        padded = F.pad(local, (0, width - local.shape[-1]))
        parts = self.comm.all_gather(padded.contiguous())
        return torch.cat([p[..., :e - s] for p, (s, e) in zip(parts, self.sizes)], dim=-1)
