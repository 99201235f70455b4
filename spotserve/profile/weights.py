"""Random model weights built directly on the device with a fixed seed (no checkpoint on disk)."""
from __future__ import annotations

import zlib

import torch

from spotserve.models import hf
from spotserve.models.checkpoint import init_std
from spotserve.models.spec import ModelSpec


def random_weights(spec: ModelSpec, dtype: torch.dtype = torch.float16, device="cpu", seed: int = 0) -> dict:
    """HF-named tensors of `spec` drawn like `python -m spotserve.checkpoint random` draws them.

    Each tensor comes from its own generator seeded by (seed, name), on `device`, so the values are
    reproducible on that device type (CUDA and CPU generators differ). Returns {name: tensor}.
    """
    out = {}
    for name, shape in hf.shape_map(spec).items():
        gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (1 << 63))
        mean, std = init_std(name, shape)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32 if len(shape) == 1 else dtype)
        out[name] = t.mul_(std).add_(mean).to(dtype)
    return out


def weight_bytes(weights: dict) -> int:
    """Total bytes of a weights dict."""
    return sum(t.numel() * t.element_size() for t in weights.values())
