"""The contender without custom kernels: the same decoder in plain torch ops over a static KV cache.

gpt-fast style: one [batch, kv_heads, max_len, head_dim] K and V tensor per layer, written with
index_copy_ at the step's position; attention is scaled_dot_product_attention (over the whole
static length with a position mask when decoding, causal over the prompt when prefilling); every
matrix product is cuBLAS through F.linear. A decode step is captured once in a CUDA graph and
replayed. It reads the engine's weight tensors (no copy), so both compute the same function.
OPT and GPT-NeoX shapes (LayerNorm, learned or partial rotary positions, sequential or parallel
residual); every request of a batch sits at the same position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spotserve.engine.model import StageModel

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class PlainTorchDecoder:
    """Static-cache decoder over a one-stage StageModel's weights (tp = 1)."""

    def __init__(self, model: StageModel, batch: int, max_len: int):
        spec = model.spec
        if spec.family not in ("opt", "gpt_neox") or not (model.first and model.last):
            raise ValueError(f"plain-torch contender: needs a whole OPT or GPT-NeoX model, got {spec.name}")
        self.m, self.spec, self.batch, self.max_len = model, spec, batch, max_len
        w = model.embed.weight
        shape = (batch, spec.kv_heads, max_len, spec.head_dim)
        self.cache = [(torch.zeros(shape, dtype=w.dtype, device=w.device),
                       torch.zeros(shape, dtype=w.dtype, device=w.device)) for _ in model.layers]
        if model.rotary is not None:
            half = model.rotary.rotary_dim // 2
            self.cos = model.rotary.cos_sin[:, :half].to(w.dtype)
            self.sin = model.rotary.cos_sin[:, half:].to(w.dtype)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=w.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=w.device)
        self.graph = None
        self.logits = None

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Rotate-half rotary on the first rotary_dim dims of x [b, t, heads, D] at positions pos [t]."""
        rd = self.m.rotary.rotary_dim
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        x1, x2, rest = x[..., :rd // 2], x[..., rd // 2:rd], x[..., rd:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)

    def _attention(self, layer, i: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        s = self.spec
        qkv = F.linear(x, layer.qkv.weight, layer.qkv.bias)
        q, k, v = qkv.split([s.num_heads * s.head_dim, s.kv_heads * s.head_dim,
                             s.kv_heads * s.head_dim], dim=-1)
        q, k, v = (y.view(b, t, -1, s.head_dim) for y in (q, k, v))
        if self.m.rotary is not None:
            q, k = self._rotate(q, pos), self._rotate(k, pos)
        kc, vc = self.cache[i]
        kc.index_copy_(2, pos, k.transpose(1, 2))
        vc.index_copy_(2, pos, v.transpose(1, 2))
        if t > 1:  # prefill from an empty cache: causal over the prompt
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=layer.scale)
        else:
            mask = (torch.arange(self.max_len, device=x.device) <= pos).view(1, 1, 1, -1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kc, vc, attn_mask=mask, scale=layer.scale)
        return F.linear(o.transpose(1, 2).reshape(b, t, -1), layer.o.weight)

    def _mlp(self, layer, x: torch.Tensor) -> torch.Tensor:
        act = _ACT[layer.mlp.act]
        return F.linear(act(F.linear(x, layer.mlp.weight, layer.mlp.bias)), layer.down.weight, layer.down.bias)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits [b, vocab] of the last position for ids [b, t] at positions pos [t] (long)."""
        m = self.m
        h = F.embedding(ids, m.embed.weight)
        if m.positions is not None:
            h = h + F.embedding(pos + 2, m.positions)
        for i, layer in enumerate(m.layers):
            ln = lambda norm, y: F.layer_norm(y, y.shape[-1:], norm.weight, norm.bias, norm.eps)  # noqa: E731
            if layer.parallel:
                h = h + self._attention(layer, i, ln(layer.ln1, h), pos) + layer.o.bias + self._mlp(layer, ln(layer.ln2, h))
            else:
                h = h + self._attention(layer, i, ln(layer.ln1, h), pos) + layer.o.bias
                h = h + self._mlp(layer, ln(layer.ln2, h))
        return F.linear(m.final_norm(h[:, -1]), m.lm_head.weight)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [batch, t] from position 0 (eager): greedy next tokens [batch]."""
        return self.forward(ids, torch.arange(ids.shape[1], device=ids.device)).argmax(-1)

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, pos: int) -> torch.Tensor:
        """One graph-replayed decode step for ids [batch] at position pos: greedy tokens [batch] (device)."""
        self.ids.copy_(ids.view(-1, 1), non_blocking=True)
        self.pos.fill_(pos)
        if not self.ids.is_cuda:  # no graphs on the CPU: the same step, eagerly
            return self.forward(self.ids, self.pos).argmax(-1)
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.forward(self.ids, self.pos)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.forward(self.ids, self.pos)
                self.tokens = self.logits.argmax(-1)
        self.graph.replay()
        return self.tokens
