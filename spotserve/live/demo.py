"""A one-minute live demo on CPU: a tiny random model on worker processes, one preemption with notice
and one SIGKILL without, and what happened to each request (checked against an uninterrupted run).

    python -m spotserve.live.demo [--out DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import signal
import tempfile
import threading
from pathlib import Path


def _reference(model_dir: str, reqs) -> list[list[int]]:
    from spotserve.engine.config import EngineConfig
    from spotserve.engine.engine import Engine
    from spotserve.engine.sequence import SamplingParams

    eng = Engine(EngineConfig(model_dir, max_batch=64, num_blocks=1024))
    for i, (p, n) in enumerate(reqs):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=n))
    out = eng.run()
    return [out[str(i)] for i in range(len(reqs))]


async def _run(model_dir: str, profile: str, run_dir: str, reqs, say) -> list[dict]:
    from spotserve.live.service import LiveConfig, LiveService

    svc = LiveService(LiveConfig(model_dir, profile, run_dir, gpus_per_instance=2, rate=200.0, grace_s=2.0))
    try:
        return await _drive(svc, reqs, say)
    finally:  # on any error or timeout too: every worker process is SIGKILLed, no orphans
        await svc.close()


async def _drive(svc, reqs, say) -> list[dict]:
    say("starting instances i0, i1, i2 (2 worker processes each)...")
    await svc.start(["i0", "i1", "i2"])
    svc.backend.step_pause_s = 0.02  # slow enough to watch

    async def chaos():
        await asyncio.sleep(1.5)
        busy = sorted({rt.slots[0].split('/')[0] for rt in svc.backend.replicas.values() if rt.batch is not None})
        victim = busy[0] if busy else "i0"
        say(f"t={svc.backend.now():.1f}s notice for {victim}: SIGKILL in 2 s")
        svc.notice(victim, 2.0)
        await asyncio.sleep(3.0)
        for _ in range(2000):  # a worker of a replica that is decoding right now
            busy = [rt.slots[-1] for rt in svc.backend.replicas.values() if rt.batch is not None]
            if busy:
                say(f"t={svc.backend.now():.1f}s SIGKILL {busy[0]} (pid {svc.kill_worker(busy[0])}), no notice")
                return
            await asyncio.sleep(0.01)
        say("no replica was decoding: skipped the kill")

    lrs = []
    task = asyncio.ensure_future(chaos())
    for p, n in reqs:
        lrs.append(svc.submit(p, n))
        await asyncio.sleep(0.4)
    await task
    await asyncio.wait_for(asyncio.gather(*(lr.wait() for lr in lrs)), 180)
    rows = []
    for lr in lrs:
        q = svc.rm.requests[lr.rid]
        rows.append({"id": lr.rid, "tokens": list(lr.tokens), "interruptions": q.interruptions,
                     "resumes": lr.resumes, "max_gap_s": lr.max_gap(), "recomputed": lr.recomputed})
    shown = {"reclaim": ("instance", "killed", "notice"), "worker_lost": ("worker", "why"),
             "configured": ("config_id", "seconds", "received_bytes", "checkpoint_bytes", "kv_bytes", "kv_moved",
                            "lost_kv", "planned_bytes")}  # the full events are in the run's log
    for e in svc.backend.events:
        if e["event"] in shown:
            say(f"t={e['t']:.2f}s {e['event']} " + ", ".join(f"{k}={e[k]}" for k in shown[e["event"]] if k in e))
    for r in svc.recoveries:
        say(f"request {r['request']}: next token {r['seconds']:.3f} s after its worker was killed")
    for r in svc.notice_to_serving:
        say(f"notice for {r['instance']} -> serving on the new config after {r['seconds']:.2f} s")
    return rows


def run_live_demo(out_dir: str | None = None, say=print, n_requests: int = 16, timeout_s: float = 300.0) -> list[dict]:
    """Run the demo; returns one row per request (and prints what happened).

    `out_dir` keeps the model, profile and run logs (reused by a later run); without it everything
    lives in a temporary folder removed at the end. Raises TimeoutError past `timeout_s`; on any
    error, timeout, Ctrl-C or SIGTERM every worker process started here is killed first.
    """
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="spotserve-live-demo-"))
    old_term = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _term)  # turn SIGTERM into SystemExit so the cleanup runs
    try:
        return _demo(root, say, n_requests, timeout_s)
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, old_term)
        if not out_dir:
            shutil.rmtree(root, ignore_errors=True)


def _term(signum, frame):
    raise SystemExit(128 + signum)


def _demo(root: Path, say, n_requests: int, timeout_s: float) -> list[dict]:
    from spotserve.live.calibrate import cached_profile
    from spotserve.models import get_spec
    from spotserve.models.checkpoint import write_random_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    model = root / "opt-tiny"
    if not (model / "config.json").is_file():
        write_random_checkpoint(get_spec("opt-tiny"), model, seed=0, dtype="fp32")
    profile = asyncio.run(cached_profile(str(model), root, gpus_per_instance=2, say=say))
    rng = random.Random(0)
    reqs = [([rng.randrange(160) for _ in range(rng.randint(4, 12))], rng.randint(40, 80)) for _ in range(n_requests)]
    want = _reference(str(model), reqs)
    run_dir = tempfile.mkdtemp(prefix="run-", dir=root)  # fresh state: nothing restored from an older run

    async def bounded():
        return await asyncio.wait_for(_run(str(model), str(profile), run_dir, reqs, say), timeout_s)

    rows = asyncio.run(bounded())
    say(f"{'req':>4} {'tokens':>6} {'interrupted':>11} {'resumed':<28} {'max gap s':>9} {'= uninterrupted':>15}")
    for r, w in zip(rows, want):
        how = ", ".join(f"{x['how']}@{x['at']}" for x in r["resumes"]) or "-"
        r["identical"] = r["tokens"] == w
        say(f"{r['id']:>4} {len(r['tokens']):>6} {r['interruptions']:>11} {how:<28} {r['max_gap_s']:>9.3f} "
            f"{'yes' if r['identical'] else 'NO':>15}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    rows = run_live_demo(args.out)
    if not all(r["identical"] for r in rows):
        raise SystemExit("some outputs differ from the uninterrupted run")


if __name__ == "__main__":
    main()
