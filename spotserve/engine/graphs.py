"""Static-shape decode steps of one stage, replayed from CUDA graphs captured per (batch bucket, context bucket).

A decode step (every request feeds one token) runs on preallocated device tensors: token ids,
positions, cache slots, block tables and context lengths are copied in from pinned host buffers
with non-blocking copies, the batch is padded to the next bucket size (padding rows: slot -1, so
nothing is written, and context length 0, so attention outputs zeros), and the stage's forward pass
(with greedy argmax on the last stage) is replayed from a few graphs per micro-batch (consecutive
slices of the layers, so launching the next overlaps running the previous): no host
synchronisation inside the step, a handful of launches instead of hundreds. The context bucket
(next power of two of the longest context) fixes the decode kernel's split-K launch shape, which
the graph freezes.

Tensor parallelism: the shards' all-reduces and the LM head's all-gather (NCCL on the stage's tp
group) are captured inside the graphs. That is sound because every shard runs the same steps
(lockstep), so they capture the same keys in the same order (checked once per key over the group),
the communicators are warmed up by the eager warm-up run before each capture, and the capture
runs on the side stream torch.cuda.graph manages. Pipeline stages exchange hidden states with
eager send/recv between graph replays (static buffers, no host wait): the stage-to-stage traffic
stays visible to the NCCL watchdog, which is what turns a lost peer into an error instead of a hang.

On the CPU, or with graphs disabled, the same static step runs eagerly: tests exercise the padding,
bucketing and micro-batch rows the graphs depend on.
"""
from __future__ import annotations

import weakref

import torch

from spotserve.engine import dist
from spotserve.engine.batch import Batch, DecodeMeta, Work
from spotserve.engine.kv_cache import KVCache
from spotserve.engine.model import StageModel
from spotserve.models import sharding


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, then multiples of 8, up to and including max_batch."""
    out = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return out + [max_batch]


def micro_rows(size: int, micro_batches: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of the micro-batches of a padded batch of `size` rows (none empty)."""
    m = max(1, min(micro_batches, size))
    return [sharding.partition(size, m, i) for i in range(m)]


_LIVE: weakref.WeakSet = weakref.WeakSet()  # decoders of this process, for release_all


def release_all() -> None:
    """Drop the CUDA graphs of every decoder of this process (before its process groups go)."""
    for decoder in list(_LIVE):
        decoder.release()


dist.BEFORE_DESTROY.append(release_all)


def check_same_key(comm, key: tuple[int, int], device) -> None:
    """Raise RuntimeError unless every shard of the tp group `comm` is at the same (bucket, context
    bucket): a graph captured for different keys on different shards would pair mismatched collectives."""
    if comm.size == 1:
        return
    keys = [tuple(t.tolist()) for t in comm.all_gather(torch.tensor(key, dtype=torch.long, device=device))]
    if any(k != keys[0] for k in keys):
        raise RuntimeError(f"tp shards disagree on the decode step (batch bucket, context bucket): {keys}; "
                           f"the engines of a replica are out of lockstep")


class StaticDecoder:
    """Runs decode steps of one pipeline stage on static buffers, from CUDA graphs when use_graphs."""

    def __init__(self, model: StageModel, cache: KVCache, ctx, max_batch: int, max_positions: int,
                 micro_batches: int = 1, use_graphs: bool = True, chunks: int = 4):
        self.model, self.cache, self.ctx = model, cache, ctx
        self.chunks = max(1, min(chunks, len(model.layers)))
        self.micro_batches = micro_batches
        self.device = cache.data.device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.buckets = batch_buckets(max_batch)
        self.max_blocks = min(cache.num_blocks, cache.block_count(max_positions))
        self.capacity = self.max_blocks * cache.block_size
        n, dev, dtype = self.buckets[-1], self.device, cache.data.dtype
        pin = self.device.type == "cuda"
        host = lambda *shape, dtype: torch.zeros(*shape, dtype=dtype, pin_memory=pin)  # noqa: E731
        self.host = {"ids": host(n, dtype=torch.long), "positions": host(n, dtype=torch.long),
                     "slots": host(n, dtype=torch.long), "tables": host(n, self.max_blocks, dtype=torch.int32),
                     "lens": host(n, dtype=torch.int32)}
        self.np = {k: v.numpy() for k, v in self.host.items()}
        self.dev = {k: torch.zeros_like(v, device=dev) for k, v in self.host.items()}
        # Residual stream of the step (what a non-last stage sends); a non-first stage receives into
        # `inbox` and the step copies it over, so the warm-up run before a capture leaves its input intact.
        self.hidden = torch.zeros(n, model.spec.hidden, dtype=dtype, device=dev)
        self.inbox = None if model.first else torch.zeros_like(self.hidden)
        self.logits = torch.zeros(n, model.spec.vocab, dtype=dtype, device=dev) if model.last else None
        self.tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], list[torch.cuda.CUDAGraph]] = {}  # key -> graphs in replay order
        self.keys: list[tuple[int, int]] = []  # keys in first-use order (captures follow it): equal on every shard
        self.steps = 0  # decode steps run here
        self.pool = None
        _LIVE.add(self)

    def release(self) -> None:
        """Drop the captured graphs (NCCL frees no communicator that a live graph captured); a later
        step captures again, on every shard at the same step, so the captures still pair up."""
        if self.graphs and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no replay in flight while its graph goes
        self.graphs.clear()
        self.pool = None

    def set_graphs(self, on: bool) -> None:
        """Replay from CUDA graphs (on, GPU only) or run the same static step eagerly (off)."""
        self.use_graphs = bool(on) and self.device.type == "cuda"

    def bucket(self, n: int) -> int:
        """Smallest batch bucket holding n requests (ValueError past max_batch)."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"decode batch of {n} exceeds max_batch {self.buckets[-1]}")

    def context_bucket(self, longest: int) -> int:
        """Launch bound for contexts up to `longest`: the next power of two (>= 16), capped by the table width."""
        return min(self.capacity, max(16, 1 << (longest - 1).bit_length()))

    def run(self, work: list[Work]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step of `work` (one token each); returns (greedy tokens [n], logits [n, vocab]) on
        the device; logits None and tokens unset (the sampler broadcasts them) off the last stage."""
        n = len(work)
        size = self.bucket(n)
        self.steps += 1
        self._stage(work, size)
        key = (size, self.context_bucket(max(w.start + 1 for w in work)))
        if key not in self.keys:
            check_same_key(self.ctx.comm, key, self.device)
            self.keys.append(key)
        for name, buf in self.host.items():
            self.dev[name][:size].copy_(buf[:size], non_blocking=True)
        model, ctx, sends = self.model, self.ctx, []
        for i, (lo, hi) in enumerate(micro_rows(size, self.micro_batches)):
            if not model.first:
                ctx.recv_prev(self.inbox[lo:hi])
            self._run_rows(key, i, lo, hi)
            if not model.last:
                sends.append(ctx.send_next(self.hidden[lo:hi]))
        ctx.wait(sends)  # a stream dependency under NCCL: the next step's writes to `hidden` follow the sends
        return self.tokens[:n], None if self.logits is None else self.logits[:n]

    def _run_rows(self, key: tuple[int, int], i: int, lo: int, hi: int) -> None:
        """Micro-batch i (rows lo..hi-1) of the step: replayed from its graphs, captured on first use."""
        if not self.use_graphs:
            for part in self._parts(key, lo, hi):
                part()
            return
        graphs = self.graphs.setdefault(key, [])
        per = self._chunks_per_micro(key[0])
        if len(graphs) == i * per:  # first step with this key: capture micro-batch i now (its input is here)
            graphs += self._capture(self._parts(key, lo, hi))
        for graph in graphs[i * per:(i + 1) * per]:
            graph.replay()

    def _chunks_per_micro(self, size: int) -> int:
        """Graphs per micro-batch: the layer slices (micro-batches already overlap launch and run)."""
        return max(1, min(self.chunks, len(self.model.layers)) // len(micro_rows(size, self.micro_batches)))

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

    def _parts(self, key: tuple[int, int], lo: int, hi: int) -> list:
        """The static step on rows lo..hi-1 as consecutive callables: the stage's input (embeddings, or
        the received hidden states) and its first layers, ..., its last layers and, on the last stage,
        LM head and greedy argmax. Each becomes one graph: the GPU runs part i while the CPU still
        launches part i + 1, hiding most of the launch time."""
        d = {k: v[lo:hi] for k, v in self.dev.items()}
        batch = Batch(d["ids"], d["positions"], d["slots"], None, DecodeMeta(d["tables"], d["lens"], key[1]))
        model, n, h = self.model, len(self.model.layers), self.hidden[lo:hi]
        chunks = self._chunks_per_micro(key[0])
        bounds = [n * i // chunks for i in range(chunks + 1)]
        state = {}  # the pending layer output x lives across parts

        def part(i: int) -> None:
            if i == 0:  # (re)starts the step: the parts run twice per capture (warm-up, then captured)
                h.copy_(model.embed_tokens(batch.ids, batch.positions) if model.first else self.inbox[lo:hi])
                state["x"] = None
            state["x"] = model.run_layers(state["x"], h, batch, self.cache, bounds[i], bounds[i + 1])
            if i == chunks - 1:
                h.add_(state["x"])  # the residual stream leaving the stage
                if model.last:
                    logits = model.logits(h)
                    self.logits[lo:hi].copy_(logits)
                    torch.argmax(logits, dim=-1, out=self.tokens[lo:hi])

        return [lambda i=i: part(i) for i in range(chunks)]

    def _forward(self, size: int, max_len: int) -> None:
        """The static step of a one-stage replica on the staged inputs, eagerly (diagnostics)."""
        for lo, hi in micro_rows(size, self.micro_batches):
            for part in self._parts((size, max_len), lo, hi):
                part()

    def _capture(self, parts: list) -> list:
        """Graphs of `parts` (one micro-batch of a step whose inputs the buffers already hold).

        The warm-up run on a side stream performs the step for real: cuBLAS picks its kernels,
        allocations settle, and every collective inside has run once on its communicator (NCCL
        connections exist before capture). The replay that follows repeats it, rewriting the same K/V.
        """
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for part in parts:
                part()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graphs = []
        for part in parts:  # replayed in this order and never concurrently, so they may share one pool
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                part()
            graphs.append(graph)
        return graphs
