"""Measure the cost-model profile through the live path itself: real worker processes, driven step by step.

profile.py times a lone in-process engine; a live step also pays the controller round trip, the
message encoding and gloo collectives between processes, which on a small model dominate. Here a
few workers are started, configured as (pp, tp) in {(1,1), (1,2), (2,1)} and timed from the
controller for each batch size: prefill step and decode step. Per-layer times are the step times
/ layers (all overheads folded in, as the cost model only knows layers); the pipeline hop is what
pp=2 adds over pp=1, split over its hops. Output: the profile JSON of spotserve.planner.profiles.

    python -m spotserve.live.calibrate --model-dir DIR --out profile.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import tempfile
import time
from pathlib import Path

from spotserve.live.launcher import LocalLauncher
from spotserve.live.pool import WorkerPool
from spotserve.live.profile import BATCHES, measure
from spotserve.live.state import StateStore

LAYOUTS = ((1, 1), (1, 2), (2, 1))


async def _time_layout(conns, cid, pp, tp, store_port, batch, prompt_len, steps, vocab,
                       state=None) -> tuple[float, float]:
    """(prefill s, decode step s) of a batch, as the live backend pays them: the add_requests round
    trip in the prefill, and each step's tokens committed to a StateStore (`state`) in the step."""
    cfg = {"pp": pp, "tp": tp, "store_host": "127.0.0.1", "store_port": store_port, "block_size": 8,
           "num_blocks": 256, "max_batch": max(BATCHES), "timeout_s": 30.0}
    use = conns[:pp * tp]
    await asyncio.gather(*(c.call("configure", {"config_id": cid, "config": cfg, "position":
                                                {"replica": 0, "stage": r // tp, "shard": r % tp}}, 120)
                           for r, c in enumerate(use)))
    best_p, best_d = float("inf"), float("inf")
    for rep in range(2):
        reqs = [{"id": f"{cid}-{rep}-{i}", "prompt": [(5 * i + k) % vocab for k in range(prompt_len)], "output": [],
                 "params": {"max_new_tokens": steps + 1}} for i in range(batch)]
        sampler = (pp - 1) * tp  # first shard of the last stage returns the tokens
        if state is not None:
            for r in reqs:
                state.add(r["id"], r["prompt"], r["params"])
        t0 = time.perf_counter()
        await asyncio.gather(*(c.call("add_requests", {"requests": reqs}) for c in use))
        _commit(state, (await asyncio.gather(*(c.call("step", {"config_id": cid, "step": 0}) for c in use)))[sampler],
                0)
        best_p = min(best_p, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(steps):
            got = await asyncio.gather(*(c.call("step", {"config_id": cid, "step": s + 1}) for c in use))
            _commit(state, got[sampler], s + 1)
        best_d = min(best_d, (time.perf_counter() - t0) / steps)
    return best_p, best_d


def _commit(state, reply, index: int) -> None:
    if state is None:
        return
    with state.transaction():
        for sid, tok in reply.body["tokens"].items():
            state.commit(sid, index, [int(tok)])


async def _measure(model_dir: str, prompt_len: int, steps: int) -> dict:
    import torch.distributed as dist

    from spotserve.models.loader import CheckpointReader

    spec = CheckpointReader(model_dir).spec
    run = Path(tempfile.mkdtemp(prefix="spotserve-calibrate-"))
    token = secrets.token_hex(16).encode()
    (run / "token").write_bytes(token)
    pool = WorkerPool(token, heartbeat_timeout_s=10.0)
    port = await pool.start()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launcher = LocalLauncher(f"127.0.0.1:{port}", run / "token", model_dir, run / "logs")
    state = StateStore(run / "state.sqlite")
    try:
        conns = await pool.wait_for(launcher.spawn("cal", 2), 180)
        times, cid = {}, 0
        for pp, tp in LAYOUTS:
            if not spec.valid_tp(tp) or pp > spec.num_layers:
                continue
            for b in BATCHES:
                cid += 1
                times[(pp, tp, b)] = await _time_layout(conns, cid, pp, tp, store.port, b, prompt_len, steps,
                                                        spec.vocab, state)
        return {"times": times, "spec": spec}
    finally:
        launcher.close()
        await pool.close()
        state.close()


def measure_live(model_dir: str, prompt_len: int = 16, steps: int = 6, gpus_per_instance: int = 2) -> dict:
    """The live-path profile of `model_dir` on this machine (starts two worker processes)."""
    got = asyncio.run(_measure(model_dir, prompt_len, steps))
    times, spec = got["times"], got["spec"]
    L = spec.num_layers
    prof = measure(model_dir, prompt_len, steps=4, tps=(1,), gpus_per_instance=gpus_per_instance)
    prof["name"] = f"live-path-{spec.name}"
    prof.pop("derived", None)
    for tp in sorted({tp for pp, tp, _ in times if pp == 1}):
        prof[f"tp-{tp}"] = {f"bsz-{b}": {"init": times[(1, tp, b)][0] / L * 1e3, "incr": times[(1, tp, b)][1] / L * 1e3}
                            for b in BATCHES}
    if all((2, 1, b) in times for b in BATCHES):
        # pp=2 adds (per the cost model) 2 decode hops and 1 prefill hop over pp=1
        prof["pp_incr_comm"] = max(0.0, min((times[(2, 1, b)][1] - times[(1, 1, b)][1]) / 2 for b in BATCHES)) * 1e3
        prof["pp_init_comm"] = max(0.0, min(times[(2, 1, b)][0] - times[(1, 1, b)][0] for b in BATCHES)) * 1e3
    return prof


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gpus-per-instance", type=int, default=2)
    args = ap.parse_args(argv)
    prof = measure_live(args.model_dir, args.prompt_len, gpus_per_instance=args.gpus_per_instance)
    Path(args.out).write_text(json.dumps(prof, indent=1))
    print(f"wrote {args.out}: decode step {prof['tp-1']['bsz-1']['incr'] * prof['layer_num']:.2f} ms at batch 1 "
          f"(tp 1), pipeline hop {prof['pp_incr_comm']:.2f} ms")


if __name__ == "__main__":
    main()
