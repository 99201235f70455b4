"""Adoption of workers that outlived their controller: which came back, and the layout they still hold.

A worker whose controller went away keeps its weights and retries the same address for a while
(worker.serve_sessions); its new hello says `resumed` and what it holds: the (pp, tp, stage, shard)
of its weights and the position of its engine under the old controller's config id. A restarted
controller waits a short while for the slots of the instances it had, adopts every instance whose
slots all came back, and hands the complete replicas they form to the backend as the layout now
held, so the first configuration keeps every weight slice whose position is unchanged.
"""
from __future__ import annotations

import asyncio
import time

from spotserve.planner.types import ParallelConfig


async def await_slots(pool, slots: list[str], timeout_s: float) -> None:
    """Wait until every slot in `slots` is connected again (resumed), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all((c := pool.alive(s)) is not None and c.resumed for s in slots):
            return
        await asyncio.sleep(0.05)


async def await_gone(pool, slots: list[str], timeout_s: float = 5.0) -> None:
    """Wait until none of `slots` is connected (after killing them), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(pool.alive(s) is not None for s in slots):
        await asyncio.sleep(0.02)


def held_replicas(conns) -> list[tuple[int, int, int, list[str]]]:
    """(old config id, pp, tp, slots in rank order stage * tp + shard) of every complete replica the
    resumed workers `conns` still hold: each member's engine position and weights agree, and every
    position of the replica came back. Incomplete replicas are left out (their slices come from the
    checkpoint or another holder)."""
    groups: dict[tuple, dict[tuple[int, int], str]] = {}
    for c in conns:
        pos, holds = c.hello.get("position"), c.hello.get("holds")
        if not c.resumed or not pos:
            continue
        key = (int(pos["config_id"]), int(pos["replica"]), int(pos["pp"]), int(pos["tp"]))
        if list(holds or []) != [key[2], key[3], int(pos["stage"]), int(pos["shard"])]:
            continue
        groups.setdefault(key, {})[(int(pos["stage"]), int(pos["shard"]))] = c.name
    out = []
    for (cid, _, pp, tp), where in sorted(groups.items()):
        ranks = [(k // tp, k % tp) for k in range(pp * tp)]
        if all(r in where for r in ranks):
            out.append((cid, pp, tp, [where[r] for r in ranks]))
    return out


def install_held(backend, conns) -> list[list[str]]:
    """Give `backend` the replicas the adopted workers `conns` hold, as its current layout (the old
    side of the first configuration), and continue config ids after every id they report, so a
    worker never takes a new configuration for one it already has. Returns the replicas' slots."""
    from spotserve.live.backend import ReplicaRun

    reps = held_replicas(conns)
    held = getattr(backend, "held", None)
    for i, (cid, pp, tp, slots) in enumerate(reps):
        backend.replicas[i] = ReplicaRun(i, ParallelConfig(1, pp, tp, 1, 1), slots, cid)
        if held is not None:
            for rank, s in enumerate(slots):
                held[s] = (pp, tp, rank // tp, rank % tp)
    ids = [int(c.hello.get("config_id", 0)) for c in conns]
    backend.config_id = max([backend.config_id, *ids])
    return [slots for *_, slots in reps]
