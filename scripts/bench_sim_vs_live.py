"""How well the simulator predicts the live cluster: `e2e --backend live` repeated, live / simulated
latency P50 and P99 per approach, against the simulator given the profile calibrated before the run
(`@sim`) and the same profile re-fitted to the run's own step times (`@sim-refit`,
spotserve/live/refit.py), with the machine's speed drift between calibration and run (the refit's
scale). Prints a table; --json PATH writes the same figures.

    python scripts/bench_sim_vs_live.py --repeats 3 [--approach spotserve] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path


def run_once(args, out: Path) -> dict:
    from spotserve.experiment.__main__ import main

    cmd = ["e2e", "--backend", "live", "--model", args.model, "--trace", args.trace, "--out", str(out),
           "--no-progress", "--live-requests", str(args.requests)]
    if args.approach:
        cmd += ["--approach", args.approach]
    if main(cmd) != 0:
        raise RuntimeError(f"e2e --backend live failed: {cmd}")
    cell = next(out.glob("e2e_*_live"))
    return json.loads((cell / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="20B")
    ap.add_argument("--trace", default="Bs")
    ap.add_argument("--approach", default="spotserve", help="comma list; empty: all three")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()

    rows = []
    for rep in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="bench-sim-live-") as tmp:
            summ = run_once(args, Path(tmp))
        for name, s in summ.items():
            if name.startswith("_") or "@" in name:
                continue
            pre, fit = s["live_over_sim"], s["live_over_sim_refit"]
            rows.append({"repeat": rep, "approach": name, "live_p50_s": s["p50_s"], "live_p99_s": s["p99_s"],
                         "sim_p50": pre["p50"], "sim_p99": pre["p99"], "refit_p50": fit["p50"], "refit_p99": fit["p99"],
                         "speed_prefill": fit["scale"]["prefill"], "speed_decode": fit["scale"]["decode"]})
    head = ("rep", "approach", "live P50", "live P99", "/sim P50", "/sim P99", "/refit P50", "/refit P99",
            "speed pf", "speed dec")
    print(" | ".join(head))
    for r in rows:
        print(" | ".join([str(r["repeat"]), r["approach"], f"{r['live_p50_s'] * 1e3:.1f} ms",
                          f"{r['live_p99_s'] * 1e3:.1f} ms"] + [f"{r[k]:.3f}" for k in (
                              "sim_p50", "sim_p99", "refit_p50", "refit_p99", "speed_prefill", "speed_decode")]))

    def worst(key):
        return max(max(r[key], 1 / r[key]) for r in rows)

    agg = {k: {"worst_ratio": round(worst(k), 4), "median": round(statistics.median(r[k] for r in rows), 4)}
           for k in ("sim_p50", "sim_p99", "refit_p50", "refit_p99")}
    agg["within_25pct"] = {"sim": all(worst(k) <= 1.25 for k in ("sim_p50", "sim_p99")),
                           "refit": all(worst(k) <= 1.25 for k in ("refit_p50", "refit_p99"))}
    print("worst live/sim ratio (either way):", {k: v["worst_ratio"] for k, v in agg.items() if k != "within_25pct"},
          "within 25%:", agg["within_25pct"])
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": agg, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
