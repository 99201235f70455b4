"""Glue between the live cluster and the migration executor: plans as plain messages, groups, devices.

The controller describes a migration to every participating worker in one plain map (msgpack
lists and ints only): the old and new layouts of the replicas that change, the planner's
transfers, the requests whose KV moves, the old GPUs still alive and a rank per participant.
Each worker turns it back into Layout / Transfer / KVRequest objects (`parse_migration`), drops
the transfers its layouts cannot honour (`usable_transfers`: every worker drops the same ones, so
all still agree on the moves) and runs MigrationExecutor over a process group of the
participants (`join_group`). Torch is imported only inside the functions that need it, so the
controller can build messages without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from spotserve.daemon.layout import KVRequest, Layout
from spotserve.models.sharding import stage_layers
from spotserve.models.spec import ModelSpec
from spotserve.planner.types import Position, Transfer


# --- messages --------------------------------------------------------------------------------
def layout_msg(layout: Layout | None) -> dict | None:
    """A Layout as a plain map (None stays None)."""
    if layout is None:
        return None
    return {"shapes": [[int(r), int(pp), int(tp)] for r, (pp, tp) in sorted(layout.shapes.items())],
            "placement": [[p.replica, p.stage, p.shard, g] for p, g in sorted(layout.placement.items())],
            "block_size": int(layout.block_size)}


def layout_of(msg: dict | None) -> Layout | None:
    """Inverse of layout_msg; ValueError on a malformed map."""
    if msg is None:
        return None
    try:
        shapes = {int(r): (int(pp), int(tp)) for r, pp, tp in msg["shapes"]}
        placement = {Position(int(r), int(s), int(k)): str(g) for r, s, k, g in msg["placement"]}
        return Layout(shapes, placement, int(msg["block_size"]))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"migration layout: malformed map ({exc})") from None


def transfer_msg(t: Transfer) -> list:
    return [t.src, t.dst, t.tensor, t.layer, list(t.slice) if t.slice else None, int(t.nbytes), t.request,
            [list(e) for e in t.elems] if t.elems is not None else None]


def transfer_of(row: list) -> Transfer:
    src, dst, tensor, layer, sl, nbytes, request, elems = row
    return Transfer(src, dst, tensor, layer, tuple(sl) if sl else None, int(nbytes), request,
                    tuple(tuple(e) for e in elems) if elems is not None else None)


def runs_layout(runs, block_size: int) -> Layout:
    """The Layout of the backend's replicas `runs` (objects with index, shape (a ParallelConfig) and
    slots in rank order stage * tp + shard)."""
    shapes, placement = {}, {}
    for rt in runs:
        pp, tp = rt.shape.pp, rt.shape.tp
        shapes[rt.index] = (pp, tp)
        for rank, slot in enumerate(rt.slots):
            placement[Position(rt.index, rank // tp, rank % tp)] = slot
    return Layout(shapes, placement, block_size)


def migration_msg(old: Layout | None, new: Layout, transfers: list[Transfer], requests: list[KVRequest],
                  live: list[str], ranks: dict[str, int]) -> dict:
    """The map every participant of one migration receives (same map for all of them)."""
    return {"old": layout_msg(old), "new": layout_msg(new), "transfers": [transfer_msg(t) for t in transfers],
            "requests": [[r.request_id, r.old_replica, r.new_replica, r.num_tokens] for r in requests],
            "live": sorted(live), "ranks": {g: int(k) for g, k in sorted(ranks.items())}}


@dataclass
class Migration:
    """A migration as one worker sees it (parse_migration)."""

    old: Layout | None
    new: Layout
    transfers: list[Transfer]
    requests: list[KVRequest]
    live: set[str]
    ranks: dict[str, int]


def parse_migration(msg: dict) -> Migration:
    """Objects of a migration map; ValueError on a malformed one."""
    try:
        new = layout_of(msg["new"])
        if new is None:
            raise ValueError("migration: the new layout is missing")
        return Migration(layout_of(msg.get("old")), new, [transfer_of(t) for t in msg["transfers"]],
                         [KVRequest(str(r), int(o), int(n), int(k)) for r, o, n, k in msg["requests"]],
                         set(msg["live"]), {str(g): int(k) for g, k in msg["ranks"].items()})
    except (KeyError, TypeError) as exc:
        raise ValueError(f"migration: malformed map ({exc})") from None


def usable_transfers(spec: ModelSpec, m: Migration) -> list[Transfer]:
    """The planner's transfers the two layouts can honour: a destination of the new layout, a source
    of the old one (or the disk), and for KV a request this migration moves to that destination's
    replica and layers. resolve() fills whatever the dropped ones covered from live holders or the
    checkpoint. Without an old layout everything comes from the checkpoint: only disk reads remain."""
    old_gpus = set(m.old.gpus()) if m.old is not None else set()
    reqs = {r.request_id: r for r in m.requests}
    out = []
    for t in m.transfers:
        pos = m.new.position(t.dst)
        if pos is None or (t.src is not None and t.src not in old_gpus):
            continue
        if t.tensor == "kv":
            r = reqs.get(t.request)
            pp, _ = m.new.shape(pos.replica)
            layers = stage_layers(spec.num_layers, pp, pos.stage)
            if r is None or r.new_replica != pos.replica or r.num_tokens == 0 or t.layer not in layers:
                continue
        out.append(t)
    return out


def network_gpus(resolution) -> list[str]:
    """GPUs that send or receive at least one message in a resolved migration (sorted)."""
    return sorted({g for mv in resolution.moves if mv.src is not None and mv.src != mv.dst for g in (mv.src, mv.dst)})


# --- process groups and devices ----------------------------------------------------------------
def join_group(host: str, port: int, prefix: str, rank: int, world: int, backend: str, timeout_s: float):
    """Make this process rank `rank` of a fresh default process group of `world` ranks, formed over
    the controller's TCPStore under key prefix `prefix`. Returns the prefixed store."""
    import torch.distributed as dist

    from spotserve.engine.dist import fresh_group_names

    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = timedelta(seconds=timeout_s)
    base = dist.TCPStore(host, port, is_master=False, timeout=timeout)
    store = dist.PrefixStore(prefix, base)
    fresh_group_names()  # a failed join before this one must not shift this group's store keys
    dist.init_process_group(backend, store=dist.PrefixStore("pg/", store), rank=rank, world_size=world,
                            timeout=timeout)
    if backend == "nccl":
        import torch

        # NCCL: the first call on a group must involve every rank (batch_isend_irecv rounds need not),
        # so one tiny all-reduce sets the communicator up on the current device
        dist.all_reduce(torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device())))
    return store


def leave_group() -> None:
    """Destroy the default process group, if any."""
    import torch.distributed as dist

    from spotserve.engine.dist import BEFORE_DESTROY

    if dist.is_initialized():
        for release in BEFORE_DESTROY:  # NCCL waits forever to destroy a communicator a live CUDA graph captured
            release()
        dist.destroy_process_group()


def device_of(slot: str, cfg: dict) -> str:
    """The torch device of worker `slot` ("INSTANCE/gK"): "cpu", or cuda:K modulo the visible GPUs
    (one worker per GPU, in slot order) when cfg["device"] is "cuda"."""
    want = cfg.get("device", "cpu")
    if want == "cpu":
        return "cpu"
    if not str(want).startswith("cuda"):
        raise ValueError(f"engine device must be 'cpu' or 'cuda', got {want!r}")
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError(f"{slot}: device 'cuda' asked for but no GPU is visible")
    if ":" in str(want):
        return str(want)
    tail = slot.rsplit("/g", 1)
    k = int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 0
    return f"cuda:{k % n}"


def backend_of(device: str) -> str:
    """Process-group backend for a device: NCCL on GPUs, gloo on CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"
