"""Measure the cost-model profile through the live path itself: real worker processes, driven step by step.

profile.py times a lone in-process engine; a live step also pays the controller round trip, the
message encoding and gloo collectives between processes, which on a small model dominate. Here
two workers are started, configured as (pp, tp) in {(1,1), (1,2), (2,1)} and timed from the
controller for each batch size as the live backend drives a batch: the add_requests round trip
and the prefill step, then decode steps whose tokens are committed to a StateStore. Each batch
size gets a warm-up run (discarded), then `reps` rounds over the batch sizes, each round a "cold"
run (after `idle_s` of idleness, as a replica meets a request at light load) and a "warm" one
(right after it, as under load). The profile's tables take the median over warm runs of the
prefill and of the mean decode step (the steady state the planner's throughput model assumes);
the median keeps one run disturbed by another process from moving it. Per-layer times are the
step times / layers (all overheads folded in, as the cost model only knows layers); the pipeline
hop is what pp=2 adds over pp=1, split over its hops.

The spread is recorded too, in the optional field ``step_jitter`` that the planner ignores and the
simulator replays (spotserve/sim/jitter.py): every timed run's prefill and mean decode step over the
median of its (layout, batch size, cold|warm) cell, and the cold / warm median ratios. Rounds
interleave the batch sizes and the idle pauses spread them over ~10 s, so the samples see the
machine's slow and quiet moments rather than one instant. Each layout's configure round (process
groups + engine start) is timed too: ``configure_s`` and the ``reconfigure_margin_s`` the planner keeps
free before a deadline (profile.reconfigure_margin). Output: the profile JSON of
spotserve.planner.profiles, with a "measured" record (method, model, slots per instance) that
`python -m spotserve.live` uses to reuse a cached profile.

    python -m spotserve.live.calibrate --model-dir DIR --out profile.json
"""
from __future__ import annotations

import asyncio
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from spotserve.live.launcher import LocalLauncher
from spotserve.live.pool import WorkerPool
from spotserve.live.profile import BATCHES, base_profile, profile_cli, reconfigure_margin
from spotserve.live.state import StateStore

LAYOUTS = ((1, 1), (1, 2), (2, 1))
METHOD = "live-path"
IDLE_S = 0.2  # idleness before a cold run: longer than any pause between a replica's back-to-back batches


async def _time_batch(use, cid: int, sampler: int, batch: int, prompt_len: int, steps: int, vocab: int,
                      state, tag: str) -> tuple[float, float]:
    """(prefill s, mean decode step s) of one batch, as the live backend pays them: the add_requests
    round trip in the prefill, and each step's tokens committed to the StateStore `state`."""
    reqs = [{"id": f"{tag}-{i}", "prompt": [(5 * i + k) % vocab for k in range(prompt_len)], "output": [],
             "params": {"max_new_tokens": steps + 1}} for i in range(batch)]
    for r in reqs:
        state.add(r["id"], r["prompt"], r["params"])
    t0 = time.perf_counter()
    await asyncio.gather(*(c.call("add_requests", {"requests": reqs}) for c in use))
    _commit(state, (await asyncio.gather(*(c.call("step", {"config_id": cid, "step": 0}) for c in use)))[sampler], 0)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(steps):
        got = await asyncio.gather(*(c.call("step", {"config_id": cid, "step": s + 1}) for c in use))
        _commit(state, got[sampler], s + 1)
    return prefill, (time.perf_counter() - t0) / steps


async def _time_layout(conns, cid: int, pp: int, tp: int, store_port: int, prompt_len: int, steps: int, reps: int,
                       vocab: int, state, idle_s: float, configure_s: list[float]
                       ) -> dict[int, dict[str, list[tuple[float, float]]]]:
    """Batch size -> {"cold": [(prefill s, decode step s), ...], "warm": [...]} on one replica of (pp, tp);
    appends the seconds its configure round (process groups + engine start) took to `configure_s`."""
    cfg = {"pp": pp, "tp": tp, "store_host": "127.0.0.1", "store_port": store_port, "block_size": 8,
           "num_blocks": 256, "max_batch": max(BATCHES), "timeout_s": 30.0}
    use = conns[:pp * tp]
    t0 = time.perf_counter()
    await asyncio.gather(*(c.call("configure", {"config_id": cid, "config": cfg, "position":
                                                {"replica": 0, "stage": r // tp, "shard": r % tp}}, 120)
                           for r, c in enumerate(use)))
    configure_s.append(time.perf_counter() - t0)
    sampler = (pp - 1) * tp  # first shard of the last stage returns the tokens
    run = lambda b, tag: _time_batch(use, cid, sampler, b, prompt_len, steps, vocab, state,  # noqa: E731
                                     f"{cid}-{b}-{tag}")
    for b in BATCHES:
        await run(b, "warm-up")  # the first run warms caches and allocators up
    out = {b: {"cold": [], "warm": []} for b in BATCHES}
    for rep in range(reps):  # rounds over the batch sizes: each cell samples several moments
        for b in BATCHES:
            await asyncio.sleep(idle_s)
            out[b]["cold"].append(await run(b, f"c{rep}"))
            out[b]["warm"].append(await run(b, f"w{rep}"))
    return out


def jitter_record(runs: dict, idle_s: float) -> dict:
    """The profile's ``step_jitter`` (sim/jitter.py) from cell -> {"cold"|"warm": [(prefill, step), ...]}:
    every run's ratios to its cell's medians, and the median over cells of the cold / warm ratios."""
    samples, cold = [], {"prefill": [], "decode": []}
    for cell in runs.values():
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in cell.items()}
        for k, v in cell.items():
            samples += [[round(p / med[k][0], 4), round(d / med[k][1], 4)] for p, d in v]
        cold["prefill"].append(med["cold"][0] / med["warm"][0])
        cold["decode"].append(med["cold"][1] / med["warm"][1])
    return {"samples": samples, "idle_s": idle_s,
            "cold": {k: round(statistics.median(v), 4) for k, v in cold.items()}}


def _commit(state, reply, index: int) -> None:
    with state.transaction():
        for sid, tok in reply.body["tokens"].items():
            state.commit(sid, index, [int(tok)])


async def _measure(model_dir: str, prompt_len: int, steps: int, reps: int, idle_s: float,
                   configure_s: list[float]) -> tuple[dict, object]:
    import torch.distributed as dist

    from spotserve.models.loader import CheckpointReader

    spec = CheckpointReader(model_dir).spec
    run = Path(tempfile.mkdtemp(prefix="spotserve-calibrate-"))
    token = secrets.token_hex(16).encode()
    (run / "token").write_bytes(token)
    pool = WorkerPool(token, heartbeat_timeout_s=10.0)
    port = await pool.start()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launcher = LocalLauncher(f"127.0.0.1:{port}", run / "token", model_dir, run / "logs", reconnect_s=0.0)
    state = StateStore(run / "state.sqlite")
    try:
        conns = await pool.wait_for(launcher.spawn("cal", 2), 180)
        times = {}
        for cid, (pp, tp) in enumerate(LAYOUTS, start=1):
            if not spec.valid_tp(tp) or pp > spec.num_layers:
                continue
            for b, t in (await _time_layout(conns, cid, pp, tp, store.port, prompt_len, steps, reps, spec.vocab,
                                            state, idle_s, configure_s)).items():
                times[(pp, tp, b)] = t
        return times, spec
    finally:
        launcher.close()
        await pool.close()
        state.close()


async def measure_live_async(model_dir: str, prompt_len: int = 16, steps: int = 8, reps: int = 4,
                             gpus_per_instance: int = 2, idle_s: float = IDLE_S) -> dict:
    """The live-path profile of `model_dir` on this machine (starts two worker processes); for callers
    inside a running event loop (the live CLI). `steps` decode steps per timed batch, `reps` cold + warm
    runs per batch size and layout, `idle_s` of idleness before a cold run. Raises TimeoutError if
    the workers do not connect, ValueError for reps < 1 or steps < 1."""
    if reps < 1 or steps < 1 or idle_s < 0:
        raise ValueError(f"calibration needs reps >= 1, steps >= 1 and idle_s >= 0 (got {reps}, {steps}, {idle_s})")
    configure_s: list[float] = []
    runs, spec = await _measure(model_dir, prompt_len, steps, reps, idle_s, configure_s)
    times = {k: (statistics.median(r[0] for r in v["warm"]), statistics.median(r[1] for r in v["warm"]))
             for k, v in runs.items()}
    L = spec.num_layers
    prof = await asyncio.to_thread(base_profile, model_dir, prompt_len, gpus_per_instance=gpus_per_instance)
    prof["name"] = f"live-path-{spec.name}"
    prof["measured"] = measured_key(model_dir, gpus_per_instance, prompt_len)
    for tp in sorted({tp for pp, tp, _ in times if pp == 1}):
        prof[f"tp-{tp}"] = {f"bsz-{b}": {"init": times[(1, tp, b)][0] / L * 1e3, "incr": times[(1, tp, b)][1] / L * 1e3}
                            for b in BATCHES}
    if all((2, 1, b) in times for b in BATCHES):
        # pp=2 adds (per the cost model) 2 decode hops and 1 prefill hop over pp=1
        prof["pp_incr_comm"] = max(0.0, statistics.median((times[(2, 1, b)][1] - times[(1, 1, b)][1]) / 2
                                                          for b in BATCHES)) * 1e3
        prof["pp_init_comm"] = max(0.0, statistics.median(times[(2, 1, b)][0] - times[(1, 1, b)][0]
                                                          for b in BATCHES)) * 1e3
    prof["step_jitter"] = jitter_record(runs, idle_s)
    # the fixed cost of a reconfiguration, which the planner keeps free before a deadline
    prof["configure_s"] = [round(x, 4) for x in configure_s]
    prof["reconfigure_margin_s"] = reconfigure_margin(statistics.median(configure_s))
    return prof


def measure_live(model_dir: str, prompt_len: int = 16, steps: int = 8, reps: int = 4,
                 gpus_per_instance: int = 2, idle_s: float = IDLE_S) -> dict:
    """measure_live_async for callers without a running event loop."""
    return asyncio.run(measure_live_async(model_dir, prompt_len, steps, reps, gpus_per_instance, idle_s))


def measured_key(model_dir: str, gpus_per_instance: int, prompt_len: int) -> dict:
    """What a live-path profile was measured for; a cached profile is reused only for the same key."""
    return {"method": METHOD, "model_dir": str(Path(model_dir).resolve()), "gpus_per_instance": gpus_per_instance,
            "prompt_len": prompt_len}


async def cached_profile(model_dir: str, run_dir: str | Path, gpus_per_instance: int = 2, prompt_len: int = 16,
                         say=print) -> str:
    """Path of RUN_DIR/profile.json, measured through the live path now unless the file there was
    measured for the same model, slots per instance and prompt length (a restarted service reuses it,
    so it plans with the same profile)."""
    import json

    path = Path(run_dir) / "profile.json"
    key = measured_key(model_dir, gpus_per_instance, prompt_len)
    if path.is_file():
        try:
            if json.loads(path.read_text()).get("measured") == key:
                return str(path)
        except ValueError:
            pass  # unreadable: measured again
    say(f"measuring the live-path profile of {Path(model_dir).name} on this machine (2 worker processes)...")
    prof = await measure_live_async(model_dir, prompt_len, gpus_per_instance=gpus_per_instance)
    path.write_text(json.dumps(prof, indent=1))
    return str(path)


def main(argv: list[str] | None = None) -> None:
    profile_cli(argv, measure_live, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
