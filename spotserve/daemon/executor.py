"""Migration executor: run in every worker, it moves weight slices and KV blocks between workers as the plan says.

Every worker calls `MigrationExecutor.run` with the same (old layout, new layout, ordered planner
transfers, KV requests); each resolves them into the same exact moves (resolve.py) and rounds of
messages (schedule.py), then does its own part in plan order: packs what it sends into a staging
buffer (or sends a contiguous slice straight from its tensor), posts the round's sends and
receives at once over torch.distributed point-to-point (gloo on CPU, NCCL on GPU;
batch_isend_irecv, so NCCL sees one group per round and pairs never deadlock), copies what it
keeps and reads what no live GPU holds from the checkpoint while the round is in flight, then
unpacks what it received with the `_C` re-slicing copy. `depth` rounds of at most
staging_bytes / depth bytes per worker are in flight at a time, so packing and unpacking overlap
the transfers and staging never exceeds `staging_bytes`. After each unit lands — embeddings,
a layer's weights, the head, a layer's KV of every continued request — `on_arrival(unit)` runs
and `Progress.wait(unit)` returns, so an engine can start a layer as soon as it is complete.
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from spotserve import ops
from spotserve.daemon.fallback import Piece, place_piece, read_pieces
from spotserve.daemon.layout import KVRequest, Layout, box_shape, unit_of
from spotserve.daemon.resolve import Move, Resolution, resolve
from spotserve.daemon.schedule import Message, Round, plan_rounds
from spotserve.engine.kv_reshard import RequestKV, assemble
from spotserve.models.spec import ModelSpec
from spotserve.planner.types import Transfer

Unit = tuple[str, int]


@dataclass
class MigrationStats:
    """What this worker did (bytes are payload bytes)."""

    seconds: float = 0.0  # the move itself
    prepare_seconds: float = 0.0  # resolving the plan into moves and rounds (host only)
    sent_bytes: int = 0
    received_bytes: int = 0
    local_bytes: int = 0
    checkpoint_bytes: int = 0  # read from disk (CheckpointReader.bytes_read)
    messages_sent: int = 0
    messages_received: int = 0
    direct_messages: int = 0  # sent or received with no staging copy on this side
    rounds: int = 0  # rounds in which this worker had work
    staging_bytes: int = 0  # staging memory this worker allocated
    aliased: int = 0  # tensors kept as they were (same shard before and after)


@dataclass
class Prepared:
    """A plan resolved for one worker (MigrationExecutor.prepare): reusable for the same layouts."""

    old: Layout | None
    new: Layout
    requests: list[KVRequest]
    resolution: Resolution
    rounds: list
    old_bs: int
    seconds: float


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
    allocator keeps them across engine restarts), "kv/<request id>" for received KV pieces."""

    def __init__(self, spec: ModelSpec, me: str, ranks: dict[str, int], *, dtype: torch.dtype = torch.float16,
                 device: str | torch.device = "cpu", staging_bytes: int = 512 << 20, solo_bytes: int | None = None,
                 checkpoint: str | Path | None = None, group=None, depth: int = 4,
                 alloc: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor] | None = None):
        if depth < 1 or staging_bytes < depth * 4096:
            raise ValueError(f"need depth >= 1 and staging_bytes >= depth * 4 KiB, got {depth}, {staging_bytes}")
        if me not in ranks:
            raise ValueError(f"this worker's GPU {me!r} has no rank in {sorted(ranks)}")
        self.spec, self.me, self.ranks, self.dtype = spec, me, dict(ranks), dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Tensors always carry an index; "cuda" must compare equal to the one they are on.
            self.device = torch.device("cuda", torch.cuda.current_device())
        # CPU: a staging copy costs about as much as the transfer, so contiguous moves of 1 MiB go
        # alone; GPU: copies are ~10x faster than NVLink and large messages much faster than small.
        if solo_bytes is None:
            solo_bytes = (1 << 20) if self.device.type == "cpu" else (256 << 20)
        self.staging_bytes, self.solo_bytes = staging_bytes, solo_bytes
        self.checkpoint, self.group = checkpoint, group
        self.alloc = alloc or (lambda name, shape, dt: torch.empty(shape, dtype=dt, device=self.device))
        self.depth = depth
        self.buffers: list[torch.Tensor | None] = [None] * depth  # staging, kept for the next run

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
                live=None) -> "Prepared":
        """Resolve the plan into exact moves and rounds: pure host work that depends on the layouts
        only, so a worker does it when the plan arrives, while it still serves, not inside the move."""
        t0 = time.perf_counter()
        elem = torch.empty((), dtype=self.dtype).element_size()
        res = resolve(self.spec, old, new, transfers, requests, elem, live)
        old_bs = old.block_size if old is not None else new.block_size
        rounds = plan_rounds(res.moves, self.staging_bytes // self.depth, self.solo_bytes, old_bs)
        return Prepared(old, new, list(requests), res, rounds, old_bs, time.perf_counter() - t0)

    def run(self, old: Layout | None, new: Layout, transfers: list[Transfer], weights: dict[str, torch.Tensor],
            kv: dict[str, RequestKV] | None = None, requests: list[KVRequest] = (), live=None,
            on_arrival: Callable[[Unit], None] | None = None, progress: Progress | None = None,
            prepared: "Prepared | None" = None) -> MigrationOutcome:
        """Moves this worker's part of the migration from `old` to `new` in plan order.

        weights: this worker's old shards (HF name -> tensor) as held in `old`; kv: its KV pieces
        (Engine.export_request) of the requests in `requests`; live: old GPUs still holding their
        context (default all); prepared: the result of prepare() for the same arguments (else it is
        done here). stats.seconds counts the move only, stats.prepare_seconds the resolution.
        Raises ValueError for inputs that disagree with the layouts.
        """
        if prepared is None:
            prepared = self.prepare(old, new, transfers, requests, live)
        t0 = time.perf_counter()
        run = _Run(self, prepared.old, prepared.new, prepared.resolution, weights, kv or {},
                   {r.request_id: r for r in prepared.requests}, prepared.old_bs, on_arrival, progress or Progress())
        run.execute(prepared.rounds)
        run.stats.seconds = time.perf_counter() - t0
        run.stats.prepare_seconds = prepared.seconds
        return MigrationOutcome(run.new_w, run.finish_kv(), prepared.resolution.lost_kv, run.stats,
                                prepared.resolution)


def _contiguous_box(t: torch.Tensor, dim: int, length: int) -> bool:
    before = 1
    for d in range(dim):
        before *= t.shape[d]
    return t.is_contiguous() and (before == 1 or length == t.shape[dim])


class _Run:
    """State of one run() on one worker."""

    def __init__(self, ex: MigrationExecutor, old: Layout | None, new: Layout, res: Resolution, weights, kv, reqs,
                 old_bs: int, on_arrival, progress: Progress):
        self.ex, self.spec, self.me, self.new, self.old_bs = ex, ex.spec, ex.me, new, old_bs
        # the copy op and point-to-point calls take dense tensors (sliced checkpoint reads may not be)
        self.weights = {n: t if t.is_contiguous() else t.contiguous() for n, t in weights.items()}
        self.kv_old, self.reqs = kv, reqs
        self.on_arrival, self.progress = on_arrival, progress
        self.stats = MigrationStats()
        self.reader = None
        self.old_w = old.weight_ranges(self.spec, self.me) if old is not None else {}
        self.old_kv = old.kv_ranges(self.spec, self.me) if old is not None else None
        self.new_w = {}
        self.aliased: set[str] = set()
        pos = new.position(self.me)
        self.pos = pos
        for name, r in new.weight_ranges(self.spec, self.me).items():
            o = self.old_w.get(name)
            if o is not None and (o.start, o.end) == (r.start, r.end) and name in weights:
                self._check(name, self.weights[name], o)
                self.new_w[name] = self.weights[name]
                self.aliased.add(name)
            else:
                self.new_w[name] = ex.alloc(name, box_shape(self.spec, name, r.dim, r.end - r.start), ex.dtype)
        self.stats.aliased = len(self.aliased)
        self.new_ranges = new.weight_ranges(self.spec, self.me)
        self.kv_new: dict[str, torch.Tensor] = {}
        self.units: Counter = Counter()
        if pos is not None:
            first = pos.stage == 0
            for name in self.new_ranges:
                self.units[unit_of(self.spec, name, first)] += 0
            rep, layers, heads = new.kv_ranges(self.spec, self.me)
            for r in reqs.values():
                if r.new_replica == rep and r.request_id not in res.lost_kv and r.num_tokens > 0:
                    nb = -(-r.num_tokens // old_bs)
                    # every element is written by a move (else the request is lost), so no zero fill
                    self.kv_new[r.request_id] = ex.alloc(f"kv/{r.request_id}", (
                        nb, layers[1] - layers[0], 2, heads[1] - heads[0], old_bs, self.spec.head_dim), ex.dtype)
                    for layer in range(*layers):
                        self.units[("kv", layer)] += 0
        self.layers_new = new.kv_ranges(self.spec, self.me)[1:] if pos is not None else None

    def _aliased(self, m: Move) -> bool:
        return m.kind == "w" and m.src == m.dst and m.name in self.aliased

    def _check(self, name: str, t: torch.Tensor, r) -> None:
        want = box_shape(self.spec, name, r.dim, r.end - r.start)
        if tuple(t.shape) != want or t.dtype != self.ex.dtype or t.device != self.ex.device:
            raise ValueError(f"{self.me}: weight {name!r} is {t.dtype}{list(t.shape)} on {t.device}, the old layout "
                             f"says {self.ex.dtype}{list(want)} on {self.ex.device}")

    # --- progress --------------------------------------------------------------------------------
    def _landed(self, m: Move) -> None:
        for unit in m.units():
            self.units[unit] -= 1
            if self.units[unit] == 0:
                self._arrive(unit)

    def _arrive(self, unit: Unit) -> None:
        if self.ex.device.type == "cuda":
            torch.cuda.current_stream(self.ex.device).synchronize()  # visible to other streams and the host
        self.progress.mark(unit)
        if self.on_arrival is not None:
            self.on_arrival(unit)

    # --- main loop -------------------------------------------------------------------------------
    def execute(self, rounds: list[Round]) -> None:
        for rnd in rounds:  # count the pieces (moves may be split across rounds) that land here
            for m in [m for msg in rnd.messages if msg.dst == self.me for m in msg.moves] + rnd.local:
                if m.dst == self.me and not self._aliased(m):
                    for unit in m.units():
                        self.units[unit] += 1
        for unit, n in sorted(self.units.items()):
            if n == 0:
                self._arrive(unit)
        buffers = self.ex.buffers
        inflight: deque = deque()
        for k, rnd in enumerate(rounds):
            posted = self._post(rnd, buffers, k % self.ex.depth)
            self._local(rnd.local)
            if posted[0] or posted[1]:
                self.stats.rounds += 1
            inflight.append(posted)
            if len(inflight) == self.ex.depth:
                self._complete(*inflight.popleft())
        while inflight:
            self._complete(*inflight.popleft())
        if self.reader is not None:
            self.reader.close()

    def _side_direct(self, msg: Message, sending: bool) -> torch.Tensor | None:
        """The tensor view a solo message can use with no staging on this side, else None."""
        m = msg.moves[0]
        if not msg.solo:
            return None
        if m.kind == "kv":
            if sending:
                box = self._kv_boxes(self._old_piece(m.name).data, self.old_kv, m)
            else:
                box = self._kv_boxes(self.kv_new[m.name], (None, *self.layers_new), m)
            return box.view(torch.uint8).view(-1) if box.is_contiguous() else None
        if sending:
            t, r = self.weights[m.name], self.old_w[m.name]
        else:
            t, r = self.new_w[m.name], self.new_ranges[m.name]
        if not _contiguous_box(t, m.dim, m.end - m.start):
            return None
        return t.narrow(m.dim, m.start - r.start, m.end - m.start)

    def _post(self, rnd: Round, buffers: list, parity: int):
        mine = [(msg, msg.src == self.me) for msg in rnd.messages if self.me in (msg.src, msg.dst)]
        if not mine:
            return [], []
        direct = {id(msg): self._side_direct(msg, sending) for msg, sending in mine}
        need = sum(msg.nbytes for msg, _ in mine if direct[id(msg)] is None)
        buf = buffers[parity]
        if need and (buf is None or buf.numel() < need):
            buf = buffers[parity] = torch.empty(need, dtype=torch.uint8, device=self.ex.device)
            self.stats.staging_bytes = sum(b.numel() for b in buffers if b is not None)
        ops_, recvs, pos = [], [], 0
        for msg, sending in mine:
            tensor = direct[id(msg)]
            if tensor is None:
                tensor = buf[pos:pos + msg.nbytes]
                pos += msg.nbytes
            payload = sum(m.nbytes for m in msg.moves)
            self.stats.direct_messages += direct[id(msg)] is not None
            if sending:
                if direct[id(msg)] is None:
                    for m, off in zip(msg.moves, msg.offsets):
                        self._pack(m, tensor[off:off + m.nbytes])
                ops_.append(dist.P2POp(dist.isend, tensor, self.ex.ranks[msg.dst], self.ex.group))
                self.stats.sent_bytes += payload
                self.stats.messages_sent += 1
            else:
                ops_.append(dist.P2POp(dist.irecv, tensor, self.ex.ranks[msg.src], self.ex.group))
                recvs.append((msg, tensor if direct[id(msg)] is None else None))
                self.stats.received_bytes += payload
                self.stats.messages_received += 1
        return dist.batch_isend_irecv(ops_), recvs

    def _complete(self, works, recvs) -> None:
        for w in works:
            w.wait()
        for msg, staged in recvs:
            for m, off in zip(msg.moves, msg.offsets):
                if staged is not None:
                    self._unpack(m, staged[off:off + m.nbytes])
                self._landed(m)

    # --- copies ----------------------------------------------------------------------------------
    def _view(self, raw: torch.Tensor, shape) -> torch.Tensor:
        return raw.view(self.ex.dtype).view(shape)

    def _pack(self, m: Move, raw: torch.Tensor) -> None:
        if m.kind == "w":
            src = self.weights.get(m.name)
            if src is None:
                raise ValueError(f"{self.me}: the plan sends weight {m.name!r} from here but it is not among its weights")
            o = self.old_w[m.name]
            self._check(m.name, src, o)
            view = self._view(raw, box_shape(self.spec, m.name, m.dim, m.end - m.start))
            ops.reslice_copy(view, src, m.dim, m.start - o.start, 0, m.end - m.start)
            return
        box = self._kv_boxes(self._old_piece(m.name).data, self.old_kv, m)
        self._view(raw, box.shape).copy_(box)

    def _unpack(self, m: Move, raw: torch.Tensor) -> None:
        if m.kind == "w":
            r = self.new_ranges[m.name]
            view = self._view(raw, box_shape(self.spec, m.name, m.dim, m.end - m.start))
            ops.reslice_copy(self.new_w[m.name], view, m.dim, 0, m.start - r.start, m.end - m.start)
            return
        box = self._kv_boxes(self.kv_new[m.name], (None, *self.layers_new), m)
        box.copy_(self._view(raw, box.shape))

    def _local(self, moves: list[Move]) -> None:
        for m in moves:
            if m.dst != self.me or self._aliased(m):
                continue
            if m.src is None:
                self._read_checkpoint(m)
                continue
            if m.kind == "w":
                o, r = self.old_w[m.name], self.new_ranges[m.name]
                src = self.weights.get(m.name)
                if src is None:
                    raise ValueError(f"{self.me}: weight {m.name!r} of its old position is missing from its weights")
                self._check(m.name, src, o)
                ops.reslice_copy(self.new_w[m.name], src, m.dim, m.start - o.start, m.start - r.start, m.end - m.start)
            else:
                box = self._kv_boxes(self.kv_new[m.name], (None, *self.layers_new), m)
                box.copy_(self._kv_boxes(self._old_piece(m.name).data, self.old_kv, m))
            self.stats.local_bytes += m.nbytes
            self._landed(m)

    def _read_checkpoint(self, m: Move) -> None:
        if self.ex.checkpoint is None:
            raise ValueError(f"{self.me}: {m.name} [{m.start}, {m.end}) has no live source and no checkpoint was given")
        if self.reader is None:
            from spotserve.models.loader import CheckpointReader

            self.reader = CheckpointReader(self.ex.checkpoint)
        piece = Piece(m.name, None if m.replicated else m.dim, m.start, m.end)
        before = self.reader.bytes_read
        ((_, data),) = read_pieces(self.reader, [piece])
        pp, tp = self.new.shape(self.pos.replica)
        place_piece(self.spec, self.new_w[m.name], m.name, tp, self.pos.shard, piece, data.to(self.ex.device))
        self.stats.checkpoint_bytes += self.reader.bytes_read - before
        self._landed(m)

    # --- KV --------------------------------------------------------------------------------------
    def _old_piece(self, rid: str) -> RequestKV:
        p = self.kv_old.get(rid)
        if p is None:
            raise ValueError(f"{self.me}: the plan reads KV of request {rid!r} here but no piece was given")
        _, layers, heads = self.old_kv
        want = self.reqs[rid].num_tokens
        if (tuple(p.layers), tuple(p.heads), p.block_size, p.num_tokens) != (layers, heads, self.old_bs, want):
            raise ValueError(f"{self.me}: KV piece of {rid} holds layers {p.layers} heads {p.heads} block size "
                             f"{p.block_size} for {p.num_tokens} tokens; the old layout says {layers} {heads} "
                             f"{self.old_bs} and the request {want} tokens")
        if p.data.dtype != self.ex.dtype or p.data.device != self.ex.device:
            raise ValueError(f"{self.me}: KV piece of {rid} is {p.data.dtype} on {p.data.device}")
        return p

    def _kv_boxes(self, data: torch.Tensor, held, m: Move) -> torch.Tensor:
        """The view of `data` ([blocks, layers, 2, heads, block, D]) holding m's heads at its layers
        for the whole blocks of positions [t0, t1)."""
        _, layers, heads = held
        bs = self.old_bs
        return data[m.t0 // bs:-(-m.t1 // bs), m.layer - layers[0]:m.layer_end - layers[0], :,
                    m.start - heads[0]:m.end - heads[0]]

    def finish_kv(self) -> dict[str, RequestKV]:
        if self.pos is None:
            return {}
        pp, tp = self.new.shape(self.pos.replica)
        layers, heads = self.layers_new
        out = {}
        for rid, data in self.kv_new.items():
            piece = RequestKV(rid, self.reqs[rid].num_tokens, self.old_bs, layers, heads, data)
            if self.new.block_size != self.old_bs:
                piece = assemble([piece], self.spec, pp, tp, self.pos.stage, self.pos.shard,
                                 block_size=self.new.block_size)
            out[rid] = piece
        return out
