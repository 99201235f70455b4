"""Re-fit a live-path profile to the step times a live run measured (its ``batch_done`` events).

The calibration (live/calibrate.py) times the workers minutes before a run; a shared machine's speed
drifts over minutes (other tenants, frequency), so the simulator given that profile predicts a
machine that was, not the one that served. To check the simulator as a model of the system (its
queueing, batching, stops and reconfigurations) rather than of the machine's drift, the run's own
batches re-scale the profile: per-batch ratios of measured to predicted prefill and decode-step
time, split into warm and cold batches (idle at least ``idle_s`` before, as the calibration splits
them); the warm medians scale the tables, the cold / warm medians become the cold factors, and each
batch's ratio to its group's median becomes a ``step_jitter`` sample. Batches that resumed requests
count for the decode step only (their prefill is partial or absent). The run's reconfigurations
(``configured`` events after the first) replace the profile's ``configure_s``, which the simulator
pays as the engine start of every replica a plan rebuilds.
"""
from __future__ import annotations

import copy
import math
import statistics

from spotserve.planner.cost import CostModel

DEFAULT_IDLE_S = 0.2


def batch_ratios(events: list[dict], cost: CostModel) -> list[dict]:
    """One {"cold", "prefill", "decode"} per timed batch: measured / the cost model's prediction
    ("prefill" None for a batch with resumed requests, "decode" None for a batch with no decode step)."""
    out = []
    for e in events:
        if e.get("event") != "batch_done":
            continue
        pp, tp, n = int(e["pp"]), int(e["tp"]), int(e["size"])
        m = min(int(e.get("m", 1)), n)
        pf = None
        if e["fresh"] and e["prefill_s"] > 0:
            pf = e["prefill_s"] / float(cost.prefill_seconds(pp, tp, n, m, int(round(e["prompt"]))))
        dec = None
        if e["decode_steps"] > 0 and e["decode_s"] > 0:
            dec = e["decode_s"] / e["decode_steps"] / float(cost.decode_round_seconds(pp, tp, n, m))
        idle = e.get("idle_s")
        out.append({"idle_s": math.inf if idle is None else float(idle), "prefill": pf, "decode": dec})
    return out


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def refit_profile(profile: dict, events: list[dict], cost: CostModel) -> dict:
    """A copy of `profile` (the live-path profile dict `cost` was built from) scaled to the run's
    measured step times, with the run's spread as its ``step_jitter`` and a ``refit`` record of the
    factors. ValueError when no batch of the run was timed."""
    rows = batch_ratios(events, cost)
    if not any(r["prefill"] for r in rows) or not any(r["decode"] for r in rows):
        raise ValueError("refit: the run timed no fresh batch with decode steps (no batch_done events)")
    old = profile.get("step_jitter") or {}
    idle_s = float(old.get("idle_s", DEFAULT_IDLE_S))
    old_cold = old.get("cold", {})
    groups = {g: [r for r in rows if (r["idle_s"] >= idle_s) == (g == "cold")] for g in ("warm", "cold")}
    med = {g: {k: _median(r[k] for r in groups[g]) for k in ("prefill", "decode")} for g in groups}
    scale, cold = {}, {}
    for k in ("prefill", "decode"):
        w, c = med["warm"][k], med["cold"][k]
        # cold factor: measured in this run when both kinds of batch ran, else the calibration's
        cold[k] = c / w if (w and c) else float(old_cold.get(k, 1.0))
        scale[k] = w if w else c / cold[k]
    samples = []
    for g, rs in groups.items():
        f = {k: scale[k] * (cold[k] if g == "cold" else 1.0) for k in scale}
        samples += [[round(r["prefill"] / f["prefill"], 4), round(r["decode"] / f["decode"], 4)]
                    for r in rs if r["prefill"] and r["decode"]]
    if not samples:
        raise ValueError("refit: no batch timed both a prefill and a decode step")
    out = copy.deepcopy(profile)
    for key, table in out.items():
        if key.startswith("tp-") and isinstance(table, dict):
            for cell in table.values():
                cell["init"] *= scale["prefill"]
                cell["incr"] *= scale["decode"]
    out["pp_init_comm"] = profile.get("pp_init_comm", 0.0) * scale["prefill"]
    out["pp_incr_comm"] = profile.get("pp_incr_comm", 0.0) * scale["decode"]
    out["embed"] = [x * scale["prefill"] for x in profile.get("embed", [])]
    out["step_jitter"] = {"samples": samples, "idle_s": idle_s,
                          "cold": {k: round(v, 4) for k, v in cold.items()}}
    # the fixed cost of a reconfiguration as the run paid it (the first configure loads the checkpoint)
    configured = [e["seconds"] for e in events if e.get("event") == "configured"][1:]
    if configured:
        out["configure_s"] = [round(x, 4) for x in configured]
    out["name"] = f"{profile.get('name', 'profile')}-refit"
    out["refit"] = {"batches": len(rows), "warm": len(groups["warm"]), "cold": len(groups["cold"]),
                    "scale": {k: round(v, 4) for k, v in scale.items()}}
    return out
