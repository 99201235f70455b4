"""Live-cluster recovery and latency on this machine (CPU, tiny model), and the same run simulated.

Plays a short availability trace (2 notices, 1 acquisition) plus one notice-less SIGKILL on a live
cluster of worker processes under Gamma arrivals, then simulates the same trace and arrivals with the
same profile. Prints a table (and with --json PATH writes the same figures): notice -> serving on
the new config, SIGKILL -> next token of each affected request, the longest token gap per request,
and P50 / P99 latency live vs simulated.

    python scripts/bench_live.py --model-dir DIR [--profile P] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def _trace_lines(kill_at: float):
    return [json.dumps(x) for x in ([0, "add", {"nodes": ["i0", "i1", "i2"]}], [2000, "add", {"nodes": ["i3"]}],
                                    [5000, "remove", {"nodes": ["i0"]}], [10000, "remove", {"nodes": ["i1"]}],
                                    [int(kill_at * 1000) + 8000, "DONE", {}])]


async def live_run(model_dir, profile, run_dir, arrivals, trace, rate, grace, kill_at):
    from spotserve.live.replay import replay_arrivals, schedule_trace
    from spotserve.live.service import LiveConfig, LiveService

    svc = LiveService(LiveConfig(model_dir, profile, run_dir, gpus_per_instance=2, rate=rate, grace_s=grace,
                                 output_len=arrivals[0].output_len, prompt_len=arrivals[0].input_len))
    await svc.start(["i0", "i1", "i2"])
    schedule_trace(svc, trace, 1.0)

    async def chaos():  # at kill_at, SIGKILL a worker of the first replica that runs a batch
        await asyncio.sleep(kill_at)
        while True:
            busy = [rt.slots[-1] for rt in svc.backend.replicas.values() if rt.batch is not None]
            if busy:
                svc.kill_worker(busy[0])
                return
            await asyncio.sleep(0.01)
    asyncio.ensure_future(chaos())
    lrs = await replay_arrivals(svc, arrivals)
    await asyncio.wait_for(asyncio.gather(*(lr.wait() for lr in lrs)), 300)
    lat = [lr.token_wall[-1] - lr.arrived_wall for lr in lrs]
    out = {"latency": lat, "recoveries": svc.recoveries, "notice_to_serving": svc.notice_to_serving,
           "max_gap": [lr.max_gap() for lr in lrs], "recomputed": sum(lr.recomputed for lr in lrs),
           "mismatches": sum(lr.mismatches for lr in lrs),
           "kv_resumes": sum(r["how"] == "kv" for lr in lrs for r in lr.resumes),
           "prefill_resumes": sum(r["how"] == "prefill" for lr in lrs for r in lr.resumes),
           "reconfigurations": svc.summary()["reconfigurations"]}
    await svc.close()
    return out


def sim_run(model_dir, profile, arrivals, trace, rate, grace):
    from spotserve.controller.approach import get_approach
    from spotserve.controller.instances import InstanceConfig
    from spotserve.models.loader import CheckpointReader
    from spotserve.planner.cost import CostModel, Workload
    from spotserve.sim.run import SimConfig, simulate

    spec = CheckpointReader(model_dir).spec
    cost = CostModel.from_profile(profile, spec=spec, workload=Workload(arrivals[0].input_len, arrivals[0].output_len))
    cfg = SimConfig(instance=InstanceConfig(gpus_per_instance=2, gpu_memory_bytes=cost.gpu_memory_bytes,
                                            grace_s=grace), max_seq_len=spec.max_positions + 1)
    res = simulate(cost, trace, arrivals, get_approach("spotserve"), cfg)
    return res.summary, [r["latency_s"] for r in res.records if r["latency_s"] is not None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--profile")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--grace-s", type=float, default=2.0)
    ap.add_argument("--kill-at", type=float, default=13.0)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from spotserve.cloud.availability import parse_availability_lines
    from spotserve.live.profile import measure
    from spotserve.sim.traces import gamma_arrivals

    run_dir = tempfile.mkdtemp(prefix="bench-live-")
    profile = args.profile or str(Path(run_dir) / "profile.json")
    if not args.profile:
        Path(profile).write_text(json.dumps(measure(args.model_dir)))
    arrivals = gamma_arrivals(args.rate, 1.0, args.requests / args.rate, input_len=16, output_len=32, seed=0)
    trace = parse_availability_lines(_trace_lines(args.kill_at))
    live = asyncio.run(live_run(args.model_dir, profile, run_dir, arrivals, trace, args.rate, args.grace_s,
                                args.kill_at))
    # the simulator has no notice-less kill of a single slot: the trace's reclaims are what both see
    summary, sim_lat = sim_run(args.model_dir, profile, arrivals, trace, args.rate, args.grace_s)
    pct = lambda xs, q: float(np.percentile(xs, q)) if len(xs) else float("nan")  # noqa: E731
    rows = {
        "requests": len(arrivals),
        "live_p50_s": pct(live["latency"], 50), "live_p99_s": pct(live["latency"], 99),
        "sim_p50_s": pct(sim_lat, 50), "sim_p99_s": pct(sim_lat, 99),
        "notice_to_serving_s": [r["seconds"] for r in live["notice_to_serving"]],
        "sigkill_to_next_token_s": [r["seconds"] for r in live["recoveries"]],
        "max_token_gap_p50_s": pct(live["max_gap"], 50), "max_token_gap_max_s": max(live["max_gap"]),
        "recomputed_tokens": live["recomputed"], "mismatched_tokens": live["mismatches"],
        "kv_resumes": live["kv_resumes"], "prefill_resumes": live["prefill_resumes"],
        "reconfigurations": live["reconfigurations"],
    }
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.3f}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.3f}" for x in v) or "-"
        print(f"{k:28s} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"{'wall_s':28s} {time.time() - t0:.1f}")
