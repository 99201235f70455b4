"""A request's KV cache as a movable unit, and its re-slicing between parallel configs.

Worker (stage s, shard r) of a (pp, tp) config holds the layers sharding.stage_layers(L, pp, s)
and the kv heads sharding.partition(kv_heads, tp, r) of every request in its blocks. A
RequestKV is one such piece of one request; moving a request to a config (pp', tp') means, for
each new position, copying the overlaps (layer range x head range) of the old pieces: the list
those overlaps form (kv_transfer_slices) is what a migration plan schedules.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load as st_load, save as st_save

from spotserve.models import sharding
from spotserve.models.spec import ModelSpec


@dataclass
class RequestKV:
    """The KV of `num_tokens` positions of one request for global layers [layers) and kv heads [heads).

    data: [n_blocks, n_layers, 2, n_heads, block_size, head_dim] (the KVCache block layout).
    """

    req_id: str
    num_tokens: int
    block_size: int
    layers: tuple[int, int]
    heads: tuple[int, int]
    data: torch.Tensor

    def __post_init__(self):
        n_blocks = -(-self.num_tokens // self.block_size)
        want = (self.layers[1] - self.layers[0], 2, self.heads[1] - self.heads[0], self.block_size)
        if self.data.dim() != 6 or tuple(self.data.shape[1:5]) != want or self.data.shape[0] < n_blocks:
            raise ValueError(f"request {self.req_id}: KV data {tuple(self.data.shape)} does not match "
                             f"{n_blocks} blocks x {want} x head_dim")

    def to_bytes(self) -> bytes:
        """safetensors bytes (tensor + JSON metadata); no pickle."""
        meta = {"req_id": self.req_id, "num_tokens": self.num_tokens, "block_size": self.block_size,
                "layers": list(self.layers), "heads": list(self.heads)}
        return st_save({"kv": self.data.contiguous()}, metadata={"spotserve.request_kv": json.dumps(meta)})

    @classmethod
    def from_bytes(cls, blob: bytes) -> RequestKV:
        """Inverse of to_bytes; raises ValueError when the metadata is missing or malformed."""
        tensors = st_load(blob)
        # safetensors layout: 8-byte little-endian header length, then the JSON header.
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + header_len])
        raw = header.get("__metadata__", {}).get("spotserve.request_kv")
        if raw is None or "kv" not in tensors:
            raise ValueError("bytes are not a spotserve RequestKV (missing 'spotserve.request_kv' metadata)")
        try:
            m = json.loads(raw)
            return cls(str(m["req_id"]), int(m["num_tokens"]), int(m["block_size"]), tuple(m["layers"]),
                       tuple(m["heads"]), tensors["kv"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed RequestKV metadata: {exc}") from exc


@dataclass(frozen=True)
class KVTransfer:
    """Copy global layers [layers) x kv heads [heads) of a request from src (stage, shard) to dst (stage, shard)."""

    src: tuple[int, int]
    dst: tuple[int, int]
    layers: tuple[int, int]
    heads: tuple[int, int]


def kv_slice(spec: ModelSpec, pp: int, tp: int, stage: int, shard: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(layer range, kv head range) held by position (stage, shard) of a (pp, tp) config."""
    layers = sharding.stage_layers(spec.num_layers, pp, stage)
    if not spec.valid_tp(tp):
        raise ValueError(f"{spec.name}: tp={tp} does not split {spec.kv_heads} kv heads evenly")
    return (layers.start, layers.stop), sharding.partition(spec.kv_heads, tp, shard)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def kv_transfer_slices(spec: ModelSpec, src: tuple[int, int], dst: tuple[int, int]) -> list[KVTransfer]:
    """All copies that rebuild a request's KV laid out for dst=(pp', tp') from its layout for src=(pp, tp)."""
    (spp, stp), (dpp, dtp) = src, dst
    out = []
    for ds in range(dpp):
        for dr in range(dtp):
            dl, dh = kv_slice(spec, dpp, dtp, ds, dr)
            for ss in range(spp):
                for sr in range(stp):
                    sl, sh = kv_slice(spec, spp, stp, ss, sr)
                    lo, ho = _overlap(dl, sl), _overlap(dh, sh)
                    if lo and ho:
                        out.append(KVTransfer((ss, sr), (ds, dr), lo, ho))
    return out


def reblock(data: torch.Tensor, num_tokens: int, block_size: int) -> torch.Tensor:
    """Re-pack [n, L, 2, H, B, D] blocks into blocks of `block_size` positions (same content)."""
    n, L, two, H, B, D = data.shape
    flat = data.permute(1, 2, 3, 0, 4, 5).reshape(L, two, H, n * B, D)[:, :, :, :num_tokens]
    nb = -(-num_tokens // block_size)
    padded = flat.new_zeros(L, two, H, nb * block_size, D)
    padded[:, :, :, :num_tokens] = flat
    return padded.reshape(L, two, H, nb, block_size, D).permute(3, 0, 1, 2, 4, 5).contiguous()


def assemble(pieces: list[RequestKV], spec: ModelSpec, pp: int, tp: int, stage: int, shard: int,
             num_tokens: int | None = None, block_size: int | None = None) -> RequestKV:
    """The KV piece of position (stage, shard) of config (pp, tp), copied from the overlapping `pieces`.

    num_tokens: keep only the first positions (a resume from fewer committed tokens); block_size:
    re-pack for a cache with another block size. Raises ValueError when the pieces come from
    different requests or do not cover the requested slice.
    """
    if not pieces:
        raise ValueError("no KV pieces to assemble from")
    req_ids = {p.req_id for p in pieces}
    if len(req_ids) != 1:
        raise ValueError(f"KV pieces of several requests: {sorted(req_ids)}")
    have = min(p.num_tokens for p in pieces)
    num_tokens = have if num_tokens is None else num_tokens
    if not 0 < num_tokens <= have:
        raise ValueError(f"request {pieces[0].req_id}: asked for {num_tokens} KV positions, pieces hold {have}")
    layers, heads = kv_slice(spec, pp, tp, stage, shard)
    bs = pieces[0].block_size
    src = [p if p.block_size == bs else RequestKV(p.req_id, p.num_tokens, bs, p.layers, p.heads,
                                                   reblock(p.data, p.num_tokens, bs)) for p in pieces]
    nb = -(-num_tokens // bs)
    ref = src[0].data
    out = ref.new_zeros(nb, layers[1] - layers[0], 2, heads[1] - heads[0], bs, ref.shape[-1])
    covered = torch.zeros(layers[1] - layers[0], heads[1] - heads[0], dtype=torch.bool)
    for p in src:
        lo, ho = _overlap(layers, p.layers), _overlap(heads, p.heads)
        if not (lo and ho):
            continue
        part = p.data[:nb, lo[0] - p.layers[0]:lo[1] - p.layers[0], :, ho[0] - p.heads[0]:ho[1] - p.heads[0]]
        out[:, lo[0] - layers[0]:lo[1] - layers[0], :, ho[0] - heads[0]:ho[1] - heads[0]] = part
        covered[lo[0] - layers[0]:lo[1] - layers[0], ho[0] - heads[0]:ho[1] - heads[0]] = True
    if not bool(covered.all()):
        raise ValueError(f"request {pieces[0].req_id}: KV pieces do not cover layers {layers} x kv heads {heads}")
    result = RequestKV(pieces[0].req_id, num_tokens, bs, layers, heads, out)
    if block_size is not None and block_size != bs:
        result = RequestKV(result.req_id, num_tokens, block_size, layers, heads, reblock(out, num_tokens, block_size))
    return result
