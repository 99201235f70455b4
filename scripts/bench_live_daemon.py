"""What the context daemon costs and saves in the live cluster (CPU): configure seconds and bytes, daemon off vs on.

Two worker processes of one instance (a LocalLauncher, the LiveBackend, a stand-in controller) go
through: a first load (tp=2, every shard from the checkpoint), a reshape (tp=2 -> pp=2 with the
slots swapped: shards move worker to worker), then a crash of one worker process alone, restarted
on its slot, and a configure of the same layout. With the daemon on, the restarted worker
re-attaches its shards (its hello says so) and reads no checkpoint byte; off, it reads its shard
again. Prints a table; --json PATH writes the same figures.

    python scripts/bench_live_daemon.py [--size tiny|small] [--repeat 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace


class Controller:
    """Stand-in for the controller: the backend reports finished plans here."""

    def __init__(self):
        self.plans: asyncio.Queue = asyncio.Queue()
        self.approach = SimpleNamespace(mode="spotserve")

    def attach(self, backend):
        self.backend = backend

    def on_plan_done(self, plan_id):
        self.plans.put_nowait(plan_id)

    def on_batch_done(self, *args, **kwargs):
        pass


def _plan(pp: int, tp: int, slots: list[str]):
    from spotserve.planner.types import ParallelConfig, ReconfigurationPlan

    cfg = ParallelConfig(1, pp, tp, 4)
    return ReconfigurationPlan(cfg, {p: slots[i] for i, p in enumerate(cfg.positions())}, [], 0.0)


async def scenario(ckpt: str, run_dir: Path, daemon: bool) -> dict:
    import torch.distributed as dist

    from spotserve.live.backend import LiveBackend
    from spotserve.live.launcher import LocalLauncher
    from spotserve.live.pool import WorkerPool

    token = secrets.token_hex(16).encode()
    (run_dir / "token").write_bytes(token)
    pool = WorkerPool(token, heartbeat_timeout_s=10.0)
    port = await pool.start()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    launcher = LocalLauncher(f"127.0.0.1:{port}", run_dir / "token", ckpt, run_dir / "logs")
    out = {}
    try:
        await pool.wait_for(launcher.spawn("b0", 2), 120)
        ctl = Controller()
        be = LiveBackend(pool, {}, {"block_size": 8, "num_blocks": 64, "max_batch": 4, "timeout_s": 30.0,
                                    "store_port": store.port, "daemon": daemon})
        be.attach(ctl)
        steps = [("first_load", _plan(1, 2, ["b0/g0", "b0/g1"])), ("reshape", _plan(2, 1, ["b0/g1", "b0/g0"]))]
        for k, (label, plan) in enumerate(steps):
            be.execute_plan(plan, k, 0.0)
            await asyncio.wait_for(ctl.plans.get(), 120)
            out[label] = be.migrations[-1]
        victim = "b0/g0"  # stage 1 of pp=2: layers only it holds
        os.kill(pool.alive(victim).pid, signal.SIGKILL)
        while pool.alive(victim) is not None:
            await asyncio.sleep(0.005)
        t0 = time.perf_counter()
        launcher.respawn(victim)
        conn = (await pool.wait_for([victim], 120))[0]
        out["respawn_to_hello_s"] = time.perf_counter() - t0
        out["attached_bytes"] = int(conn.hello.get("attached_bytes") or 0)
        # what the restarted worker holds, from its hello (nothing with the daemon off)
        be.held[victim] = tuple(conn.hello["holds"]) if conn.hello.get("holds") else None
        be.execute_plan(_plan(2, 1, ["b0/g1", "b0/g0"]), 2, 0.0)
        await asyncio.wait_for(ctl.plans.get(), 120)
        out["after_restart"] = be.migrations[-1]
        t0 = time.perf_counter()
        launcher.kill("b0")
        out["kill_s"] = time.perf_counter() - t0
        return out
    finally:
        launcher.close()
        await pool.close()


def _checkpoint(size: str, root: Path) -> str:
    from spotserve.models import get_spec
    from spotserve.models.checkpoint import write_random_checkpoint

    spec = get_spec("opt-tiny")
    if size == "small":  # ~26M parameters: per-buffer costs against real copies
        spec = replace(spec, name="opt-small", num_layers=8, hidden=512, num_heads=8, ffn=2048, vocab=8192,
                       max_positions=256)
    path = root / spec.name
    write_random_checkpoint(spec, path, seed=0, dtype="fp32")
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=["tiny", "small"], default="small")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp:
        ckpt = _checkpoint(args.size, Path(tmp))
        for r in range(args.repeat):
            for mode in ("off", "on"):  # interleaved: machine noise hits both alike
                d = Path(tmp) / f"{mode}{r}"
                d.mkdir()
                rows[mode].append(asyncio.run(scenario(ckpt, d, mode == "on")))
    fig = {}
    for mode, runs in rows.items():
        med = lambda f: statistics.median(f(x) for x in runs)  # noqa: E731
        fig[mode] = {
            "first_load_s": med(lambda x: x["first_load"]["seconds"]),
            "first_load_checkpoint_bytes": runs[0]["first_load"]["checkpoint_bytes"],
            "reshape_s": med(lambda x: x["reshape"]["seconds"]),
            "reshape_moved_bytes": runs[0]["reshape"]["received_bytes"],
            "reshape_checkpoint_bytes": runs[0]["reshape"]["checkpoint_bytes"],
            "respawn_to_hello_s": med(lambda x: x["respawn_to_hello_s"]),
            "attached_bytes": runs[0]["attached_bytes"],
            "after_restart_s": med(lambda x: x["after_restart"]["seconds"]),
            "after_restart_checkpoint_bytes": runs[0]["after_restart"]["checkpoint_bytes"],
            "kill_s": med(lambda x: x["kill_s"]),
        }
    keys = list(fig["off"])
    print(f"size={args.size} repeat={args.repeat} (medians; bytes of the first run)")
    print(f"{'figure':32s} {'daemon off':>14s} {'daemon on':>14s}")
    for k in keys:
        a, b = fig["off"][k], fig["on"][k]
        fmt = (lambda v: f"{v:14.4f}") if k.endswith("_s") else (lambda v: f"{int(v):14d}")
        print(f"{k:32s} {fmt(a)} {fmt(b)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "repeat": args.repeat, **fig}, indent=1))


if __name__ == "__main__":
    main()
