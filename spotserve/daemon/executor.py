"""Migration executor: run in every worker, it moves weight slices and KV blocks between workers as the plan says.

Every worker calls `MigrationExecutor.run` with the same (old layout, new layout, ordered planner
transfers, KV requests); each resolves them into the same exact moves (resolve.py) and rounds of
messages (schedule.py), then does its own part in plan order (worker_run.py): a move whose box
is dense in a tensor is sent from, or received into, that tensor directly; the rest is packed
into a staging buffer and unpacked with the `_C` re-slicing copy. Each round's sends and
receives are posted at once over torch.distributed point-to-point (gloo on CPU, NCCL on GPU;
batch_isend_irecv, so NCCL sees one group per round and pairs never deadlock); keeps and
checkpoint reads run beside the rounds (on CUDA on a second stream). `depth` rounds of at most
staging_bytes / depth staged bytes per worker are in flight at a time, so packing and unpacking
overlap the transfers and staging never exceeds `staging_bytes`. After each unit lands —
embeddings, a layer's weights, the head, a layer's KV of every continued request —
`on_arrival(unit)` runs and `Progress.wait(unit)` returns, so an engine can start a layer as
soon as it is complete. prepare() does the host work (and, asked to, the allocations) of a plan
ahead of the move; stats say where the move's time went (run_timing.py).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from spotserve.daemon.boxes import DenseSides
from spotserve.daemon.layout import KVRequest, Layout, box_shape
from spotserve.daemon.resolve import Resolution, resolve
from spotserve.daemon.run_timing import RunTimer
from spotserve.daemon.schedule import plan_rounds
from spotserve.daemon.worker_run import WorkerRun
from spotserve.engine.kv_reshard import RequestKV
from spotserve.models.spec import ModelSpec
from spotserve.planner.types import Transfer

Unit = tuple[str, int]


@dataclass
class MigrationStats:
    """What this worker did (bytes are payload bytes) and where its time went (host seconds)."""

    seconds: float = 0.0  # the move itself (allocations it had to make included: alloc_s)
    prepare_seconds: float = 0.0  # resolving the plan into moves and rounds (host only)
    sent_bytes: int = 0
    received_bytes: int = 0
    local_bytes: int = 0
    checkpoint_bytes: int = 0  # read from disk (CheckpointReader.bytes_read)
    messages_sent: int = 0
    messages_received: int = 0
    direct_messages: int = 0  # sent or received with no staging copy on this side
    rounds: int = 0  # rounds in which this worker had work
    staging_bytes: int = 0  # staging memory this worker holds
    aliased: int = 0  # tensors kept as they were (same shard before and after)
    alloc_s: float = 0.0  # new tensors and staging that prepare() had not made
    pack_s: float = 0.0
    post_s: float = 0.0
    wait_s: float = 0.0
    unpack_s: float = 0.0
    local_s: float = 0.0
    arrive_s: float = 0.0
    drain_s: float = 0.0
    prepared_alloc_seconds: float = 0.0  # allocations done by prepare(allocate=True), outside the move
    timing: dict | None = None  # run(profile=True): per-round timeline (run_timing.RunTimer.summary)


@dataclass
class Prepared:
    """A plan resolved for one worker (MigrationExecutor.prepare): reusable for the same layouts.
    With allocate=True it also holds the new tensors, handed to every run that uses it."""

    old: Layout | None
    new: Layout
    requests: list[KVRequest]
    resolution: Resolution
    rounds: list
    old_bs: int
    seconds: float
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    alloc_seconds: float = 0.0


@dataclass
class MigrationOutcome:
    weights: dict[str, torch.Tensor]  # this worker's new shards (HF name -> tensor); empty without a position
    kv: dict[str, RequestKV]  # request id -> this worker's KV piece for the new layout
    lost_kv: set[str]  # requests whose KV no live GPU held: re-prefill them
    stats: MigrationStats
    resolution: Resolution


class Progress:
    """Units that have landed on this worker; wait() blocks until one has (thread-safe)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._done: set[Unit] = set()
        self.order: list[Unit] = []
        self.error: BaseException | None = None

    def mark(self, unit: Unit) -> None:
        with self._cond:
            self._done.add(unit)
            self.order.append(unit)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self.error = exc
            self._cond.notify_all()

    def done(self, unit: Unit) -> bool:
        with self._cond:
            return unit in self._done

    def wait(self, unit: Unit, timeout: float | None = None) -> None:
        """Returns once `unit` landed; raises TimeoutError, or the migration's own error if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: unit in self._done or self.error is not None, timeout):
                raise TimeoutError(f"unit {unit} did not arrive within {timeout}s")
            if unit not in self._done:
                raise RuntimeError(f"migration failed before unit {unit} arrived") from self.error


class MigrationExecutor:
    """One worker's executor. `me` is this worker's GPU id, `ranks` maps GPU ids to torch.distributed
    ranks (of `group`, or the world). `checkpoint`: folder read for slices with no live source.
    `alloc(name, shape, dtype)` gives the new tensors: HF names for weight shards (a daemon-backed
    allocator keeps them across engine restarts), "kv/<request id>" for received KV pieces.
    solo_bytes: moves at least this large travel as their own message (no staging on a side where
    they are dense); round_bytes: what a worker sends, and receives, per round (one NCCL group);
    profile: record the per-round timeline of every run (run(profile=...) overrides)."""

    def __init__(self, spec: ModelSpec, me: str, ranks: dict[str, int], *, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", staging_bytes: int = 512 << 20, solo_bytes: int | None = None,
                 checkpoint: str | Path | None = None, group=None, depth: int = 4,
                 alloc: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                 round_bytes: int | None = None, profile: bool = False):
        if depth < 1 or staging_bytes < depth * 4096:
            raise ValueError(f"need depth >= 1 and staging_bytes >= depth * 4 KiB, got {depth}, {staging_bytes}")
        if me not in ranks:
            raise ValueError(f"this worker's GPU {me!r} has no rank in {sorted(ranks)}")
        self.spec, self.me, self.ranks, self.dtype = spec, me, dict(ranks), dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Tensors always carry an index; "cuda" must compare equal to the one they are on.
            self.device = torch.device("cuda", torch.cuda.current_device())
        gpu = self.device.type == "cuda"
        # CPU: a staging copy costs about as much as the transfer, so contiguous moves of 1 MiB go
        # alone. GPU: a copy runs at ~3 TB/s against NVLink's ~0.37, but each costs a launch and a
        # host call per move, and a dense move sent alone costs neither: 2 MiB and up go alone.
        if solo_bytes is None:
            solo_bytes = (2 << 20) if gpu else (1 << 20)
        # GPU: NCCL p2p runs 322 GB/s at 64 MiB and 372 at 1 GiB (2x H100), and fewer groups cost
        # less: rounds of 1 GiB moved KV at 82% of raw p2p against 75% with 256 MiB rounds, weights
        # at 77% either way (benchmarks/results/h100x2-executor.log). Direct messages use no staging,
        # so the round may exceed it. CPU: rounds as large as the staging limit.
        if round_bytes is None:
            round_bytes = max(1 << 30, staging_bytes // depth) if gpu else staging_bytes // depth
        if solo_bytes < 1 or round_bytes < 1:
            raise ValueError(f"solo_bytes and round_bytes must be positive, got {solo_bytes}, {round_bytes}")
        self.staging_bytes, self.solo_bytes, self.round_bytes = staging_bytes, solo_bytes, round_bytes
        self.checkpoint, self.group = checkpoint, group
        self.alloc = alloc or (lambda name, shape, dt: torch.empty(shape, dtype=dt, device=self.device))
        self.depth, self.profile = depth, profile
        self.buffers: list[torch.Tensor | None] = [None] * depth  # staging, kept for the next run
        self._streams = None

    def streams(self):
        """(network stream, local stream) on CUDA, made once; None on CPU."""
        if self.device.type != "cuda":
            return None
        if self._streams is None:
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._streams

    def start(self, *args, **kwargs) -> tuple[threading.Thread, Progress, dict]:
        """run() in a background thread; returns (thread, progress, box) where box["outcome"] or
        box["error"] is set when the thread ends. The caller must not use the process group meanwhile."""
        progress = kwargs.pop("progress", None) or Progress()
        box: dict = {}

        def target():
            try:
                box["outcome"] = self.run(*args, progress=progress, **kwargs)
            except BaseException as exc:  # surfaced to waiters and to the caller through box
                box["error"] = exc
                progress.fail(exc)

        thread = threading.Thread(target=target, name=f"migrate-{self.me}", daemon=True)
        thread.start()
        return thread, progress, box

    def prepare(self, old: Layout | None, new: Layout, transfers: list[Transfer], requests: list[KVRequest] = (),
                live=None, allocate: bool = False) -> Prepared:
        """Resolve the plan into exact moves and rounds: pure host work that depends on the layouts
        only, so a worker does it when the plan arrives, while it still serves, not inside the move.
        allocate: also make this worker's new tensors (those not kept as they are) and its staging
        now (Prepared.alloc_seconds), so the move does no cudaMalloc; they take memory from now on."""
        t0 = time.perf_counter()
        elem = torch.empty((), dtype=self.dtype).element_size()
        res = resolve(self.spec, old, new, transfers, requests, elem, live)
        old_bs = old.block_size if old is not None else new.block_size
        dense = DenseSides(self.spec, old, new, requests, old_bs)
        rounds = plan_rounds(res.moves, self.staging_bytes // self.depth, self.solo_bytes, old_bs, dense,
                             self.round_bytes)
        prep = Prepared(old, new, list(requests), res, rounds, old_bs, time.perf_counter() - t0)
        if allocate:
            t = time.perf_counter()
            self.ensure_staging(self.staging_of(rounds))
            old_w = old.weight_ranges(self.spec, self.me) if old is not None else {}
            for name, r in new.weight_ranges(self.spec, self.me).items():
                o = old_w.get(name)
                if o is None or (o.start, o.end) != (r.start, r.end):  # a kept shard is aliased, not copied
                    prep.tensors[name] = self.alloc(name, box_shape(self.spec, name, r.dim, r.end - r.start),
                                                    self.dtype)
            for rid, shape in self.kv_shapes(prep).items():
                prep.tensors[f"kv/{rid}"] = self.alloc(f"kv/{rid}", shape, self.dtype)
            prep.alloc_seconds = time.perf_counter() - t
        return prep

    def kv_shapes(self, prep: Prepared) -> dict[str, tuple[int, ...]]:
        """Request id -> shape of the KV piece this worker receives ([blocks, layers, 2, heads, old block, D])."""
        pos = prep.new.position(self.me)
        if pos is None:
            return {}
        rep, layers, heads = prep.new.kv_ranges(self.spec, self.me)
        out = {}
        for r in prep.requests:
            if r.new_replica == rep and r.request_id not in prep.resolution.lost_kv and r.num_tokens > 0:
                out[r.request_id] = (-(-r.num_tokens // prep.old_bs), layers[1] - layers[0], 2, heads[1] - heads[0],
                                     prep.old_bs, self.spec.head_dim)
        return out

    # --- staging -----------------------------------------------------------------------------------
    def staging_of(self, rounds: list) -> list[int]:
        """Staged bytes this worker needs per buffer (round k uses buffer k % depth), as scheduled."""
        need = [0] * self.depth
        for k, rnd in enumerate(rounds):
            n = sum(msg.nbytes for msg in rnd.messages if self.me in (msg.src, msg.dst) and msg.staged_on(self.me))
            need[k % self.depth] = max(need[k % self.depth], n)
        return need

    def ensure_staging(self, need: list[int]) -> None:
        for i, n in enumerate(need):
            self.staging_buffer(i, n)

    def staging_buffer(self, i: int, nbytes: int) -> torch.Tensor | None:
        """Staging buffer i with at least nbytes (grown when smaller; owned by the network stream)."""
        buf = self.buffers[i]
        if nbytes and (buf is None or buf.numel() < nbytes):
            streams = self.streams()
            with torch.cuda.stream(streams[0]) if streams else contextlib.nullcontext():
                self.buffers[i] = buf = None  # free the smaller one first
                buf = self.buffers[i] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return buf

    # --- the move ----------------------------------------------------------------------------------
    def run(self, old: Layout | None, new: Layout, transfers: list[Transfer], weights: dict[str, torch.Tensor],
            kv: dict[str, RequestKV] | None = None, requests: list[KVRequest] = (), live=None,
            on_arrival: Callable[[Unit], None] | None = None, progress: Progress | None = None,
            prepared: Prepared | None = None, profile: bool | None = None) -> MigrationOutcome:
        """Moves this worker's part of the migration from `old` to `new` in plan order.

        weights: this worker's old shards (HF name -> tensor) as held in `old`; kv: its KV pieces
        (Engine.export_request) of the requests in `requests`; live: old GPUs still holding their
        context (default all); prepared: the result of prepare() for the same arguments (else it is
        done here). Returns when every unit has landed on the device. stats.seconds counts the
        move only, stats.prepare_seconds the resolution, stats.*_s the host steps; profile (default:
        the executor's) adds stats.timing. Raises ValueError for inputs that disagree with the layouts.
        """
        if prepared is None:
            prepared = self.prepare(old, new, transfers, requests, live)
        t0 = time.perf_counter()
        stats = MigrationStats(prepare_seconds=prepared.seconds, prepared_alloc_seconds=prepared.alloc_seconds)
        timer = RunTimer(self.streams(), self.profile if profile is None else profile)
        run = WorkerRun(self, prepared, weights, kv or {}, on_arrival, progress or Progress(), stats, timer)
        run.execute()
        stats.seconds = time.perf_counter() - t0
        for key, value in timer.host.items():
            setattr(stats, key, value)
        if timer.detail:
            stats.timing = timer.summary()
        return MigrationOutcome(run.new_w, run.finish_kv(), prepared.resolution.lost_kv, stats, prepared.resolution)
