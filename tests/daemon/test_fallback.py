"""Disk fallback: transfer units with src=None are read slice by slice from the checkpoint and
placed into destination shards, giving exactly what a fresh sharding of the checkpoint gives."""
from __future__ import annotations

import pytest
import torch

from spotserve.daemon.fallback import Piece, place_piece, read_pieces, unit_pieces
from spotserve.models.checkpoint import write_random_checkpoint
from spotserve.models.loader import CheckpointReader, load_shard
from spotserve.models.sharding import shard_shape
from spotserve.models.spec import get_spec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", params=["opt-tiny", "llama-tiny", "gpt-neox-tiny"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / request.param
    write_random_checkpoint(get_spec(request.param), path, seed=5, dtype="fp16")
    return path


@pytest.mark.parametrize("tp,rank", [(1, 0), (2, 1), (3, 2)])
def test_quarter_pieces_rebuild_every_shard_exactly(checkpoint, tp, rank):
    reader = CheckpointReader(checkpoint)
    spec = reader.spec
    if not spec.valid_tp(tp):
        tp, rank = 2, 0
    expected = load_shard(checkpoint, 1, 0, tp, rank)
    shards = {n: torch.full(shard_shape(spec, n, tp, rank), float("nan"), dtype=torch.float16) for n in expected}
    den = 6 * tp  # finer than any shard, like the planner's lcm of tp degrees
    units = [("embed", None), *[("layer", i) for i in range(spec.num_layers)], ("head", None)]
    for tensor, layer in units:
        for lo in range(den):
            try:
                pieces = unit_pieces(spec, tensor, layer, (lo, lo + 1, den))
            except ValueError:  # a dimension that does not split this fine: take the whole unit once
                if lo:
                    continue
                pieces = unit_pieces(spec, tensor, layer, None)
            for piece, data in read_pieces(reader, pieces):
                place_piece(spec, shards[piece.name], piece.name, tp, rank, piece, data)
    for name, want in expected.items():
        assert torch.equal(shards[name], want), name


def test_bytes_read_are_only_the_missing_slice(checkpoint):
    reader = CheckpointReader(checkpoint)
    spec = reader.spec
    pieces = unit_pieces(spec, "layer", 1, (1, 2, 2))
    got = read_pieces(reader, pieces)
    sliced = [(p, t) for p, t in got if p.dim is not None]
    assert sliced and all(t.shape[p.dim] == p.end - p.start for p, t in sliced)
    assert reader.bytes_read == sum(t.numel() * t.element_size() for _, t in got)
    full = sum(reader.read(p.name).numel() * 2 for p in pieces)
    assert sum(t.numel() * 2 for _, t in got) < full


def test_bad_units_and_mismatched_pieces_raise():
    spec = get_spec("opt-tiny")
    with pytest.raises(ValueError, match="KV cache"):
        unit_pieces(spec, "kv", 0, None)
    with pytest.raises(ValueError, match="layer"):
        unit_pieces(spec, "layer", spec.num_layers, None)
    with pytest.raises(ValueError, match="split"):
        unit_pieces(spec, "layer", 0, (1, 2, 7))
    name = "model.decoder.layers.0.fc1.weight"
    shard = torch.zeros(shard_shape(spec, name, 2, 0), dtype=torch.float16)
    with pytest.raises(ValueError, match="dim"):
        place_piece(spec, shard, name, 2, 0, Piece(name, 1, 0, 4), torch.zeros(96, 4))
