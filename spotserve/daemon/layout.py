"""Where context lives before and after a reconfiguration: GPU positions and the exact element ranges they hold.

A Layout is one side of a migration (old or new): each replica's shape (pp, tp), the GPU of every
position, and the KV block size of its engines. The element ranges come from the sharding rules
(sharding.shard_slice / stage_layers / partition), so they are exact for uneven splits too; the
planner's (lo, hi, den) fractions are only an approximation of them (see resolve.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple

from spotserve.models import hf, sharding
from spotserve.models.spec import ModelSpec
from spotserve.planner.types import ParallelConfig, Position, ReconfigurationPlan


class Range(NamedTuple):
    """Elements [start, end) along `dim` of an HF tensor; replicated tensors are (0, 0, rows) with replicated True."""

    dim: int
    start: int
    end: int
    replicated: bool


@dataclass(frozen=True)
class KVRequest:
    """A request whose KV cache moves: served by `old_replica`, continued by `new_replica`, with
    `num_tokens` cached positions (RunningRequest.tokens; Engine.export_request's num_tokens)."""

    request_id: str
    old_replica: int
    new_replica: int
    num_tokens: int

    def __post_init__(self):
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"KVRequest: request_id must be a non-empty string, got {self.request_id!r}")
        for name in ("old_replica", "new_replica", "num_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"KVRequest {self.request_id}: {name} must be an int >= 0, got {v!r}")


@dataclass(frozen=True, eq=False)
class Layout:
    """Replica shapes (replica -> (pp, tp)), placement (Position -> GPU id) and the engines' KV block size."""

    shapes: Mapping[int, tuple[int, int]]
    placement: Mapping[Position, str]
    block_size: int = 16
    _gpu_pos: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"Layout: block_size must be a positive int, got {self.block_size!r}")
        want = set()
        for rep, (pp, tp) in self.shapes.items():
            if min(pp, tp) < 1:
                raise ValueError(f"Layout: replica {rep} has shape pp={pp} tp={tp}")
            want |= {Position(rep, s, k) for s in range(pp) for k in range(tp)}
        if set(self.placement) != want:
            raise ValueError("Layout: placement must cover exactly the positions of the replica shapes")
        for pos, gpu in self.placement.items():
            if gpu in self._gpu_pos:
                raise ValueError(f"Layout: GPU {gpu} holds two positions")
            self._gpu_pos[gpu] = pos

    @classmethod
    def of(cls, config: ParallelConfig, placement: Mapping[Position, str], block_size: int = 16,
           extra: ParallelConfig | None = None) -> Layout:
        """The layout of `config` (+ an extra dp=1 replica numbered config.dp) placed by `placement`."""
        shapes = {r: (config.pp, config.tp) for r in range(config.dp)}
        if extra is not None:
            shapes[config.dp] = (extra.pp, extra.tp)
        return cls(shapes, dict(placement), block_size)

    @classmethod
    def from_plan(cls, plan: ReconfigurationPlan, block_size: int = 16) -> Layout:
        """The layout a planner's ReconfigurationPlan describes; ValueError for a cannot-serve plan."""
        if plan.config is None:
            raise ValueError(f"Layout.from_plan: the plan serves nothing ({plan.cannot_serve})")
        return cls.of(plan.config, plan.placement, block_size, plan.extra)

    # --- positions -----------------------------------------------------------------------------
    def gpus(self) -> list[str]:
        """GPU ids in position order."""
        return [self.placement[p] for p in sorted(self.placement)]

    def position(self, gpu: str) -> Position | None:
        return self._gpu_pos.get(gpu)

    def shape(self, replica: int) -> tuple[int, int]:
        return self.shapes[replica]

    # --- context of one GPU --------------------------------------------------------------------
    def weight_ranges(self, spec: ModelSpec, gpu: str) -> dict[str, Range]:
        """HF name -> exact Range held by `gpu` (empty when it has no position here)."""
        pos = self.position(gpu)
        if pos is None:
            return {}
        pp, tp = self.shapes[pos.replica]
        return dict(_weight_ranges(spec, pp, tp, pos.stage, pos.shard))

    def kv_ranges(self, spec: ModelSpec, gpu: str) -> tuple[int, tuple[int, int], tuple[int, int]] | None:
        """(replica, layer range, kv head range) whose KV `gpu` holds, or None without a position."""
        pos = self.position(gpu)
        if pos is None:
            return None
        pp, tp = self.shapes[pos.replica]
        layers = sharding.stage_layers(spec.num_layers, pp, pos.stage)
        return pos.replica, (layers.start, layers.stop), sharding.partition(spec.kv_heads, tp, pos.shard)


@functools.lru_cache(maxsize=256)
def _weight_ranges(spec: ModelSpec, pp: int, tp: int, stage: int, shard: int) -> tuple[tuple[str, Range], ...]:
    shapes = hf.shape_map(spec)
    out = []
    for name in sharding.stage_tensor_names(spec, pp, stage):
        sl = sharding.shard_slice(spec, name, tp, shard)
        rows = (shapes.get(name) or (spec.vocab, spec.hidden))[0]
        out.append((name, Range(0, 0, rows, True) if sl is None else Range(sl[0], sl[1], sl[2], False)))
    return tuple(out)


def full_shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """Shape of the whole HF tensor `name` (an untied LM head has the embedding's shape)."""
    return tuple(hf.shape_map(spec).get(name) or (spec.vocab, spec.hidden))


def box_shape(spec: ModelSpec, name: str, dim: int, length: int) -> tuple[int, ...]:
    """Shape of `length` elements of `name` along `dim` (all of every other dim)."""
    shape = list(full_shape(spec, name))
    shape[dim] = length
    return tuple(shape)


def unit_of(spec: ModelSpec, name: str, first: bool) -> tuple[str, int]:
    """Progress unit of HF tensor `name` on a destination: ("layer", i), ("embed", -1) or ("head", -1).

    The token embedding of a tied model belongs to "embed" on a first stage (`first`), else to "head".
    """
    layer = hf.layer_of(name)
    if layer is not None:
        return ("layer", layer)
    if name in hf.embedding_names(spec) and (first or name != hf.head_source(spec)):
        return ("embed", -1)
    return ("head", -1)
