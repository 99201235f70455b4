"""Simulator speed: a 20-minute trace on 48 GPUs, the paper cells, and the full 10.8-hour g4dn trace.

Targets (issue 7): 20-minute trace with 48 GPUs < 5 s; full g4dn.csv trace < 60 s.
Prints a table; `--json PATH` writes the same figures.
"""
from __future__ import annotations

import argparse
import json
import time

from spotserve.cloud.availability import load_availability, parse_availability_lines
from spotserve.controller.approach import get_approach
from spotserve.experiment.data import data_dir, load_cost, load_trace, model_setting
from spotserve.sim.run import SimConfig, simulate
from spotserve.sim.traces import gamma_arrivals, load_arrivals


def trace_48_gpus():
    """20 minutes on 12 instances (48 GPUs) with two preemptions and two acquisitions."""
    rows = [[0, "add", {"nodes": [f"n{i}" for i in range(12)]}], [300_000, "remove", {"nodes": ["n3"]}],
            [480_000, "add", {"nodes": ["n12"]}], [720_000, "remove", {"nodes": ["n5", "n7"]}],
            [900_000, "add", {"nodes": ["n13", "n14"]}], [1_200_000, "DONE", {"nodes": []}]]
    return parse_availability_lines([json.dumps(r) for r in rows], "48-gpu")


def timed(cost, trace, arrivals, approach):
    t = time.perf_counter()
    res = simulate(cost, trace, arrivals, get_approach(approach), SimConfig())
    return time.perf_counter() - t, res.summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="write the figures to this path")
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    root = data_dir(args.data_dir)
    rows = []

    def add(case, model, approach, secs, s, target=None):
        rows.append({"case": case, "model": model, "approach": approach, "wall_s": round(secs, 3),
                     "requests": s["arrived"], "completed": s["completed"], "target_s": target,
                     "ok": None if target is None else secs < target})

    c67 = load_cost("6.7B", root)
    arr15 = load_arrivals(root / "arrivals" / "query6144_tpt1.5_cv6.txt")
    tr = trace_48_gpus()
    for ap_ in ("spotserve", "reparallelization", "rerouting"):
        add("20 min, 48 GPUs", "6.7B", ap_, *timed(c67, tr, arr15, ap_), target=5.0)
    for model in ("6.7B", "20B", "30B"):
        cost = load_cost(model, root)
        arr = load_arrivals(root / "arrivals" / model_setting(model).arrivals)
        add("paper cell As", model, "spotserve", *timed(cost, load_trace("As", root), arr, "spotserve"))
    g4 = load_availability(root / "availability" / "g4dn.csv")
    arr_g = gamma_arrivals(1.5, 1.0, g4.duration, seed=0)
    for ap_ in ("spotserve", "reparallelization", "rerouting"):
        add("g4dn.csv 10.8 h (<=96 GPUs)", "6.7B", ap_, *timed(c67, g4, arr_g, ap_), target=60.0)

    print(f"{'case':30s} {'model':5s} {'approach':18s} {'requests':>8s} {'done':>7s} {'wall_s':>8s} {'target':>7s}")
    for r in rows:
        tgt = "" if r["target_s"] is None else f"<{r['target_s']:.0f}s {'ok' if r['ok'] else 'MISS'}"
        print(f"{r['case']:30s} {r['model']:5s} {r['approach']:18s} {r['requests']:8d} {r['completed']:7d} "
              f"{r['wall_s']:8.3f} {tgt:>7s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
