"""Command line of the experiment driver: the paper's experiments on the simulator, with baselines and plots."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from spotserve.controller.approach import ABLATIONS, APPROACHES, BASELINES

SUBCOMMANDS = {
    "demo": "run a short paper cell end to end (the README's main job)",
    "e2e": "end-to-end latency and cost of spotserve and the baselines on an availability trace",
    "cost": "spot vs static on-demand clusters",
    "workload": "fluctuating arrival rate",
    "ablation": "spotserve with one component switched off at a time",
    "plot": "figures from a finished run's outputs",
}
MODELS = ("6.7B", "20B", "30B")
TRACES = ("As", "Bs", "As+o", "Bs+o")


def _common(p: argparse.ArgumentParser, out_default: str) -> None:
    p.add_argument("--data-dir", help="folder like spotserve/data (default: $SPOTSERVE_DATA, else the package copy)")
    p.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    p.add_argument("--grace", type=float, default=30.0, help="seconds between notice and reclaim (paper 30, AWS 120)")
    p.add_argument("--startup", type=float, default=0.0, help="seconds from acquisition until an instance is usable")
    p.add_argument("--spot-price", type=float, default=1.9046, help="USD per spot instance-hour")
    p.add_argument("--ondemand-price", type=float, default=3.912, help="USD per on-demand instance-hour")
    p.add_argument("--max-batch", type=int, default=4, help="largest batch the optimizer may choose")
    p.add_argument("--gpu-memory-gib", type=float, default=15.0,
                   help="memory per GPU visible to CUDA (T4 16 GB with ECC: 15 GiB)")
    p.add_argument("--arrivals", help="arrival file (name under arrivals/ or a path) instead of the paper's")
    p.add_argument("--arrival-cv", type=float, help="use a Gamma arrival process with this CV instead of a file")
    p.add_argument("--rate", type=float, help="arrival rate (req/s) for --arrival-cv (default: the paper's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spotserve.experiment", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == "plot":
            sp.add_argument("--out", required=True, help="a folder holding summary.json from an earlier run")
            continue
        _common(sp, f"runs/{name}")
        if name == "demo":
            sp.add_argument("--no-live", action="store_true",
                            help="skip the live part (worker processes on CPU, one notice, one kill)")
        if name in ("e2e", "cost", "workload", "ablation"):
            sp.add_argument("--model", choices=MODELS + ("all",), default="20B")
        if name in ("e2e", "ablation"):
            sp.add_argument("--trace", choices=TRACES + ("all",), default="As")
        if name == "e2e":
            _live_args(sp)
        if name in ("e2e", "workload"):
            sp.add_argument("--approach", default="all" if name == "e2e" else "all",
                            help=f"one of {', '.join(APPROACHES)}, a comma list, or all (the 3 main approaches)")
    return p


def _live_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--backend", choices=("sim", "live"), default="sim",
                    help="sim: the simulator; live: worker processes on this machine (tiny model, scaled trace)")
    g = sp.add_argument_group("live backend (--backend live)")
    g.add_argument("--live-duration", type=float, default=60.0, help="seconds the scaled trace lasts (default 60)")
    g.add_argument("--live-requests", type=int, default=200,
                   help="arrivals kept, evenly over the trace (default 200: P99 of fewer is one request)")
    g.add_argument("--live-input-len", type=int, default=16)
    g.add_argument("--live-output-len", type=int, default=24)
    g.add_argument("--live-gpus-per-instance", type=int, default=1, help="worker processes per instance")
    g.add_argument("--live-grace", type=float, default=2.0, help="live seconds from notice to SIGKILL")
    g.add_argument("--live-model-dir", help="checkpoint folder (default: a tiny random opt-tiny)")
    g.add_argument("--live-profile", help="live-path profile JSON (default: measured now)")
    g.add_argument("--no-sim-compare", action="store_true", help="skip the '<approach>@sim' rows")


def _live_options(args):
    from spotserve.experiment.live import LiveOptions

    return LiveOptions(duration_s=args.live_duration, max_requests=args.live_requests,
                       input_len=args.live_input_len, output_len=args.live_output_len,
                       gpus_per_instance=args.live_gpus_per_instance, grace_s=args.live_grace,
                       model_dir=args.live_model_dir, profile=args.live_profile, compare_sim=not args.no_sim_compare)


def _approaches(arg: str, default: tuple[str, ...]) -> list[str]:
    if arg == "all":
        return list(default)
    names = [a.strip() for a in arg.split(",") if a.strip()]
    for n in names:
        if n not in APPROACHES:
            raise ValueError(f"unknown approach {n!r}; known: {', '.join(APPROACHES)}")
    return names


def _options(args):
    from spotserve.experiment.data import data_dir
    from spotserve.experiment.runner import RunOptions

    return RunOptions(root=data_dir(args.data_dir), out=Path(args.out), grace_s=args.grace, startup_s=args.startup,
                      spot_usd_per_hour=args.spot_price, ondemand_usd_per_hour=args.ondemand_price,
                      max_batch=args.max_batch, gpu_memory_bytes=int(args.gpu_memory_gib * 2**30),
                      arrival_cv=args.arrival_cv, arrivals=args.arrivals, rate=args.rate,
                      seed=args.seed, progress=not args.no_progress)


def format_table(rows: dict[str, dict], title: str) -> str:
    """A small fixed-width table of the summary keys."""
    lines = [title, f"{'approach':24s} {'arrived':>7s} {'done':>6s} {'rej':>4s} {'unf':>4s} {'avg_s':>7s} "
                    f"{'p50_s':>7s} {'p90_s':>7s} {'p99_s':>7s} {'cost_usd':>9s} {'usd/1k_tok':>10s}"]
    f = lambda v, n=7, d=2: f"{v:{n}.{d}f}" if isinstance(v, (int, float)) else f"{'-':>{n}s}"  # noqa: E731
    for name, s in rows.items():
        lines.append(f"{name:24s} {s['arrived']:7d} {s['completed']:6d} {s['rejected']:4d} {s['unfinished']:4d} "
                     f"{f(s['avg_s'])} {f(s['p50_s'])} {f(s['p90_s'])} {f(s['p99_s'])} {f(s['cost_usd'], 9)} "
                     f"{f(s['usd_per_token'] * 1e3 if s['usd_per_token'] else None, 10, 4)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from spotserve.experiment import plots, runner
    from spotserve.experiment.data import FIDELITY_NOTE
    from spotserve.experiment.outputs import read_summary

    if args.command == "plot":
        out = Path(args.out)
        meta = json.loads((out / "summary.json").read_text()).get("_meta", {}) if (out / "summary.json").is_file() \
            else {}
        read_summary(out)
        kind = meta.get("kind", "e2e")
        made = [plots.latency_percentiles(out)]
        if kind in ("e2e", "workload", "ablation"):
            made.append(plots.latency_over_time(out))
        if kind == "cost":
            made.append(plots.cost_vs_latency(out))
        if kind == "ablation":
            made.append(plots.ablation_bars(out))
        print("figures:\n  " + "\n  ".join(str(p) for p in made))
        return 0
    opts = _options(args)
    t0 = time.perf_counter()
    if args.command == "demo":
        print(f"spotserve demo: 20B on trace Bs (spot, {opts.grace_s:.0f} s grace), paper workload 0.35 req/s")
        summ = runner.run_e2e("20B", "Bs", list(BASELINES), opts)
        out = opts.out / "e2e_20B_Bs"
        print(format_table(summ, f"\n20B x Bs ({FIDELITY_NOTE})"))
        best = min(v["p99_s"] for k, v in summ.items() if k != "spotserve")
        print(f"\nspotserve P99 / best baseline P99 = {summ['spotserve']['p99_s'] / best:.2f}")
        print(f"outputs in {out}/ (summary.json, requests_*.csv, events_*.jsonl)")
        print(f"figures: {out / 'latency_percentiles.png'}, {out / 'latency_over_time.png'}")
        print(f"({time.perf_counter() - t0:.1f} s)")
        if args.no_live:
            return 0
        from spotserve.experiment.live import demo_live_part

        return demo_live_part(opts.out)
    models = MODELS if getattr(args, "model", None) == "all" else (args.model,)
    traces = TRACES if getattr(args, "trace", None) == "all" else (getattr(args, "trace", None),)
    for model in models:
        if args.command == "e2e" and args.backend == "live":
            from spotserve.experiment.live import run_e2e_live

            lo = _live_options(args)
            for tr in traces:
                summ = run_e2e_live(model, tr, _approaches(args.approach, BASELINES), opts, lo)
                print(format_table(summ, f"\nlive: {model} x {tr} (tiny model, trace scaled to {lo.duration_s:.0f} s)"))
        elif args.command == "e2e":
            for tr in traces:
                summ = runner.run_e2e(model, tr, _approaches(args.approach, BASELINES), opts)
                print(format_table(summ, f"\n{model} x {tr}"))
        elif args.command == "ablation":
            for tr in traces:
                summ = runner.run_ablation(model, tr, opts, list(ABLATIONS))
                print(format_table(summ, f"\nablation {model} x {tr}"))
        elif args.command == "cost":
            summ = runner.run_cost(model, opts)
            print(format_table(summ, f"\ncost {model}: spot traces vs on-demand clusters"))
        elif args.command == "workload":
            for tname, summ in runner.run_workload(model, _approaches(args.approach, BASELINES), opts).items():
                print(format_table(summ, f"\nworkload {model} x {tname}"))
    print(f"\noutputs under {opts.out}/  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
