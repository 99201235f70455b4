"""Run one simulated cell: availability trace + arrivals + approach -> per-request fates and a summary."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from spotserve.cloud.availability import AvailabilityTrace
from spotserve.cloud.replay import replay_events
from spotserve.controller.approach import Approach
from spotserve.controller.controller import Controller
from spotserve.controller.events import EventLog
from spotserve.controller.instances import InstanceConfig, InstanceManager
from spotserve.controller.policy import Policy
from spotserve.controller.requests import RequestManager
from spotserve.planner.cost import CostModel
from spotserve.sim.backend import SimBackend
from spotserve.sim.jitter import StepJitter
from spotserve.sim.traces import Arrival


@dataclass(frozen=True)
class SimConfig:
    """Knobs of a simulated run (paper defaults: 30 s grace, g4dn.12xlarge prices); the batch cap is the
    cost model's (CostModel max_batch). `jitter` (sim/jitter.py, from a live-path profile) draws each
    batch's speed with an RNG seeded by `seed`; None (the default) keeps every batch at the profile's times."""

    instance: InstanceConfig = field(default_factory=InstanceConfig)
    drain_s: float = 600.0  # after the trace ends: no new arrivals, in-flight requests may finish
    engine_start_s: float = 0.0
    max_seq_len: int | None = 2048
    jitter: StepJitter | None = None
    seed: int = 0

    def __post_init__(self):
        if self.drain_s < 0 or self.engine_start_s < 0:
            raise ValueError("drain_s >= 0 and engine_start_s >= 0 needed")


@dataclass
class SimResult:
    """What a run produced: request table rows, the event log, the summary and the instance timeline."""

    approach: str
    records: list[dict]
    log: EventLog
    summary: dict
    instance_counts: list[tuple[float, int]]


def summarize(rm: RequestManager, cost_usd: float, end_t: float, ctl: Controller) -> dict:
    """The summary keys of summary.json for one approach."""
    c = rm.counts()
    lat = np.array([r.latency for r in rm.requests.values() if r.latency is not None])
    pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: None)
    tokens = rm.tokens_out
    return {
        "arrived": c["arrived"], "completed": c["completed"], "rejected": c["rejected"],
        "unfinished": c["unfinished"],
        "avg_s": float(lat.mean()) if len(lat) else None,
        "p50_s": pct(50), "p90_s": pct(90), "p99_s": pct(99),
        "cost_usd": cost_usd, "usd_per_token": cost_usd / tokens if tokens else None,
        "tokens": tokens, "end_s": end_t, "reconfigurations": ctl.reconfigurations,
        "stall_s": ctl.stall_s,
        "interrupted": sum(1 for r in rm.requests.values() if r.interruptions),
        "recomputed_tokens": sum(r.recomputed_tokens for r in rm.requests.values()),
    }


def build_policy(cost: CostModel, engine_start_s: float, pool_gpus: int) -> Policy:
    """The Policy (planner + switches) for a run over a pool of at most `pool_gpus` GPUs."""
    return Policy(cost, engine_start_s=engine_start_s, pool_gpus=pool_gpus)


def simulate(cost: CostModel, trace: AvailabilityTrace, arrivals: list[Arrival], approach: Approach,
             config: SimConfig = SimConfig(), policy: Policy | None = None, progress=None) -> SimResult:
    """Simulate `approach` serving `arrivals` on the instances of `trace`.

    Arrivals at or after the trace's end are not sent; afterwards the pool stays as it was and
    in-flight requests get `drain_s` to finish. `progress` (a tqdm bar or None) is advanced in
    simulated seconds. Out: SimResult with every arrived request's fate.
    """
    gpi = config.instance.gpus_per_instance
    if policy is None:
        policy = build_policy(cost, config.engine_start_s, trace.max_instances() * gpi)
    im = InstanceManager(config.instance)
    rm = RequestManager(config.max_seq_len)
    sent = [a for a in arrivals if a.t < trace.duration]
    rate = len(arrivals) / max(arrivals[-1].t, 1e-9) if arrivals else 0.0
    log = EventLog()
    ctl = Controller(policy, approach, im, rm, rate, log)
    be = SimBackend(policy, config.jitter, config.seed)
    be.attach(ctl)
    _schedule_availability(be, ctl, trace, config.instance.grace_s)

    end_limit = trace.duration + config.drain_s
    i, n = 0, len(sent)
    last_tick = 0.0
    while True:
        t_ev = be.next_time()
        if i < n and sent[i].t <= t_ev:
            a = sent[i]
            be.t = a.t
            ctl.on_arrival(a.id, a.input_len, a.output_len)
            i += 1
        elif t_ev <= end_limit and (t_ev <= trace.duration or rm.queue or rm.n_running):
            be.step()
        else:
            break
        if progress is not None and be.t - last_tick >= 10.0:
            progress.update(int(min(be.t, trace.duration)) - int(min(last_tick, trace.duration)))
            last_tick = be.t
    end_t = max(trace.duration, min(be.t, end_limit)) if (rm.queue or rm.n_running) else \
        max(trace.duration, be.t if be.t <= end_limit else trace.duration)
    if progress is not None:
        progress.update(max(0, int(trace.duration) - int(min(last_tick, trace.duration))))
    rm.finalize()
    im.end_all(end_t)
    cost_usd = im.cost(end_t)
    log.emit(end_t, "end", cost_usd=cost_usd)
    return SimResult(approach.name, [r.record() for r in rm.requests.values()], log,
                     summarize(rm, cost_usd, end_t, ctl), trace.counts())


def _schedule_availability(be: SimBackend, ctl: Controller, trace: AvailabilityTrace, grace_s: float) -> None:
    handlers = {
        "add": lambda e: ctl.on_instance_added(e.instance, e.ondemand),
        "notice": lambda e: ctl.on_notice(e.instance, e.deadline),
        "reclaim": lambda e: ctl.on_reclaim(e.instance),
        "rate": lambda e: ctl.on_rate(e.rate),
    }
    for ev in replay_events(trace, grace_s):
        be.call_at(ev.t, lambda ev=ev: handlers[ev.kind](ev))
