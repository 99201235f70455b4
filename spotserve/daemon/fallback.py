"""Disk fallback of a migration: load the slices no live GPU holds from the local checkpoint.

The migration planner marks such parts with `Transfer.src is None` (chosen per slice: a part
whose interval no surviving GPU covers, typically after a burst of preemptions). A transfer names
a unit ("layer" L, "embed" or "head") and a fraction [lo/den, hi/den) of its tensor-parallel
dimension; here that becomes, for every HF tensor of the unit, the element range it covers
(replicated tensors such as norms come whole), read through CheckpointReader so only those bytes
are touched, then written into the destination's shard tensors with the `_C` re-slicing copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spotserve.models import hf
from spotserve.models.loader import CheckpointReader
from spotserve.models.sharding import shard_slice
from spotserve.models.spec import ModelSpec


@dataclass(frozen=True)
class Piece:
    """Part of one HF tensor: rows/columns [start, end) along `dim`, or the whole tensor (dim None)."""

    name: str
    dim: int | None
    start: int
    end: int


def unit_tensors(spec: ModelSpec, tensor: str, layer: int | None) -> list[str]:
    """HF names of a transfer unit: a decoder layer's tensors, the embeddings or the head."""
    if tensor == "layer":
        if layer is None or not 0 <= layer < spec.num_layers:
            raise ValueError(f"{spec.name}: layer {layer!r} out of range")
        return [n for n in hf.shape_map(spec) if hf.layer_of(n) == layer]
    if tensor == "embed":
        return list(hf.embedding_names(spec))
    if tensor == "head":
        names = list(hf.final_norm_names(spec))
        return names + [hf.head_source(spec)]
    raise ValueError(f"no checkpoint tensors for transfer unit {tensor!r} (KV cache has no disk copy)")


def unit_pieces(spec: ModelSpec, tensor: str, layer: int | None,
                fraction: tuple[int, int, int] | None) -> list[Piece]:
    """The pieces of every tensor of the unit covered by `fraction` = (lo, hi, den) (None: all).

    Raises ValueError when a tensor's tp dimension does not split at that fraction exactly.
    """
    pieces = []
    for name in unit_tensors(spec, tensor, layer):
        full = shard_slice(spec, name, 1, 0)  # (dim, 0, extent) of the tp dimension, or None
        if full is None:
            pieces.append(Piece(name, None, 0, 0))
            continue
        dim, _, extent = full
        lo, hi, den = fraction or (0, 1, 1)
        if (lo * extent) % den or (hi * extent) % den:
            raise ValueError(f"{name}: extent {extent} of dim {dim} does not split at {lo}/{den}..{hi}/{den}")
        pieces.append(Piece(name, dim, lo * extent // den, hi * extent // den))
    return pieces


def read_pieces(reader: CheckpointReader, pieces: list[Piece]) -> list[tuple[Piece, torch.Tensor]]:
    """Reads each piece (only its bytes; reader.bytes_read counts them)."""
    return [(p, reader.read(p.name) if p.dim is None else reader.read(p.name, p.dim, p.start, p.end))
            for p in pieces]


def place_piece(spec: ModelSpec, shard: torch.Tensor, name: str, tp: int, rank: int, piece: Piece,
                data: torch.Tensor) -> int:
    """Writes the part of `data` (piece of tensor `name`) that tp rank `rank` holds into `shard`.

    Returns the number of bytes written (0 when the piece and the shard do not overlap).
    Raises ValueError when the piece and the shard disagree on the split dimension.
    """
    from spotserve import ops

    held = shard_slice(spec, name, tp, rank)
    data = data.to(shard.dtype).contiguous()  # the copy op takes dense tensors
    if piece.dim is None or held is None:
        if piece.dim is not None or held is not None:
            raise ValueError(f"{name}: piece dim {piece.dim} vs shard slice {held}")
        shard.copy_(data)
        return shard.numel() * shard.element_size()
    dim, s0, s1 = held
    if dim != piece.dim:
        raise ValueError(f"{name}: piece splits dim {piece.dim}, shard splits dim {dim}")
    a, b = max(s0, piece.start), min(s1, piece.end)
    if a >= b:
        return 0
    ops.reslice_copy(shard, data, dim, a - piece.start, a - s0, b - a)
    return (b - a) * shard.numel() // shard.shape[dim] * shard.element_size()
