"""Write random-weight Hugging Face checkpoint folders (config.json + safetensors shards), tensor by tensor.

safetensors' own writer (`save_file`) needs every tensor of a file in memory at once; to write the
20B/30B shapes on a small machine this module writes the (simple, documented) safetensors layout
itself: 8-byte little-endian header length, JSON header with each tensor's dtype, shape and byte
range, then the raw bytes. Shapes are known up front, so the header is written first and each
tensor is generated, written and dropped in turn; peak memory is one chunk of one tensor.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import torch

from spotserve.models import hf
from spotserve.models.spec import DTYPE_BYTES, ModelSpec

_ST_NAMES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INIT_STD = 0.02
# Elements generated at once; part of the definition of a seed's weights, so never change it.
CHUNK_ELEMS = 1 << 22
DEFAULT_MAX_SHARD_BYTES = 2 << 30


def plan_shards(spec: ModelSpec, dtype: str, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into files of at most max_shard_bytes (a bigger tensor gets its own file)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in hf.tensor_shapes(spec).items():
        nbytes = _numel(shape) * DTYPE_BYTES[dtype]
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def init_std(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of the random init of tensor `name`.

    Matrices (and an untied LM head) ~ N(0, (2 / sqrt(fan_in))^2): each layer visibly changes the
    residual stream (0.03 at hidden 4096, near the usual 0.02). Token embeddings N(0, 0.3), OPT's
    learned positions N(0, 1): with a tied LM head the current token's own embedding would otherwise
    dominate the logits and greedy decoding repeats one token; with this mix a tiny model's greedy
    output varies. Biases and norm parameters are small but non-zero (norm weights 1 + N(0, 0.02),
    biases N(0, 0.02)), so a bias or norm that is sliced or applied wrongly changes the logits.
    """
    if "norm" in name:
        return (1.0 if name.endswith(".weight") else 0.0), INIT_STD
    if len(shape) == 1:
        return 0.0, INIT_STD
    if "embed_positions" in name:
        return 0.0, 1.0
    if "embed_tokens" in name or "embed_in" in name:
        return 0.0, 0.3
    return 0.0, 2.0 / math.sqrt(shape[1])


def _chunks(name: str, shape: tuple[int, ...], seed: int, dtype: str):
    """Yield the tensor's values in row-major chunks; a function of (seed, name, shape) only."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
    numel = _numel(shape)
    mean, std = init_std(name, shape)
    for start in range(0, numel, CHUNK_ELEMS):
        vals = torch.randn(min(CHUNK_ELEMS, numel - start), generator=gen, dtype=torch.float32) * std
        if mean:
            vals += mean
        yield vals.to(_TORCH[dtype])


def _header(names: list[str], shapes: dict, dtype: str) -> bytes:
    meta: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name in names:
        nbytes = _numel(shapes[name]) * DTYPE_BYTES[dtype]
        meta[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shapes[name]), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment with spaces
    return struct.pack("<Q", len(raw)) + raw


def write_random_checkpoint(spec: ModelSpec, out: str | Path, seed: int = 0, dtype: str = "fp16",
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Path]:
    """Write config.json and model.safetensors (or model-0000i-of-0000n.safetensors + index json) to `out`.

    Deterministic for (spec, seed, dtype): each tensor depends only on its name, shape and the seed.
    Returns the weight files written. Raises ValueError on a bad dtype, FileExistsError when `out`
    already holds a checkpoint.
    """
    if dtype not in _ST_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_ST_NAMES)}")
    out = Path(out)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out}: already holds a checkpoint (config.json); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf.tensor_shapes(spec)
    shards = plan_shards(spec, dtype, max_shard_bytes)
    n = len(shards)
    files = [out / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
             for i in range(n)]
    for path, names in zip(files, shards):
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_header(names, shapes, dtype))
            for name in names:
                for chunk in _chunks(name, shapes[name], seed, dtype):
                    f.write(chunk.view(torch.uint8).numpy().data)
        tmp.replace(path)
    if n > 1:
        total = sum(_numel(s) for s in shapes.values()) * DTYPE_BYTES[dtype]
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: p.name for p, names in zip(files, shards) for name in names}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    # config.json last: a folder with a config is a complete checkpoint.
    (out / "config.json").write_text(json.dumps(hf.hf_config(spec, dtype), indent=2) + "\n")
    return files
