"""Process groups of a replica (tp group per stage, point-to-point between stages) and lost-peer detection.

Ranks come from MPI (mpirun: mpi4py ranks; rank 0 picks the rendezvous port and broadcasts it),
from torchrun-style RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, or the process runs alone.
Every collective has the timeout of init_world; when one fails, the worker asks the rendezvous
store which peers stopped heartbeating and raises PeerLostError naming them, instead of hanging.
Position (replica, stage, shard) of a world rank: rank = replica*pp*tp + stage*tp + shard.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from spotserve.engine.layers import LOCAL
from spotserve.engine.watch import PeerWatch

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# Called before the process groups are destroyed (graphs.py registers the release of decode graphs:
# NCCL >= 2.26 destroys or aborts no communicator while a CUDA graph that captured it is alive).
BEFORE_DESTROY: list = []
# torch >= 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def fresh_group_names() -> None:
    """Before forming a default process group: restart torch's per-process group numbering. Peers
    find each other under store keys named by that number, and torch resets it only when a default
    group is destroyed: an init that failed half-way (a peer died, the rendezvous timed out) leaves
    it one ahead, and every later group of this process would wait on keys no peer writes."""
    c10d = dist.distributed_c10d
    if not dist.is_initialized() and hasattr(c10d, "_world"):
        c10d._world.group_count = 0


class CollectiveError(RuntimeError):
    """A collective or point-to-point call failed (timeout or transport error)."""


class PeerLostError(CollectiveError):
    """A collective failed because peer processes are gone; `lost` lists their world ranks."""

    def __init__(self, message: str, lost: list[int]):
        super().__init__(message)
        self.lost = lost


@dataclass
class World:
    """This process's place in the job: rank, size, rendezvous store, heartbeat watch."""

    rank: int
    size: int
    timeout_s: float
    backend: str
    store: object = None
    watch: PeerWatch | None = None

    def close(self) -> None:
        """Leave the job cleanly (marks the exit so peers do not report this rank as lost)."""
        if self.watch is not None:
            self.watch.mark_exit("done")
        self.linger()
        if dist.is_initialized():
            for release in BEFORE_DESTROY:
                release()
            dist.destroy_process_group()

    def linger(self) -> None:
        """On rank 0 (the store host): wait until the other ranks exited or went silent, so their
        failure diagnosis can still reach the store. Other ranks return at once."""
        if self.rank == 0 and self.watch is not None:
            self.watch.wait_others(self.timeout_s)

    def failure(self, op: str, exc: BaseException, describe=None) -> CollectiveError:
        """The error to raise after `op` failed with `exc`: names the lost peers when some are gone."""
        describe = describe or (lambda r: f"rank {r}")
        lost = self.watch.lost_peers() if self.watch is not None else {}
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if lost:
            who = "; ".join(f"{describe(r)} ({why})" for r, why in sorted(lost.items()))
            err: CollectiveError = PeerLostError(f"rank {self.rank}: {op} failed: lost peer {who}; cause: {cause}",
                                                 sorted(lost))
        else:
            err = CollectiveError(f"rank {self.rank}: {op} failed with no peer lost "
                                  f"(timeout {self.timeout_s:g}s or transport error): {cause}")
        if self.watch is not None:
            self.watch.mark_exit("peer", str(err))
        return err

    def abort(self, reason: str) -> None:
        """This rank fails on its own (bad input, load error): tell peers why, then linger if rank 0."""
        if self.watch is not None:
            self.watch.mark_exit("error", reason)
        self.linger()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _rendezvous() -> tuple[int, int, str, int]:
    """(rank, size, master addr, master port) from MPI, torchrun-style env, or a lone process."""
    if any(k in os.environ for k in _MPI_ENV):
        import numpy as np
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        buf = np.zeros(258, dtype=np.uint8)  # [port hi, port lo, addr bytes...]; no pickled objects
        if rank == 0:
            addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = int(os.environ.get("MASTER_PORT", 0)) or _free_port(addr)
            raw = addr.encode()[:256]
            buf[0], buf[1] = port >> 8, port & 0xFF
            buf[2:2 + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        comm.Bcast(buf, root=0)
        port = (int(buf[0]) << 8) | int(buf[1])
        addr = bytes(buf[2:]).rstrip(b"\0").decode()
        return rank, size, addr, port
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            return (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"bad RANK/WORLD_SIZE/MASTER_PORT environment: {exc}") from None
    return 0, 1, "127.0.0.1", 0


def init_world(timeout_s: float = 60.0, backend: str | None = None, heartbeat_s: float = 0.25) -> World:
    """Join the job: rendezvous, default process group (gloo on CPU, NCCL on GPU), heartbeats.

    A lone process (no MPI, no RANK env) gets a World of size 1 and no process group.
    Raises ValueError on an inconsistent environment, CollectiveError when peers never show up.
    """
    rank, size, addr, port = _rendezvous()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if size == 1:
        return World(0, 1, timeout_s, backend)
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside world of size {size}")
    if addr in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        # One GPU per worker: the local rank picks it (mpirun and torchrun both export one).
        local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK"))
        torch.cuda.set_device(int(local) if local is not None else rank % torch.cuda.device_count())
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(addr, port, size, is_master=(rank == 0), timeout=timeout, wait_for_workers=True)
        fresh_group_names()
        dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=rank, world_size=size,
                                timeout=timeout)
    except Exception as exc:
        raise CollectiveError(f"rank {rank}: could not join the job at {addr}:{port} within {timeout_s:g}s: "
                              f"{exc}") from exc
    watch = PeerWatch(store, rank, size, heartbeat_s, call_limit_s=min(timeout_s, 10.0))
    return World(rank, size, timeout_s, backend, store, watch.start())


class TPComm:
    """Collectives of one stage's tensor-parallel group, with lost-peer diagnosis on failure."""

    def __init__(self, ctx: DistContext, group):
        self.ctx = ctx
        self.group = group
        self.size = ctx.tp
        self.rank = ctx.shard

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.ctx.guard("tp all_reduce", lambda: dist.all_reduce(t, group=self.group))
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every shard's `t` (same shape everywhere), in shard order: views of one gathered tensor.

        One collective into one buffer (no per-shard copies afterwards), so a CUDA graph captures
        a single NCCL kernel."""
        out = torch.empty(self.size * t.numel(), dtype=t.dtype, device=t.device)  # flat: gloo takes no stacked form
        self.ctx.guard("tp all_gather", lambda: _gather_into(out, t.contiguous().view(-1), group=self.group))
        return list(out.view(self.size, *t.shape).unbind(0))


class DistContext:
    """One worker's position (replica, stage, shard) in a dp x pp x tp layout, with its groups."""

    def __init__(self, world: World, dp: int, pp: int, tp: int, replica: int, stage: int, shard: int,
                 base: int = 0, tp_group=None, replica_group=None):
        self.world, self.dp, self.pp, self.tp = world, dp, pp, tp
        self.replica, self.stage, self.shard, self.base = replica, stage, shard, base
        self.replica_group = replica_group
        self.comm = TPComm(self, tp_group) if tp > 1 else LOCAL

    @classmethod
    def single(cls, timeout_s: float = 60.0) -> DistContext:
        """The context of a lone worker (pp = tp = 1, no communication)."""
        return cls(World(0, 1, timeout_s, "none"), 1, 1, 1, 0, 0, 0)

    # --- positions -------------------------------------------------------------------------
    def rank_of(self, stage: int, shard: int, replica: int | None = None) -> int:
        replica = self.replica if replica is None else replica
        return self.base + replica * self.pp * self.tp + stage * self.tp + shard

    def describe(self, rank: int) -> str:
        rel = rank - self.base
        if 0 <= rel < self.dp * self.pp * self.tp:
            rep, rest = divmod(rel, self.pp * self.tp)
            return f"rank {rank} (replica {rep}, stage {rest // self.tp}, shard {rest % self.tp})"
        return f"rank {rank}"

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def sampler_rank(self) -> int:
        """The worker whose sampled tokens are authoritative: shard 0 of the last stage."""
        return self.rank_of(self.pp - 1, 0)

    # --- communication ---------------------------------------------------------------------
    def guard(self, op: str, fn):
        """Run a communication call; on failure raise CollectiveError / PeerLostError naming lost peers."""
        try:
            return fn()
        except Exception as exc:
            raise self.world.failure(op, exc, self.describe) from exc

    def send_next(self, t: torch.Tensor):
        """Start sending activations to the same shard of the next stage; returns a handle for wait()."""
        dst = self.rank_of(self.stage + 1, self.shard)
        return self.guard(f"send to {self.describe(dst)}", lambda: dist.isend(t.contiguous(), dst))

    def recv_prev(self, t: torch.Tensor) -> torch.Tensor:
        """Receive activations from the same shard of the previous stage into `t`."""
        src = self.rank_of(self.stage - 1, self.shard)
        self.guard(f"recv from {self.describe(src)}", lambda: dist.recv(t, src))
        return t

    def wait(self, handles: list) -> None:
        for h in handles:
            self.guard("send completion", h.wait)

    def broadcast_replica(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Broadcast `t` from world rank `src` to every worker of this replica."""
        if self.pp * self.tp > 1:
            self.guard(f"broadcast from {self.describe(src)}", lambda: dist.broadcast(t, src, group=self.replica_group))
        return t


def make_contexts(world: World, dp: int, pp: int, tp: int, base: int = 0) -> DistContext | None:
    """Create the groups of a dp x pp x tp layout on world ranks base .. base+dp*pp*tp-1.

    Every rank of the world must call this (group creation is collective); ranks outside the
    layout get None. Raises ValueError when the layout does not fit the world.
    """
    n = dp * pp * tp
    if min(dp, pp, tp) < 1 or base < 0 or base + n > world.size:
        raise ValueError(f"layout dp={dp} pp={pp} tp={tp} at rank {base} does not fit a world of {world.size}")
    if world.size == 1:
        return DistContext(world, 1, 1, 1, 0, 0, 0)
    timeout = timedelta(seconds=world.timeout_s)
    mine = None
    for rep in range(dp):
        rep_base = base + rep * pp * tp
        rep_ranks = list(range(rep_base, rep_base + pp * tp))
        rep_group = dist.new_group(rep_ranks, timeout=timeout) if pp * tp > 1 else None
        for stage in range(pp):
            ranks = [rep_base + stage * tp + s for s in range(tp)]
            group = dist.new_group(ranks, timeout=timeout) if tp > 1 else None
            if world.rank in ranks:
                mine = DistContext(world, dp, pp, tp, rep, stage, ranks.index(world.rank), base, group, rep_group)
    return mine
