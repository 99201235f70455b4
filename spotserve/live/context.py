"""A worker slot's context in its daemon: weight shards in daemon buffers that outlive the worker.

With the engine setting "daemon" on, a worker keeps its weights in the context daemon of its slot
(started by the worker on its first configure, named by live/daemons.py) instead of its own
memory. Buffers are named by content, `w/<hf name>[/<dim>:<start>:<end>]` (daemon/store.py), so
a slice a new position keeps stays where it is; a record `ctx/<pp>.<tp>.<stage>.<shard>.<dtype>.<seq>`
names the layout whose buffers are complete. A migration allocates its new shards here (`alloc`),
seals them and writes the record once the move is done (`commit`), and drops what the new layout
no longer needs after the engine is up (`release_unused`). A worker process restarted on the same
slot (after a crash, its instance still alive) re-attaches the newest recorded layout (`restore`)
and reads nothing from the checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from spotserve.daemon.client import DaemonClient
from spotserve.daemon.launch import DaemonConfig, DaemonProcess
from spotserve.daemon.mapping import dtype_name
from spotserve.daemon.protocol import DaemonError
from spotserve.daemon.store import weight_buffer_name
from spotserve.models.sharding import shard_shape, shard_slice, stage_tensor_names
from spotserve.models.spec import ModelSpec

RECORD = "ctx/"
Layout4 = tuple[int, int, int, int]  # (pp, tp, stage, shard)


def buffer_names(spec: ModelSpec, layout: Layout4) -> dict[str, str]:
    """HF name -> daemon buffer name of every weight shard of `layout`."""
    pp, tp, stage, shard = layout
    return {n: weight_buffer_name(n, shard_slice(spec, n, tp, shard)) for n in stage_tensor_names(spec, pp, stage)}


def record_name(layout: Layout4, dtype: torch.dtype) -> str:
    """Name of the record that says `layout`'s shards of `dtype` are complete (seq: newest wins)."""
    return RECORD + ".".join(str(int(x)) for x in layout) + f".{dtype_name(dtype)}.{time.time_ns()}"


def _parse_record(name: str) -> tuple[int, Layout4, str] | None:
    parts = name[len(RECORD):].split(".")
    if not name.startswith(RECORD) or len(parts) != 6 or not all(p.isdigit() for p in parts[:4] + parts[5:]):
        return None
    return int(parts[5]), tuple(int(p) for p in parts[:4]), parts[4]


class SlotContext:
    """This worker's connection to its slot's daemon (`proc` set when this process started it)."""

    def __init__(self, name: str, directory: str | Path | None, client: DaemonClient,
                 proc: DaemonProcess | None = None):
        self.name, self.directory, self.client, self.proc = name, directory, client, proc
        self.fresh: list[str] = []  # allocated since begin(), sealed by commit()
        self.protect: set[str] = set()
        self.record: str | None = None  # the record of the layout held now

    @classmethod
    def connect(cls, name: str, directory: str | Path | None = None) -> SlotContext | None:
        """The running daemon `name`, or None when there is none (no token, no socket, no answer)."""
        try:
            client = DaemonClient.connect(name, directory, timeout=30.0)
        except DaemonError:
            return None
        try:
            client.stats()
        except DaemonError:
            client.close()
            return None
        return cls(name, directory, client)

    @classmethod
    def open(cls, name: str, directory: str | Path | None, device: str) -> SlotContext:
        """Connect to daemon `name`, starting it (on `device`: "cpu" or "cuda:N") when none runs.
        Raises RuntimeError when it cannot start."""
        ctx = cls.connect(name, directory)
        if ctx is not None:
            return ctx
        proc = DaemonProcess.start(DaemonConfig(name, device=device, run_dir=None if directory is None
                                                else str(directory)))
        return cls(name, directory, proc.client(), proc)

    @property
    def pid(self) -> int:
        return int(self.client.stats()["pid"])

    # --- a change of weights -------------------------------------------------------------------
    def begin(self, keep: set[str]) -> None:
        """Start a change of weights: the buffers in `keep` (the held shards that a migration reads or
        keeps) and the current record stay, everything else is released (nothing else is valid)."""
        keep = set(keep)
        if self.record is not None and keep:
            keep.add(self.record)
        else:
            self.record = None
        self.release_unused(keep)
        self.protect, self.fresh = keep, []

    def alloc(self, bname: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A new, unsealed buffer `bname` mapped as a tensor (ValueError for one a migration reads)."""
        if bname in self.protect:
            raise ValueError(f"daemon buffer {bname!r} holds weights still in use; it cannot be rewritten")
        info = self.client.allocate(bname, tuple(shape), dtype_name(dtype))
        if info.sealed:  # left by an earlier layout: rewritten now, so not complete until commit
            self.client.release(bname)
            info = self.client.allocate(bname, tuple(shape), dtype_name(dtype))
        self.fresh.append(bname)
        return self.client.attach(info)

    def commit(self, layout: Layout4 | None, dtype: torch.dtype) -> None:
        """Seal the buffers written since begin() and record `layout` (None: no position) as complete."""
        for b in self.fresh:
            self.client.seal(b)
        self.fresh, self.protect = [], set()
        if layout is None:
            self.record = None
            return
        rec = record_name(layout, dtype)
        self.client.allocate(rec, (1,), "uint8")
        self.client.seal(rec)
        self.record = rec

    def release_unused(self, keep: set[str]) -> int:
        """Release every buffer not in `keep` (nor the current record); returns the bytes freed."""
        freed = 0
        for b in self.client.list():
            if b.name not in keep and b.name != self.record:
                self.client.release(b.name)
                freed += b.nbytes
        return freed

    # --- a restarted worker --------------------------------------------------------------------
    def restore(self, spec: ModelSpec) -> tuple[dict[str, torch.Tensor], Layout4, int] | None:
        """(HF name -> tensor over the daemon, layout, bytes) of the newest complete layout held, or
        None when there is none (or a shard of it is missing, unsealed or of another shape)."""
        bufs = {b.name: b for b in self.client.list()}
        records = sorted((r, n) for n in bufs if bufs[n].sealed and (r := _parse_record(n)) is not None)
        if not records:
            return None
        (_, layout, dtype), rec = records[-1]
        weights, nbytes = {}, 0
        pp, tp, stage, shard = layout
        for name, bname in buffer_names(spec, layout).items():
            b = bufs.get(bname)
            if b is None or not b.sealed or b.dtype != dtype or b.shape != shard_shape(spec, name, tp, shard):
                return None
            weights[name] = self.client.attach(b)
            nbytes += b.nbytes
        self.record = rec
        return weights, layout, nbytes

    def stop(self) -> None:
        """Stop the daemon (its buffers are freed); the worker is leaving for good."""
        try:
            if self.proc is not None:
                self.client.close()
                self.proc.stop()
            else:
                self.client.shutdown()
                self.client.close()
        except (DaemonError, OSError):
            pass


# --- a worker's side (live/worker.py's Worker: spec, layout, weights, daemon fields) ------------------
def held_buffers(w) -> set[str]:
    """Daemon buffers of the shards worker `w` holds (none without weights)."""
    return set(buffer_names(w.spec, w.layout).values()) if w.layout is not None and w.weights is not None else set()


def restore_context(w) -> None:
    """At a worker's start: find the daemon a previous process of its slot left and re-attach the
    newest complete layout it holds (no checkpoint read); nothing when there is none."""
    w.daemon = SlotContext.connect(w.daemon_name, w.daemon_dir)
    found = w.daemon.restore(w.spec) if w.daemon is not None else None
    if found is not None:
        w.weights, w.layout, w.attached_bytes = found
        w.device = str(next(iter(w.weights.values())).device)


def attach_layout(w, layout: Layout4, dtype: str) -> tuple[dict[str, torch.Tensor], int]:
    """Weights of `layout` for worker `w` over daemon buffers (a configure without a migration):
    sealed ones re-attached, the rest read from the checkpoint into new buffers, then recorded.
    Returns (HF name -> tensor, checkpoint bytes read)."""
    from spotserve.daemon.store import attach_shard
    from spotserve.models.loader import TORCH_DTYPES

    pp, tp, stage, shard = layout
    weights, _, read = attach_shard(w.daemon.client, w.model_dir, pp, stage, tp, shard, dtype=TORCH_DTYPES[dtype])
    w.daemon.commit(layout, TORCH_DTYPES[dtype])
    return weights, read
