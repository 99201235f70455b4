"""The experiment driver's live parts: the demo's short run on real worker processes (CPU)."""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path


def demo_live_part(out: Path, say=print, timeout_s: float = 300.0) -> int:
    """Run spotserve.live.demo (tiny random model, 3 instances of 2 worker processes, one notice, one
    SIGKILL) and print what happened to each request; writes out/live_demo.json. Returns the exit
    status: 0 when every request finished with the tokens of an uninterrupted run, else 1."""
    from spotserve.live.demo import run_live_demo

    say("\nlive part: the same controller driving real worker processes on CPU "
        "(tiny random model, one preemption with notice, one SIGKILL without)")
    t0 = time.perf_counter()
    try:
        rows = run_live_demo(None, say=say, timeout_s=timeout_s)
    except (TimeoutError, OSError, RuntimeError) as exc:
        say(f"live part failed ({type(exc).__name__}: {exc}); worker processes were stopped. "
            f"Skip it with --no-live.")
        return 1
    same = sum(r["identical"] for r in rows)
    hit = [r for r in rows if r["interruptions"]]
    kv = sum(x["how"] == "kv" for r in rows for x in r["resumes"])
    pre = sum(x["how"] == "prefill" for r in rows for x in r["resumes"])
    say(f"live: {len(rows)} requests, {len(hit)} interrupted ({kv} resumed with their KV cache, {pre} re-prefilled "
        f"from committed tokens), {same}/{len(rows)} token-identical to an uninterrupted run, "
        f"recomputed tokens {sum(r['recomputed'] for r in rows)}, longest token gap "
        f"{max(r['max_gap_s'] for r in rows):.3f} s ({time.perf_counter() - t0:.1f} s)")
    out.mkdir(parents=True, exist_ok=True)
    (out / "live_demo.json").write_text(json.dumps(rows, indent=1))
    return 0 if same == len(rows) else 1


@dataclass(frozen=True)
class LiveOptions:
    """How `e2e --backend live` shrinks a paper cell onto worker processes on this machine."""

    duration_s: float = 60.0  # the trace is time-scaled to last this long (live seconds)
    max_requests: int = 200  # arrivals subsampled evenly over the trace down to this many
    input_len: int = 16
    output_len: int = 24
    gpus_per_instance: int = 1
    grace_s: float = 2.0  # live seconds between a notice and the SIGKILL
    model_dir: str | None = None  # default: a tiny random model (opt-tiny) written to a temp folder
    profile: str | None = None  # default: measured through the live path now
    compare_sim: bool = True  # also simulate the same scaled trace and arrivals with the same profile
    timeout_s: float = 600.0

    def __post_init__(self):
        if self.duration_s <= 0 or self.max_requests < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("live options: duration_s, max_requests, input_len and output_len must be positive")
        if self.gpus_per_instance < 1 or self.grace_s < 0 or self.timeout_s <= 0:
            raise ValueError("live options: gpus_per_instance >= 1, grace_s >= 0 and timeout_s > 0 required")


def scale_cell(trace, arrivals, lo: LiveOptions):
    """(scaled trace, scaled arrivals, scale): times x scale so the trace lasts lo.duration_s, arrivals
    subsampled evenly to lo.max_requests and given the live lengths."""
    from spotserve.cloud.availability import AvailabilityTrace
    from spotserve.sim.traces import Arrival

    scale = lo.duration_s / trace.duration
    events = [replace(e, t=e.t * scale) for e in trace.events]
    scaled = AvailabilityTrace(events, trace.duration * scale, f"{trace.name}x{scale:.3g}", trace.ondemand)
    sent = [a for a in arrivals if a.t < trace.duration]
    step = max(1, -(-len(sent) // lo.max_requests))
    kept = sent[::step][:lo.max_requests]
    return scaled, [Arrival(i, a.t * scale, lo.input_len, lo.output_len) for i, a in enumerate(kept)], scale


async def _live_cell(lo: LiveOptions, model_dir: str, profile: str, run_dir: Path, approach: str, trace, arrivals):
    from spotserve.live.replay import initial_instances, prompt_of, schedule_trace
    from spotserve.live.service import LiveConfig, LiveService

    rate = len(arrivals) / max(arrivals[-1].t, 1e-9) if arrivals else 0.0  # as simulate() computes it
    svc = LiveService(LiveConfig(model_dir, profile, str(run_dir), gpus_per_instance=lo.gpus_per_instance,
                                 approach=approach, rate=rate, grace_s=lo.grace_s, prompt_len=lo.input_len,
                                 output_len=lo.output_len))
    try:
        await svc.start(initial_instances(trace))
        # the simulator's run starts with the first layout loaded (warm start), so the scaled trace's
        # clock starts once the live workers have configured it, not while they still build engines
        while svc.backend.plans_done < 1:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        schedule_trace(svc, trace, 1.0, lo.grace_s)
        lrs = []
        for a in arrivals:
            await asyncio.sleep(max(0.0, t0 + a.t - loop.time()))
            try:
                lrs.append(svc.submit(prompt_of(a, svc.spec.vocab), a.output_len))
            except ValueError:
                pass  # rejected: the controller's request table records it
        await asyncio.sleep(max(0.0, t0 + trace.duration - loop.time()))
        await asyncio.gather(*(lr.wait() for lr in lrs))
        end_t = svc.backend.now()
        svc.rm.finalize()
        svc.controller.instances.end_all(end_t)
        return svc, end_t
    finally:  # every worker process is killed, on success, error or timeout
        await svc.close()


def run_e2e_live(model: str, trace_name: str, approaches: list[str], opts, lo: LiveOptions, say=print) -> dict:
    """`e2e --backend live`: the cell's trace and arrivals, scaled down, served by worker processes per
    approach; writes summary.json, requests_/events_/instances_<approach> like the simulator (plus
    `<approach>@sim` rows simulating the same scaled cell with the live-path profile, its measured
    batch-to-batch spread replayed with RNG seed opts.seed) and the profile used (profile.json)."""
    from spotserve.controller.approach import get_approach
    from spotserve.controller.instances import InstanceConfig
    from spotserve.experiment import plots
    from spotserve.experiment.data import load_trace
    from spotserve.experiment.outputs import write_result, write_summary
    from spotserve.experiment.runner import workload
    from spotserve.live.refit import refit_profile
    from spotserve.models.loader import CheckpointReader
    from spotserve.planner.cost import CostModel, Workload
    from spotserve.sim.jitter import StepJitter
    from spotserve.sim.run import SimConfig, SimResult, simulate, summarize

    trace0 = load_trace(trace_name, opts.root)
    arrivals0, note = workload(model, trace0.duration, opts)
    trace, arrivals, scale = scale_cell(trace0, arrivals0, lo)
    out = opts.out / f"e2e_{model}_{trace_name}_live"
    tmp = Path(tempfile.mkdtemp(prefix="spotserve-e2e-live-"))
    try:
        model_dir, profile = _model_and_profile(lo, tmp, say)
        out.mkdir(parents=True, exist_ok=True)
        if Path(profile).resolve() != (out / "profile.json").resolve():
            shutil.copyfile(profile, out / "profile.json")  # what both backends planned with (and the sim's jitter)
        spec = CheckpointReader(model_dir).spec
        summaries, backend_events = {}, {}
        for name in approaches:
            say(f"live {name}: {len(arrivals)} requests over {trace.duration:.0f} s, trace {trace_name} x {scale:.3g}")
            svc, end_t = asyncio.run(asyncio.wait_for(
                _live_cell(lo, model_dir, profile, tmp / f"run-{name}", name, trace, arrivals), lo.timeout_s))
            cost_usd = svc.controller.instances.cost(end_t)
            res = SimResult(name, [q.record() for q in svc.rm.requests.values()], svc.log,
                            summarize(svc.rm, cost_usd, end_t, svc.controller), trace.counts())
            write_result(out, res)
            configured = [e for e in svc.backend.events if e["event"] == "configured"]
            # checkpoint bytes the workers read at each configuration after the first (weights are
            # re-read from the checkpoint for every position whose slices change)
            res.summary["checkpoint_bytes_per_reconfiguration"] = [e["loaded_bytes"] for e in configured[1:]]
            res.summary["recoveries_s"] = [r["seconds"] for r in svc.recoveries]
            res.summary["notice_to_serving_s"] = [r["seconds"] for r in svc.notice_to_serving]
            with (out / f"backend_{name}.jsonl").open("w") as f:
                f.writelines(json.dumps(e) + "\n" for e in svc.backend.events)
            backend_events[name] = svc.backend.events
            summaries[name] = res.summary
        if lo.compare_sim:
            cost = CostModel.from_profile(profile, spec=spec, workload=Workload(lo.input_len, lo.output_len))
            # a live-path profile carries its measured batch-to-batch spread: the simulator replays it
            jitter = StepJitter.from_profile(profile)
            cfg = SimConfig(instance=InstanceConfig(gpus_per_instance=lo.gpus_per_instance, grace_s=lo.grace_s,
                                                    gpu_memory_bytes=cost.gpu_memory_bytes),
                            max_seq_len=spec.max_positions + 1, jitter=jitter, seed=getattr(opts, "seed", 0),
                            engine_start_s=engine_start_of(json.loads(Path(profile).read_text())))
            for name in approaches:
                res = simulate(cost, trace, arrivals, get_approach(name), cfg)
                res = replace(res, approach=f"{name}@sim")
                write_result(out, res)
                summaries[res.approach] = res.summary
                agree = compare_sim(summaries[name], res.summary)
                summaries[name]["live_over_sim"] = agree
                say(f"{name}: live / sim latency P50 {agree['p50']}, P99 {agree['p99']} "
                    f"(within 25% of each other: {'yes' if agree['within_25pct'] else 'no'})")
                # the same simulation with the profile re-fitted to this run's measured step times:
                # checks the simulator's model of the system apart from the machine's drift
                refit = refit_profile(json.loads(Path(profile).read_text()), backend_events[name], cost)
                path = out / f"profile_refit_{name}.json"
                path.write_text(json.dumps(refit, indent=1))
                rcost = CostModel.from_profile(path, spec=spec, workload=Workload(lo.input_len, lo.output_len))
                res = simulate(rcost, trace, arrivals, get_approach(name),
                               replace(cfg, jitter=StepJitter.from_profile(path), engine_start_s=engine_start_of(refit)))
                res = replace(res, approach=f"{name}@sim-refit")
                write_result(out, res)
                summaries[res.approach] = res.summary
                agree = compare_sim(summaries[name], res.summary)
                summaries[name]["live_over_sim_refit"] = {**agree, "scale": refit["refit"]["scale"]}
                say(f"{name}: live / sim re-fitted to this run's step times (x{refit['refit']['scale']['prefill']} "
                    f"prefill, x{refit['refit']['scale']['decode']} decode) P50 {agree['p50']}, P99 {agree['p99']} "
                    f"(within 25%: {'yes' if agree['within_25pct'] else 'no'})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {"kind": "e2e", "backend": "live", "model": spec.name, "paper_model": model, "trace": trace.name,
            "time_scale": scale, "arrivals": f"{note}, {len(arrivals)} kept, {lo.input_len}/{lo.output_len} tokens",
            "note": "live worker processes on CPU (tiny model); '@sim' rows: the simulator on the same scaled "
                    "cell with the live-path profile", "grace_s": lo.grace_s,
            "gpus_per_instance": lo.gpus_per_instance}
    write_summary(out, summaries, meta)
    plots.latency_percentiles(out, f"live {spec.name} on {trace.name}")
    return summaries


def engine_start_of(profile: dict) -> float:
    """The simulator's engine start for a live-path profile: the median of its measured reconfigurations
    (process groups, engine build: what a rebuilt replica pays before it serves); 0 without any."""
    import statistics

    xs = profile.get("configure_s") or []
    return float(statistics.median(xs)) if xs else 0.0


def compare_sim(live: dict, sim: dict) -> dict:
    """live / simulated P50 and P99 latency of one approach, and whether both are within 25%."""
    ratio = {q: (live[f"{q}_s"] / sim[f"{q}_s"]) if live.get(f"{q}_s") and sim.get(f"{q}_s") else None
             for q in ("p50", "p99")}
    ok = all(r is not None and max(r, 1 / r) <= 1.25 for r in ratio.values())
    return {**{q: round(r, 4) if r is not None else None for q, r in ratio.items()}, "within_25pct": ok}


def _model_and_profile(lo: LiveOptions, tmp: Path, say) -> tuple[str, str]:
    from spotserve.live.calibrate import measure_live
    from spotserve.models import get_spec
    from spotserve.models.checkpoint import write_random_checkpoint

    model_dir = lo.model_dir
    if model_dir is None:
        model_dir = str(tmp / "opt-tiny")
        write_random_checkpoint(get_spec("opt-tiny"), model_dir, seed=0, dtype="fp32")
    profile = lo.profile
    if profile is None:
        say("measuring the live-path profile on this machine...")
        profile = str(tmp / "profile.json")
        # timed batches as long as the workload's (the spread of a batch's mean step depends on its length)
        Path(profile).write_text(json.dumps(measure_live(model_dir, prompt_len=lo.input_len, steps=lo.output_len - 1,
                                                         gpus_per_instance=lo.gpus_per_instance)))
    return model_dir, profile
