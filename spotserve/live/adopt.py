"""Adoption of workers that outlived their controller: which came back, and the layout they still hold.

A worker whose controller went away keeps its weights and retries the same address for a while
(worker.serve_sessions); its new hello says `resumed` and what it holds: the (pp, tp, stage, shard)
of its weights and the position of its engine under the old controller's config id. A restarted
controller waits a short while for the slots of the instances it had, adopts every instance whose
slots all came back, and hands the complete replicas they form to the backend as the layout now
held (the old side of the first migration) and to the controller as the layout its first plan
starts from (`held_plan`), so the mapper keeps every weight slice where it is.
"""
from __future__ import annotations

import asyncio
import time

from spotserve.planner.types import ParallelConfig, Position, ReconfigurationPlan


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


def served_record(plan: ReconfigurationPlan | None) -> dict | None:
    """What the state store keeps of the served layout's config (service meta "served"), for held_plan."""
    if plan is None or plan.config is None:
        return None
    row = lambda c: [c.dp, c.pp, c.tp, c.batch, c.micro_batches]  # noqa: E731
    return {"config": row(plan.config), "extra": row(plan.extra) if plan.extra is not None else None}


def held_plan(runs, served: dict | None) -> ReconfigurationPlan | None:
    """The layout the adopted replicas `runs` (objects with shape (pp, tp) and slots in rank order) hold, as
    a plan the controller migrates from (Controller.adopt_layout), or None.

    `served` (served_record of the previous controller, from the state store) gives each shape's batch
    and micro-batches: the plan is the config (and extra replica) it served, restricted to the replicas
    that came back whole. Replicas of a shape it did not serve are left out (their slices count as not
    held); without a record nothing is described (the first plan then starts from scratch)."""
    if not served or not runs:
        return None
    try:
        config = ParallelConfig(*served["config"])
        extra = ParallelConfig(*served["extra"]) if served.get("extra") else None
    except (KeyError, TypeError, ValueError):
        return None  # a record this version cannot read: plan from scratch
    main = [rt for rt in runs if (rt.shape.pp, rt.shape.tp) == (config.pp, config.tp)]
    rest = [rt for rt in runs if rt not in main]
    side = next((rt for rt in rest if extra is not None and (rt.shape.pp, rt.shape.tp) == (extra.pp, extra.tp)),
                None)
    if not main:  # only the extra replica came back: it is the layout
        if side is None:
            return None
        main, side, config, extra = [side], None, extra, None
    config = ParallelConfig(len(main), config.pp, config.tp, config.batch, config.micro_batches)
    placement = {}
    for r, rt in enumerate(main + ([side] if side is not None else [])):
        tp = rt.shape.tp
        for rank, slot in enumerate(rt.slots):
            placement[Position(r, rank // tp, rank % tp)] = slot
    return ReconfigurationPlan(config, placement, [], 0.0, extra=extra if side is not None else None)
