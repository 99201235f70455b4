"""Run experiment cells (model x trace x approaches) and write their outputs and figures."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from spotserve.cloud.availability import AvailabilityEvent, AvailabilityTrace
from spotserve.controller.approach import get_approach
from spotserve.controller.instances import InstanceConfig
from spotserve.experiment import plots
from spotserve.experiment.data import FIDELITY_NOTE, T4_MEMORY_BYTES, load_cost, load_trace, model_setting
from spotserve.experiment.outputs import write_result, write_summary
from spotserve.sim.run import SimConfig, SimResult, simulate
from spotserve.sim.traces import Arrival, gamma_arrivals, load_arrivals


@dataclass(frozen=True)
class RunOptions:
    """Options shared by the subcommands."""

    root: Path
    out: Path
    grace_s: float = 30.0
    startup_s: float = 0.0
    spot_usd_per_hour: float = 1.9046
    ondemand_usd_per_hour: float = 3.912
    max_batch: int = 4
    gpu_memory_bytes: int = T4_MEMORY_BYTES
    arrival_cv: float | None = None
    arrivals: str | None = None
    rate: float | None = None
    seed: int = 0
    progress: bool = True

    def sim_config(self) -> SimConfig:
        inst = InstanceConfig(grace_s=self.grace_s, startup_s=self.startup_s,
                              spot_usd_per_hour=self.spot_usd_per_hour,
                              ondemand_usd_per_hour=self.ondemand_usd_per_hour, gpu_memory_bytes=self.gpu_memory_bytes)
        return SimConfig(instance=inst)


def workload(model: str, duration: float, opts: RunOptions) -> tuple[list[Arrival], str]:
    """The arrivals of a cell: the paper's file, another file, or a true Gamma process (--arrival-cv)."""
    m = model_setting(model)
    rate = opts.rate or m.rate
    if opts.arrival_cv is not None:
        return gamma_arrivals(rate, opts.arrival_cv, duration, seed=opts.seed), \
            f"Gamma arrivals {rate} req/s, CV {opts.arrival_cv}, seed {opts.seed}"
    name = opts.arrivals or m.arrivals
    path = Path(name) if Path(name).is_file() else opts.root / "arrivals" / name
    if not path.is_file():
        raise ValueError(f"arrival file {name!r} not found (looked in {opts.root / 'arrivals'})")
    return load_arrivals(path), f"arrival file {path.name}"


def run_cell(model: str, trace: AvailabilityTrace, approaches: list[str], opts: RunOptions, out: Path,
             arrivals: list[Arrival] | None = None, arrivals_note: str = "", labels: dict[str, str] | None = None,
             kind: str = "e2e") -> dict[str, dict]:
    """Simulate each approach on one trace; write per-approach outputs and summary.json under `out`."""
    cost = load_cost(model, opts.root, opts.max_batch, opts.gpu_memory_bytes)
    if arrivals is None:
        arrivals, arrivals_note = workload(model, trace.duration, opts)
    summaries: dict[str, dict] = {}
    bar = tqdm(total=int(trace.duration) * len(approaches), unit="sim-s", desc=f"{model} {trace.name}",
               disable=not opts.progress, leave=False)
    for name in approaches:
        res: SimResult = simulate(cost, trace, arrivals, get_approach(name), opts.sim_config(), progress=bar)
        label = (labels or {}).get(name, name)
        res = replace(res, approach=label)
        write_result(out, res)
        summaries[label] = res.summary
    bar.close()
    meta = {"kind": kind, "model": model, "trace": trace.name, "arrivals": arrivals_note, "note": FIDELITY_NOTE,
            "grace_s": opts.grace_s, "startup_s": opts.startup_s, "max_batch": opts.max_batch,
            "gpu_memory_gib": opts.gpu_memory_bytes / 2**30}
    write_summary(out, summaries, meta)
    return summaries


def static_trace(n: int, duration: float, ondemand: bool = True) -> AvailabilityTrace:
    """A fixed cluster of n instances for `duration` seconds."""
    names = tuple(f"od-{i}" for i in range(n))
    events = [AvailabilityEvent(0.0, "add", names, None, ondemand), AvailabilityEvent(duration, "done")]
    return AvailabilityTrace(events, duration, f"{'ondemand' if ondemand else 'spot'}-{n}",
                             frozenset(names) if ondemand else frozenset())


def run_e2e(model: str, trace_name: str, approaches: list[str], opts: RunOptions) -> dict[str, dict]:
    trace = load_trace(trace_name, opts.root)
    out = opts.out / f"e2e_{model}_{trace_name}"
    summ = run_cell(model, trace, approaches, opts, out)
    plots.latency_percentiles(out, f"{model} on {trace_name}")
    plots.latency_over_time(out, f"{model} on {trace_name}")
    return summ


def run_cost(model: str, opts: RunOptions, traces=("As", "Bs"), sizes=(3, 4, 6, 8)) -> dict[str, dict]:
    """spotserve on spot traces against static on-demand clusters of `sizes` instances (same workload)."""
    out = opts.out / f"cost_{model}"
    all_summ: dict[str, dict] = {}
    for tname in traces:
        trace = load_trace(tname, opts.root)
        all_summ.update(run_cell(model, trace, ["spotserve"], opts, out, labels={"spotserve": f"spot-{tname}"}))
    duration = max(load_trace(t, opts.root).duration for t in traces)
    for n in sizes:
        trace = static_trace(n, duration)
        all_summ.update(run_cell(model, trace, ["spotserve"], opts, out, labels={"spotserve": f"ondemand-{n}"}))
    write_summary(out, all_summ, {"kind": "cost", "model": model, "note": FIDELITY_NOTE})
    plots.cost_vs_latency(out, f"{model}: spot vs on-demand")
    plots.latency_percentiles(out, f"{model}: spot vs on-demand")
    return all_summ


def run_workload(model: str, approaches: list[str], opts: RunOptions) -> dict[str, dict]:
    """Fluctuating arrival rate (query_realAr_cv6: per-minute rates) on the workload traces."""
    res = {}
    for tname in ("trace_0304_workload.txt", "trace_0506_workload.txt"):
        trace = load_trace(tname, opts.root)
        o = replace(opts, arrivals=opts.arrivals or "query_realAr_cv6.txt")
        out = opts.out / f"workload_{model}_{Path(tname).stem}"
        res[tname] = run_cell(model, trace, approaches, o, out, kind="workload")
        plots.latency_percentiles(out, f"{model} fluctuating load, {tname}")
        plots.latency_over_time(out, f"{model} fluctuating load, {tname}")
    return res


def run_ablation(model: str, trace_name: str, opts: RunOptions, approaches: list[str]) -> dict[str, dict]:
    trace = load_trace(trace_name, opts.root)
    out = opts.out / f"ablation_{model}_{trace_name}"
    summ = run_cell(model, trace, approaches, opts, out, kind="ablation")
    plots.ablation_bars(out, f"ablation: {model} on {trace_name}")
    return summ
