"""Exact weight bytes of the planner's context units, from the sharding rules (sharding.shard_slice, partition).

A unit ("layer" i, "embed", "head") is split into three classes of bytes:
- even: tensors split by attention heads (q/k/v/qkv rows, out-projection columns, their column
  biases): every valid tp splits them evenly, so a fraction [lo, hi) of den holds exactly
  even * (hi - lo) / den bytes;
- uneven: tensors split by ``partition`` of a dimension of ``n`` elements (ffn for layers, vocab
  for the embedding and the LM head), ``per_elem`` bytes per element; shard k of tp holds the
  elements ``partition(n, tp, k)`` (the first n % tp shards get one more), not a fraction;
- replicated: tensors every shard holds whole (norms, row-parallel biases, OPT's learned
  positions, the final norm), counted once per destination, never split by tp.
With tied embeddings the token embedding is one tensor: a first stage holds it in "embed", any other
last stage in "head"; a position that is both (pp = 1) holds it once, in "embed".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from spotserve.models import hf, sharding
from spotserve.models.spec import ModelSpec


@dataclass(frozen=True)
class UnitBytes:
    """Byte classes of one unit: even-split bytes (whole tensor), uneven dim (n, per_elem), replicated."""

    even: int
    n: int
    per_elem: int
    replicated: int

    def split_bytes(self, lo: int, hi: int, den: int, elems: tuple[int, int] | None) -> int:
        """Bytes of the tp-split tensors in fraction [lo, hi) / den (even) and elements ``elems`` (uneven)."""
        out = self.even * (hi - lo) // den
        if elems is not None:
            out += (elems[1] - elems[0]) * self.per_elem
        return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@functools.lru_cache(maxsize=64)
def unit_bytes(spec: ModelSpec, dtype_bytes: int) -> dict[str, UnitBytes]:
    """UnitBytes of "layer" (any layer), "embed", "head" and "head_tied_first" (the head of a position
    that is also a first stage: with tied embeddings it has no vocab part)."""
    shapes = hf.shape_map(spec)
    even = uneven = rep = 0
    pre = hf.layer_prefix(spec, 0)
    for name, shape in shapes.items():
        if not name.startswith(pre):
            continue
        sl = sharding.shard_slice(spec, name, 1, 0)
        size = _numel(shape) * dtype_bytes
        if sl is None:
            rep += size
        elif sl[2] == spec.ffn:  # a heads-split dim of ffn elements splits evenly anyway (valid_tp)
            uneven += size
        else:
            even += size
    out = {"layer": UnitBytes(even, spec.ffn, uneven // spec.ffn, rep)}
    row = spec.hidden * dtype_bytes
    emb_rep = sum(_numel(shapes[n]) for n in hf.embedding_names(spec)[1:]) * dtype_bytes
    norm = sum(_numel(shapes[n]) for n in hf.final_norm_names(spec)) * dtype_bytes
    out["embed"] = UnitBytes(0, spec.vocab, row, emb_rep)
    out["head"] = UnitBytes(0, spec.vocab, row, norm)
    out["head_tied_first"] = UnitBytes(0, spec.vocab, 0 if spec.tie_word_embeddings else row, norm)
    return out


def elem_range(n: int, tp: int, shard: int) -> tuple[int, int]:
    """Elements of an n-element dimension that shard ``shard`` of ``tp`` holds (sharding.partition)."""
    return sharding.partition(n, tp, shard)
