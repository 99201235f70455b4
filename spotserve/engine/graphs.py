"""Static-shape decode steps, replayed from CUDA graphs captured per (batch bucket, context bucket).

A decode step (every request feeds one token) of a one-stage replica runs on preallocated device
tensors: token ids, positions, cache slots, block tables and context lengths are copied in from
pinned host buffers with non-blocking copies, the batch is padded to the next bucket size (padding
rows: slot -1, so nothing is written, and context length 0, so attention outputs zeros), and the
whole forward pass with greedy argmax is replayed from a few graphs (consecutive slices of the
layers, so launching the next overlaps running the previous): no host synchronisation inside the
step, a handful of launches instead of hundreds. The context bucket (next power of two of the longest context)
fixes the decode kernel's split-K launch shape, which the graph freezes.

On the CPU, or with graphs disabled, the same static step runs eagerly: tests exercise the padding
and bucketing the graphs depend on.
"""
from __future__ import annotations

import torch

from spotserve.engine.batch import Batch, DecodeMeta, Work
from spotserve.engine.kv_cache import KVCache
from spotserve.engine.model import StageModel


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then multiples of 8, up to and including max_batch."""
    out = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return out + [max_batch]


class StaticDecoder:
    """Runs decode steps of a single-stage model on static buffers, from CUDA graphs when use_graphs."""

    def __init__(self, model: StageModel, cache: KVCache, max_batch: int, max_positions: int, use_graphs: bool,
                 chunks: int = 4):
        self.model, self.cache = model, cache
        self.chunks = max(1, min(chunks, len(model.layers)))
        self.device = cache.data.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = min(cache.num_blocks, cache.block_count(max_positions))
        self.capacity = self.max_blocks * cache.block_size
        n, dev = self.buckets[-1], self.device
        pin = self.device.type == "cuda"
        host = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, pin_memory=pin)  # noqa: E731
        self.host = {"ids": host(n, dtype=torch.long), "positions": host(n, dtype=torch.long),
                     "slots": host(n, dtype=torch.long), "tables": host(n, self.max_blocks, dtype=torch.int32),
                     "lens": host(n, dtype=torch.int32)}
        self.np = {k: v.numpy() for k, v in self.host.items()}
        self.dev = {k: torch.zeros_like(v, device=dev) for k, v in self.host.items()}
        self.logits = torch.zeros(n, model.spec.vocab, dtype=cache.data.dtype, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], list[torch.cuda.CUDAGraph]] = {}
        self.pool = None

    def bucket(self, n: int) -> int:
        """Smallest batch bucket holding n requests (ValueError past max_batch)."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch of {n} exceeds max_batch {self.buckets[-1]}")

    def context_bucket(self, longest: int) -> int:
        """Launch bound for contexts up to `longest`: the next power of two (>= 16), capped by the table width."""
        return min(self.capacity, max(16, 1 << (longest - 1).bit_length()))

    def run(self, work: list[Work]) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of `work` (one token each); returns (greedy tokens [n], logits [n, vocab]) on the device."""
        n = len(work)
        size = self.bucket(n)
        self._stage(work, size)
        key = (size, self.context_bucket(max(w.start + 1 for w in work)))
        for name, buf in self.host.items():
            self.dev[name][:size].copy_(buf[:size], non_blocking=True)
        if not self.use_graphs:
            self._forward(*key)
        else:
            graphs = self.graphs.get(key)
            if graphs is None:
                graphs = self.graphs[key] = self._capture(*key)
            for graph in graphs:
                graph.replay()
        return self.tokens[:n], self.logits[:n]

    def _stage(self, work: list[Work], size: int) -> None:
        """Fill the host buffers for `work`, padding rows up to `size` (numpy views: cheap per-row writes)."""
        h, bs, n = self.np, self.cache.block_size, len(work)
        h["tables"][:size] = 0
        for i, w in enumerate(work):
            pos = w.start
            nb = pos // bs + 1
            h["ids"][i] = w.tokens[0]
            h["positions"][i] = pos
            h["slots"][i] = w.table[nb - 1] * bs + pos % bs
            h["tables"][i, :nb] = w.table[:nb]
            h["lens"][i] = pos + 1
        h["ids"][n:size] = 0
        h["positions"][n:size] = 0
        h["slots"][n:size] = -1
        h["lens"][n:size] = 0

    def _parts(self, size: int, max_len: int) -> list:
        """The static step on the first `size` rows as `self.chunks` consecutive callables: embeddings
        and the first layers, ..., the last layers, LM head and greedy argmax. Each becomes one graph:
        the GPU runs part i while the CPU still launches part i + 1, hiding most of the launch time."""
        d = {k: v[:size] for k, v in self.dev.items()}
        batch = Batch(d["ids"], d["positions"], d["slots"], None, DecodeMeta(d["tables"], d["lens"], max_len))
        model, n = self.model, len(self.model.layers)
        bounds = [n * i // self.chunks for i in range(self.chunks + 1)]
        state = {}  # h and x live across parts (and stay referenced, so no later capture reuses them)

        def part(i: int) -> None:
            if i == 0:
                state["h"], state["x"] = model.embed_tokens(batch.ids, batch.positions), None
            state["x"] = model.run_layers(state["x"], state["h"], batch, self.cache, bounds[i], bounds[i + 1])
            if i == self.chunks - 1:
                logits = model.logits(state["h"].add_(state["x"]))
                self.logits[:size].copy_(logits)
                torch.argmax(logits, dim=-1, out=self.tokens[:size])

        return [lambda i=i: part(i) for i in range(self.chunks)]

    def _forward(self, size: int, max_len: int) -> None:
        """The static step, eagerly."""
        for part in self._parts(size, max_len):
            part()

    def _capture(self, size: int, max_len: int) -> list:
        """Capture the static step for (size, max_len) as graphs of its parts; the buffers already hold
        this step's inputs. The warm-up run on a side stream (cuBLAS picks its kernels, allocations
        settle) performs the step for real; the replay that follows repeats it, rewriting the same K/V."""
        parts = self._parts(size, max_len)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for part in parts:
                part()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graphs = []
        for part in parts:  # replayed in this order, so the parts may share one memory pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                part()
            graphs.append(graph)
        return graphs
