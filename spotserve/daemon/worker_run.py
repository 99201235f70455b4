"""One worker's execution of a prepared migration: staging copies, messages, local copies, unit arrival.

On CUDA the work runs on two streams of the executor, both first waiting for the caller's
stream: the network stream packs, posts (NCCL orders each round after its packs), waits and
unpacks; the local stream does keeps and checkpoint reads, so local copies never hold back a
round. The host never blocks while posting: a unit whose last piece is enqueued gets an event
on each stream, and it is reported (Progress.mark, on_arrival) once those events have completed,
checked between rounds and in order at the end. At the end the caller's stream waits for both.
"""
from __future__ import annotations

import contextlib
import time
from collections import Counter, deque

import torch
import torch.distributed as dist

from spotserve import ops
from spotserve.daemon.fallback import Piece, place_piece, read_pieces
from spotserve.daemon.layout import box_shape, unit_of
from spotserve.daemon.resolve import Move
from spotserve.daemon.schedule import Message, Round
from spotserve.engine.kv_reshard import RequestKV, assemble


def _contiguous_box(t: torch.Tensor, dim: int, length: int) -> bool:
    before = 1
    for d in range(dim):
        before *= t.shape[d]
    return t.is_contiguous() and (before == 1 or length == t.shape[dim])


class WorkerRun:
    """State of one MigrationExecutor.run() on one worker (ex: the executor, prep: its Prepared)."""

    def __init__(self, ex, prep, weights, kv, on_arrival, progress, stats, timer):
        self.ex, self.spec, self.me, self.new, self.old_bs = ex, ex.spec, ex.me, prep.new, prep.old_bs
        self.res, self.rounds = prep.resolution, prep.rounds
        # the copy op and point-to-point calls take dense tensors (sliced checkpoint reads may not be)
        self.weights = {n: t if t.is_contiguous() else t.contiguous() for n, t in weights.items()}
        self.kv_old, self.reqs = kv, {r.request_id: r for r in prep.requests}
        self.on_arrival, self.progress, self.stats, self.timer = on_arrival, progress, stats, timer
        self.streams = ex.streams()
        self.reader = None
        self.checked: set[str] = set()
        self.pending: deque = deque()  # (unit, events) enqueued, not yet reported
        self.old_w = prep.old.weight_ranges(self.spec, self.me) if prep.old is not None else {}
        self.old_kv = prep.old.kv_ranges(self.spec, self.me) if prep.old is not None else None
        self.new_ranges = prep.new.weight_ranges(self.spec, self.me)
        self.pos = prep.new.position(self.me)
        t = time.perf_counter()
        self.new_w, self.aliased = {}, set()
        for name, r in self.new_ranges.items():
            o = self.old_w.get(name)
            if o is not None and (o.start, o.end) == (r.start, r.end) and name in weights:
                self._check(name, self.weights[name], o)
                self.new_w[name] = self.weights[name]
                self.aliased.add(name)
            else:
                self.new_w[name] = self._tensor(prep, name, box_shape(self.spec, name, r.dim, r.end - r.start))
        self.stats.aliased = len(self.aliased)
        self.kv_new: dict[str, torch.Tensor] = {}
        self.units: Counter = Counter()
        self.layers_new = None
        if self.pos is not None:
            first = self.pos.stage == 0
            for name in self.new_ranges:
                self.units[unit_of(self.spec, name, first)] += 0
            rep, layers, heads = prep.new.kv_ranges(self.spec, self.me)
            self.layers_new = (layers, heads)
            for rid, shape in ex.kv_shapes(prep).items():
                # every element is written by a move (else the request is lost), so no zero fill
                self.kv_new[rid] = self._tensor(prep, f"kv/{rid}", shape)
                for layer in range(*layers):
                    self.units[("kv", layer)] += 0
        self.timer.add("alloc_s", t)

    def _tensor(self, prep, name: str, shape) -> torch.Tensor:
        t = prep.tensors.get(name)
        if t is not None and tuple(t.shape) == tuple(shape) and t.dtype == self.ex.dtype:
            return t
        return self.ex.alloc(name, tuple(shape), self.ex.dtype)

    def _aliased(self, m: Move) -> bool:
        return m.kind == "w" and m.src == m.dst and m.name in self.aliased

    def _check(self, name: str, t: torch.Tensor, r) -> None:
        if name in self.checked:
            return
        want = box_shape(self.spec, name, r.dim, r.end - r.start)
        if tuple(t.shape) != want or t.dtype != self.ex.dtype or t.device != self.ex.device:
            raise ValueError(f"{self.me}: weight {name!r} is {t.dtype}{list(t.shape)} on {t.device}, the old layout "
                             f"says {self.ex.dtype}{list(want)} on {self.ex.device}")
        self.checked.add(name)

    def _source(self, name: str) -> torch.Tensor:
        src = self.weights.get(name)
        if src is None:
            raise ValueError(f"{self.me}: the plan reads weight {name!r} here but it is missing from its weights")
        self._check(name, src, self.old_w[name])
        return src

    def _on(self, which: int):
        return torch.cuda.stream(self.streams[which]) if self.streams else contextlib.nullcontext()

    # --- progress --------------------------------------------------------------------------------
    def _landed(self, m: Move) -> None:
        for unit in m.units():
            self.units[unit] -= 1
            if self.units[unit] == 0:
                self._arrive(unit)

    def _arrive(self, unit) -> None:
        if self.streams is None:  # gloo waits and CPU copies are done when they return
            self._report(unit)
        else:
            self.pending.append((unit, [s.record_event() for s in self.streams]))

    def _report(self, unit) -> None:
        self.progress.mark(unit)
        if self.on_arrival is not None:
            self.on_arrival(unit)

    def _poll(self) -> None:
        while self.pending and all(e.query() for e in self.pending[0][1]):
            self._report(self.pending.popleft()[0])

    def _drain(self) -> None:
        while self.pending:
            unit, events = self.pending.popleft()
            for e in events:
                e.synchronize()
            self._report(unit)

    # --- main loop -------------------------------------------------------------------------------
    def execute(self) -> None:
        rounds, tm = self.rounds, self.timer
        for rnd in rounds:  # count the pieces (moves may be split across rounds) that land here
            for m in [m for msg in rnd.messages if msg.dst == self.me for m in msg.moves] + rnd.local:
                if m.dst == self.me and not self._aliased(m):
                    for unit in m.units():
                        self.units[unit] += 1
        for unit, n in sorted(self.units.items()):
            if n == 0:
                self._report(unit)
        caller = torch.cuda.current_stream(self.ex.device) if self.streams else None
        try:
            if caller is not None:
                for s in self.streams:
                    s.wait_stream(caller)  # inputs may still be written on the caller's stream
            with self._on(0):
                self._loop(rounds)
            tm.finish()
            t = time.perf_counter()
            self._drain()
            for s in self.streams or ():
                s.synchronize()
            tm.add("drain_s", t)
        finally:
            if caller is not None:
                for s in self.streams:
                    caller.wait_stream(s)
            if self.reader is not None:
                self.reader.close()
        self.stats.staging_bytes = sum(b.numel() for b in self.ex.buffers if b is not None)

    def _loop(self, rounds: list[Round]) -> None:
        t = time.perf_counter()
        self.ex.ensure_staging(self.ex.staging_of(rounds))
        self.timer.add("alloc_s", t)
        inflight: deque = deque()
        for k, rnd in enumerate(rounds):
            posted = self._post(rnd, k)
            if rnd.local:
                with self._on(1):
                    self._local(rnd.local, k)
            self.stats.rounds += posted is not None
            inflight.append(posted)  # a round without work here too: buffer k % depth is free again after k
            if len(inflight) == self.ex.depth:
                self._complete(inflight.popleft())
            t = time.perf_counter()
            self._poll()
            self.timer.add("arrive_s", t)
        while inflight:
            self._complete(inflight.popleft())

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
            t, r = self._source(m.name), self.old_w[m.name]
        else:
            t, r = self.new_w[m.name], self.new_ranges[m.name]
        if not _contiguous_box(t, m.dim, m.end - m.start):
            return None
        return t.narrow(m.dim, m.start - r.start, m.end - m.start)

    def _post(self, rnd: Round, k: int):
        mine = [(msg, msg.src == self.me) for msg in rnd.messages if self.me in (msg.src, msg.dst)]
        if not mine:
            return None
        tm = self.timer
        t = time.perf_counter()
        tm.mark(k, "pack_start")
        direct = [self._side_direct(msg, sending) for msg, sending in mine]
        need = sum(msg.nbytes for (msg, _), d in zip(mine, direct) if d is None)
        buf = self.ex.staging_buffer(k % self.ex.depth, need)
        ops_, recvs, pos, sent, got = [], [], 0, 0, 0
        for (msg, sending), tensor in zip(mine, direct):
            staged = tensor is None
            if staged:
                tensor = buf[pos:pos + msg.nbytes]
                pos += msg.nbytes
            payload = sum(m.nbytes for m in msg.moves)
            self.stats.direct_messages += not staged
            if sending:
                if staged:
                    for m, off in zip(msg.moves, msg.offsets):
                        self._pack(m, tensor[off:off + m.nbytes])
                ops_.append(dist.P2POp(dist.isend, tensor, self.ex.ranks[msg.dst], self.ex.group))
                sent += payload
                self.stats.messages_sent += 1
            else:
                ops_.append(dist.P2POp(dist.irecv, tensor, self.ex.ranks[msg.src], self.ex.group))
                recvs.append((msg, tensor if staged else None))
                got += payload
                self.stats.messages_received += 1
        self.stats.sent_bytes += sent
        self.stats.received_bytes += got
        tm.mark(k, "packed")
        t = tm.add("pack_s", t)
        works = dist.batch_isend_irecv(ops_)
        tm.add("post_s", t)
        tm.round(k, send_bytes=sent, recv_bytes=got, messages=len(mine), staged_bytes=need,
                 host_posted_ms=tm.now_ms())
        return k, works, recvs

    def _complete(self, posted) -> None:
        if posted is None:
            return
        k, works, recvs = posted
        tm = self.timer
        t = time.perf_counter()
        for w in works:
            w.wait()
        tm.mark(k, "done")
        t = tm.add("wait_s", t)
        for msg, staged in recvs:
            if staged is not None:
                for m, off in zip(msg.moves, msg.offsets):
                    self._unpack(m, staged[off:off + m.nbytes])
        tm.mark(k, "unpacked")
        t = tm.add("unpack_s", t)
        for msg, _ in recvs:
            for m in msg.moves:
                self._landed(m)
        tm.add("arrive_s", t)

    # --- copies ----------------------------------------------------------------------------------
    def _view(self, raw: torch.Tensor, shape) -> torch.Tensor:
        return raw.view(self.ex.dtype).view(shape)

    def _pack(self, m: Move, raw: torch.Tensor) -> None:
        if m.kind == "w":
            src = self._source(m.name)
            view = self._view(raw, box_shape(self.spec, m.name, m.dim, m.end - m.start))
            ops.reslice_copy(view, src, m.dim, m.start - self.old_w[m.name].start, 0, m.end - m.start)
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

    def _local(self, moves: list[Move], k: int) -> None:
        tm = self.timer
        t = time.perf_counter()
        tm.mark(k, "local_start", 1)
        done = []
        for m in moves:
            if m.dst != self.me or self._aliased(m):
                continue
            done.append(m)
            if m.src is None:
                self._read_checkpoint(m)
            elif m.kind == "w":
                r = self.new_ranges[m.name]
                ops.reslice_copy(self.new_w[m.name], self._source(m.name), m.dim, m.start - self.old_w[m.name].start,
                                 m.start - r.start, m.end - m.start)
                self.stats.local_bytes += m.nbytes
            else:
                box = self._kv_boxes(self.kv_new[m.name], (None, *self.layers_new), m)
                box.copy_(self._kv_boxes(self._old_piece(m.name).data, self.old_kv, m))
                self.stats.local_bytes += m.nbytes
        tm.mark(k, "local_end", 1)
        t = tm.add("local_s", t)
        for m in done:
            self._landed(m)
        tm.add("arrive_s", t)

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
