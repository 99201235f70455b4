"""Trace replay: turn an availability trace into the timed events a controller receives.

A `remove` at t becomes a notice at max(t - grace, time the instance was added) with deadline t,
then a reclaim at t; `required_tpt` becomes a rate event. Used by the simulator; a live cluster
replays the same list against the wall clock (optionally time-scaled).
"""
from __future__ import annotations

from dataclasses import dataclass

from spotserve.cloud.availability import AvailabilityTrace

KINDS = ("add", "notice", "reclaim", "rate")


@dataclass(frozen=True, order=True)
class ReplayEvent:
    """One controller-facing event: at time t, `kind` for `instance` (deadline for notices, rate for rate)."""

    t: float
    seq: int
    kind: str
    instance: str = ""
    deadline: float | None = None
    rate: float | None = None
    ondemand: bool = False


def replay_events(trace: AvailabilityTrace, grace_s: float, time_scale: float = 1.0) -> list[ReplayEvent]:
    """Events in time order (ties keep trace order). `time_scale` < 1 compresses time for live demos."""
    if grace_s < 0 or time_scale <= 0:
        raise ValueError(f"need grace_s >= 0 and time_scale > 0, got {grace_s}, {time_scale}")
    out: list[ReplayEvent] = []
    added_at: dict[str, float] = {}
    for ev in trace.events:
        t = ev.t * time_scale
        if ev.op == "add":
            for name in ev.instances:
                added_at[name] = t
                out.append(ReplayEvent(t, len(out), "add", name, ondemand=ev.ondemand))
        elif ev.op == "remove":
            for name in ev.instances:
                notice_t = max(t - grace_s * time_scale, added_at.get(name, 0.0))
                out.append(ReplayEvent(notice_t, len(out), "notice", name, deadline=t))
                out.append(ReplayEvent(t, len(out), "reclaim", name))
        if ev.required_tpt is not None:
            out.append(ReplayEvent(t, len(out), "rate", rate=ev.required_tpt))
    out.sort()
    return out
