"""Token selection: greedy, or temperature + top-p with randomness keyed by (seed, token index).

Each sampled token gets its own torch.Generator seeded from the request's seed and the index of
the token in the output, so the draw never depends on the batch around the request, on the
worker that samples it, or on whether the request was resumed elsewhere.
"""
from __future__ import annotations

import torch

from spotserve.engine.sequence import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): well-spread generator seeds for consecutive token indices."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def sample_one(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Pick the token at output position `index` from a [vocab] row of logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator(device=probs.device).manual_seed(_mix(params.seed, index))
    return int(torch.multinomial(probs, 1, generator=gen))


def sample(logits: torch.Tensor, params: list[SamplingParams], indices: list[int]) -> list[int]:
    """Tokens for a [batch, vocab] block of logits; params and indices are per row."""
    if logits.shape[0] != len(params) or len(params) != len(indices):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} params and {len(indices)} indices")
    if all(p.greedy for p in params):
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    return [sample_one(row, p, i) for row, p, i in zip(logits, params, indices)]
