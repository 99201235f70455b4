"""Drive a live service from recorded inputs: an availability trace and request arrivals, time-scaled.

Trace times are multiplied by `time_scale` (e.g. 0.05 plays a 20-minute trace in one minute). An
`add` acquires the instance (its processes start then; it joins when its workers connected); a
`remove` at t sends the notice `grace_s` (live seconds) before t*scale, and the SIGKILL comes at
the notice's deadline. Arrivals get random prompt ids of their input length (seeded), so a live
run and a simulated run see the same request shapes.
"""
from __future__ import annotations

import asyncio
import random

from spotserve.cloud.availability import AvailabilityTrace
from spotserve.sim.traces import Arrival


def initial_instances(trace: AvailabilityTrace) -> list[str]:
    """Instances added at time 0 (started before serving begins)."""
    return [n for ev in trace.events if ev.op == "add" and ev.t == 0 for n in ev.instances]


def schedule_trace(service, trace: AvailabilityTrace, time_scale: float = 1.0, grace_s: float | None = None) -> None:
    """Put every non-initial availability event of `trace` on the service's clock (from now)."""
    if time_scale <= 0:
        raise ValueError(f"time_scale must be positive, got {time_scale}")
    loop = asyncio.get_running_loop()
    grace = service.config.grace_s if grace_s is None else grace_s
    for ev in trace.events:
        at = ev.t * time_scale
        if ev.op == "add" and ev.t > 0:
            for name in ev.instances:
                loop.call_later(at, lambda n=name: asyncio.ensure_future(service.acquire(n)))
        elif ev.op == "remove":
            for name in ev.instances:
                notice_at = max(0.0, at - grace)
                loop.call_later(notice_at, lambda n=name, g=min(grace, at): service.notice(n, g))
        if ev.required_tpt is not None:
            loop.call_later(at, lambda r=ev.required_tpt: service.controller.on_rate(r))


def prompt_of(arrival: Arrival, vocab: int, seed: int = 0) -> list[int]:
    """Deterministic random prompt ids of the arrival's input length."""
    rng = random.Random(seed * 1_000_003 + arrival.id)
    return [rng.randrange(vocab) for _ in range(arrival.input_len)]


async def replay_arrivals(service, arrivals: list[Arrival], time_scale: float = 1.0, seed: int = 0) -> list:
    """Submit each arrival at its (scaled) time; returns the LiveRequests in arrival order."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out = []
    for a in sorted(arrivals, key=lambda a: a.t):
        delay = t0 + a.t * time_scale - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        out.append(service.submit(prompt_of(a, service.spec.vocab, seed), a.output_len))
    return out
