"""The live service side of scripts/bench_live_gpu.py: a LiveService on two 1-GPU instances driven wave by
wave (forced changes, a SIGKILL) and the figures of each change, from the backend's events and the plan."""
from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

CHANGES = ((1, 1, 2), (2, 1, 1), (1, 2, 1), (1, 1, 2))


def gpu_used_mib() -> list[int]:
    """MiB in use on each GPU (nvidia-smi; per-process figures are often hidden inside containers)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def drop_page_cache(model_dir: Path, device: str) -> str:
    """Evict the checkpoint from the page cache: drop_caches on the device machine (root), else (or on the
    shared CPU host) posix_fadvise(DONTNEED) on the checkpoint's files. Returns what was done."""
    note = ""
    if device == "cuda":
        try:
            os.sync()
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches=3"
        except OSError as exc:
            note = f"drop_caches not permitted ({exc.strerror}); "
    for f in model_dir.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return note + "posix_fadvise(DONTNEED) on the checkpoint"


class PerGpuLauncher:
    """Instances of one GPU each on this host, for LiveService: instance k's workers come from a LocalLauncher
    (and fork server) of its own whose environment lists the GPUs rotated to start at GPU k, so its slot g0
    (cuda:0) is GPU k while every GPU stays visible (hiding the other GPU with CUDA_VISIBLE_DEVICES=k would
    cut NCCL off CUDA IPC / NVLink and send it through host memory). gpus=0 (CPU): no rotation."""

    def __init__(self, make, gpus: int):
        self.make, self.gpus = make, gpus  # make(instance) -> LocalLauncher
        self.by_instance: dict = {}

    def prepare(self, instances: list[str]) -> None:
        """Start the instances' fork servers now (their imports overlap)."""
        for name in instances:
            self._of(name)

    def _of(self, instance: str):
        if instance not in self.by_instance:
            k = len(self.by_instance) % max(1, self.gpus)
            old = os.environ.get("CUDA_VISIBLE_DEVICES")
            if self.gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str((k + j) % self.gpus) for j in range(self.gpus))
            try:
                self.by_instance[instance] = self.make(instance)
            finally:
                if old is None:
                    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                else:
                    os.environ["CUDA_VISIBLE_DEVICES"] = old
        return self.by_instance[instance]

    @property
    def procs(self) -> dict:
        return {n: p for launcher in self.by_instance.values() for n, p in launcher.procs.items()}

    def spawn(self, instance: str, slots: int) -> list[str]:
        return self._of(instance).spawn(instance, slots)

    def adopt(self, instance: str, pids: dict, host: str | None = None) -> None:
        self._of(instance).adopt(instance, pids, host)

    def pid(self, name: str) -> int | None:
        return self._of(name.rsplit("/", 1)[0]).pid(name)

    def kill(self, instance: str) -> list[int]:
        launcher = self.by_instance.get(instance)
        return launcher.kill(instance) if launcher is not None else []

    def close(self) -> None:
        for launcher in self.by_instance.values():
            launcher.close()


def shape(c: tuple[int, int, int], batch: int):
    from spotserve.planner.types import ParallelConfig

    return ParallelConfig(c[0], c[1], c[2], batch, 1)


async def until(pred, timeout_s: float, what: str) -> None:
    t_end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > t_end:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(0.005)


class Session:
    """One LiveService (one approach) on instances i0 and i1, driven wave by wave."""

    def __init__(self, bench, name: str, approach: str, model_dir: Path, profile: Path, prompts: list[list[int]]):
        """`bench`: bench_live_gpu.Bench (settings, deadline, notes); `name`: the run folder's prefix."""
        self.b, self.name, self.approach, self.model_dir, self.profile = bench, name, approach, model_dir, profile
        self.prompts, self.s = prompts, bench.s

    def timeout(self) -> float:
        return max(1.0, min(self.s["wave_timeout_s"], self.b.left() - 3))

    async def start(self) -> None:
        from spotserve.live.launcher import LocalLauncher
        from spotserve.live.service import LiveConfig, LiveService

        s, cuda = self.s, self.b.args.device == "cuda"
        engine = {"block_size": s["block_size"], "max_batch": s["requests"], "timeout_s": s["timeout_s"],
                  "num_blocks": s["requests"] * -(-(s["prompt_len"] + s["output_len"]) // s["block_size"]) + 16,
                  "device": "cuda" if cuda else "cpu", "dtype": s["dtype"]}
        run_dir = Path(tempfile.mkdtemp(prefix=f"live-{self.name}-", dir=self.b.run_dir))
        cfg = LiveConfig(str(self.model_dir), str(self.profile), str(run_dir), gpus_per_instance=1,
                         approach=self.approach, rate=0.05, grace_s=5.0, prompt_len=s["prompt_len"],
                         output_len=s["output_len"], heartbeat_timeout_s=s["heartbeat_timeout_s"],
                         connect_timeout_s=min(150.0 if cuda else 60.0, self.b.left()), engine=engine)
        self.svc = svc = LiveService(cfg)
        await svc.listen()
        self.logs = run_dir / "logs"
        svc.launcher = PerGpuLauncher(lambda inst: LocalLauncher(svc.address, svc.token_file, str(self.model_dir),
                                                                 self.logs / inst, cfg.heartbeat_s), self.b.gpus)
        svc.launcher.prepare(["i0", "i1"])
        t0 = time.monotonic()
        try:
            await svc.start(["i0", "i1"])
        except Exception as exc:
            raise RuntimeError(f"service start failed: {exc}\n{self.log_tails()}") from None
        svc.backend.command_timeout_s = max(60.0, 2 * s["timeout_s"])
        await until(lambda: self.serving(None), self.timeout(), "first layout in place")
        first = svc.controller.plan.config.short()
        await self.force(shape(CHANGES[0], s["requests"]))
        self.start_info = {"start_s": round(time.monotonic() - t0, 2), "optimizer_first": first,
                           "workers": {n: c.pid for n, c in svc.pool.conns.items()}}
        if cuda:  # (1,1,2): each GPU holds half of the weights
            used = self.start_info["gpu_used_mib"] = gpu_used_mib()
            half = sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors")) / 2 / 2**20
            if len(used) < 2 or min(used[:2]) < 0.8 * half:
                self.b.missing(f"GPU memory in use {used} MiB < 80% of half the weights ({half:.0f} MiB) each: "
                               f"the workers may not run on both GPUs")

    def log_tails(self, lines: int = 12) -> str:
        """The last lines of every worker's log (why a worker did not connect or died)."""
        out = []
        for f in sorted(self.logs.rglob("*.log")):
            tail = f.read_text(errors="replace").strip().splitlines()[-lines:]
            out.append(f"--- {f.relative_to(self.logs)}\n" + "\n".join(tail))
        return "\n".join(out)

    def serving(self, cfg) -> bool:
        from spotserve.controller.controller import SERVING

        ctl, be = self.svc.controller, self.svc.backend
        if ctl.phase != SERVING or ctl.plan is None or (cfg is not None and ctl.plan.config != cfg):
            return False
        failed = [rt.failed for rt in be.replicas.values() if rt.ready.is_set() and rt.failed]
        if failed:
            raise RuntimeError(f"a replica failed to configure: {failed[0]}")
        return all(rt.ready.is_set() for rt in be.replicas.values())

    async def force(self, cfg) -> None:
        """The service-level reconfigure call, then wait until `cfg` serves."""
        self.svc.backend.emit("reconfigure", config=cfg.short(), reason="bench")
        self.svc.controller.reconfigure(cfg, reason="bench")
        await until(lambda: self.serving(cfg), self.timeout(), f"{cfg.short()} in place")

    def submit(self) -> list:
        return [self.svc.submit(p, self.s["output_len"]) for p in self.prompts]

    async def finish(self, lrs, limit_s: float | None = None) -> None:
        await asyncio.wait_for(asyncio.gather(*(lr.wait() for lr in lrs)), min(self.timeout(), limit_s or 1e9))

    async def reference(self) -> dict:
        t0 = time.monotonic()
        lrs = self.submit()
        await self.finish(lrs)
        self.ref = [list(lr.tokens) for lr in lrs]
        gaps = [b - a for lr in lrs for a, b in zip(lr.token_wall, lr.token_wall[1:])]
        return {"seconds": round(time.monotonic() - t0, 3), "config": self.svc.controller.plan.config.short(),
                "step_s_median": round(statistics.median(gaps), 5) if gaps else None,
                "max_gap_s": round(max(gaps, default=0.0), 4)}

    async def change(self, src, dst, p2p_bps: float | None, cold: bool) -> dict:
        """One wave; once every request has `trigger` tokens, force `dst`; the change's figures."""
        b = self.s
        target = shape(dst, b["requests"])
        lrs = self.submit()
        await until(lambda: all(len(lr.tokens) >= b["trigger"] for lr in lrs), self.timeout(), "wave decoding")
        cache = drop_page_cache(self.model_dir, self.b.args.device) if cold else None
        if cache and "not permitted" in cache:
            self.b.missing(f"cold page cache: {cache}")
        i0 = len(self.svc.backend.events)
        planned = {lr.sid: len(lr.prompt) + self.svc.rm.requests[lr.rid].committed for lr in lrs}  # the plan's view
        t_call = time.time()
        await self.force(target)
        plan = self.svc.controller.plan
        moved = {lr.sid: lr.kv_tokens for lr in lrs}  # cached positions of the KV that moved
        await self.finish(lrs)
        rec = {"from": ",".join(map(str, src)), "to": ",".join(map(str, dst)), "cold_cache": cache}
        rec.update(change_figures(self.svc.backend.events[i0:], plan, lrs, self.ref, t_call, p2p_bps,
                                  planned, moved, b["block_size"]))
        if rec["executor"] is None:
            self.b.missing("executor stats: the 'configured' event has no received_bytes / checkpoint_bytes "
                           "(the live path re-reads weights and relays KV; bytes_match not checked)")
        return rec

    async def kill(self, out: dict, victim: str = "i1/g0") -> None:
        """A wave; once every request has `trigger` tokens, SIGKILL `victim` (no notice). Fills `out` as it
        goes: a survivor that never recovers still leaves the kill's events in the JSON."""
        b, svc = self.s, self.svc
        lrs = self.submit()
        await until(lambda: all(len(lr.tokens) >= b["trigger"] for lr in lrs), self.timeout(), "wave decoding")
        i0 = len(svc.backend.events)
        t_kill = time.time()
        before = [len(lr.tokens) for lr in lrs]
        out.update(victim=victim, pid=svc.kill_worker(victim))

        def events() -> list[dict]:
            return [{"dt": round(e["wall"] - t_kill, 4), **{k: v for k, v in e.items() if k in KEYS}}
                    for e in svc.backend.events[i0:] if e["event"] in
                    ("worker_lost", "reclaim", "batch_error", "batch_abort", "configure", "configured", "cannot_serve")]
        try:
            await self.finish(lrs, b["kill_timeout_s"])
        finally:
            out["events"] = events()
        evs = svc.backend.events[i0:]
        lost = next((e for e in evs if e["event"] == "worker_lost"), None)
        conf = next((e for e in evs if e["event"] == "configured"), None)
        affected = [i for i, lr in enumerate(lrs) if before[i] < lr.max_tokens]
        nxt = [next((w for w in lrs[i].token_wall if w > t_kill), None) for i in affected]
        out.update({"affected": len(affected), "detect_s": round(lost["wall"] - t_kill, 4) if lost else None,
                    "every_next_token_s": round(max(nxt) - t_kill, 4) if nxt and None not in nxt else None,
                    "first_next_token_s": round(min(w for w in nxt if w) - t_kill, 4) if any(nxt) else None,
                    "recoveries_s": [r["seconds"] for r in svc.recoveries],
                    "config_after": svc.controller.plan.config.short() if svc.controller.plan else None,
                    "configure": {k: conf.get(k) for k in ("seconds", "loaded_bytes", "checkpoint_bytes",
                                                           "received_bytes", "lost_kv")} if conf else None,
                    **outcome(lrs, self.ref)})

    async def close(self) -> None:
        await self.svc.close()


def outcome(lrs, ref) -> dict:
    """Completion and tokens vs the uninterrupted reference."""
    diff = [i for i, lr in enumerate(lrs) if lr.tokens != ref[i]]
    first = {i: next((k for k, (x, y) in enumerate(zip(lrs[i].tokens, ref[i])) if x != y), None) for i in diff}
    return {"requests": len(lrs), "completed": sum(lr.done and len(lr.tokens) == lr.max_tokens for lr in lrs),
            "tokens_identical": not diff, "differing_requests": {str(i): first[i] for i in diff},
            "resumes": {h: sum(r["how"] == h for lr in lrs for r in lr.resumes) for h in ("kv", "prefill")},
            "recomputed_tokens": sum(lr.recomputed for lr in lrs),
            "mismatched_recomputed": sum(lr.mismatches for lr in lrs)}


KEYS = ("event", "config_id", "config", "seconds", "worker", "why", "error", "instance", "replica", "loaded_bytes",
        "checkpoint_bytes", "received_bytes", "failed")


def change_figures(evs: list[dict], plan, lrs, ref, t_call: float, p2p_bps: float | None, planned: dict,
                   moved: dict, block: int) -> dict:
    """Figures of one forced change from the backend's events since the call and the installed plan.

    Bytes: the executor's weight bytes (received less KV, plus checkpoint reads) must equal the plan's
    weight transfers exactly. The controller resizes the plan's KV transfers to the cache each stopped
    request holds (Backend.kv_tokens), so the plan's KV bytes of the moved requests must equal the
    executor's KV bytes; `kv_whole_blocks`: the executor moved whole KV blocks of `block` tokens (of
    the `moved` cached tokens) instead. `planned` is kept in the record for reference."""
    conf = next((e for e in evs if e["event"] == "configure"), None)
    done = next((e for e in evs if e["event"] == "configured" and conf and e["config_id"] == conf["config_id"]), None)
    t_conf = conf["wall"] if conf else t_call
    net = sum(t.nbytes for t in plan.transfers if t.src is not None and t.tensor != "kv")
    disk = sum(t.nbytes for t in plan.transfers if t.src is None)
    kv = sum(t.nbytes for t in plan.transfers if t.tensor == "kv")
    predicted = net + disk + kv
    kv_by_req: dict[str, int] = {}
    for t in plan.transfers:
        if t.tensor == "kv":
            kv_by_req[t.request] = kv_by_req.get(t.request, 0) + t.nbytes
    ex, match = None, None
    if done is not None and "received_bytes" in done and "checkpoint_bytes" in done:
        ex = {k: done.get(k) for k in ("sent_bytes", "received_bytes", "local_bytes", "checkpoint_bytes", "kv_bytes",
                                       "executor_s", "prepare_s", "group_s", "kv_moved", "lost_kv")}
        ex["moved_bytes"] = done["received_bytes"] + done["checkpoint_bytes"]
        ex["weight_bytes"] = ex["moved_bytes"] - (done.get("kv_bytes") or 0)
        kv_moved = set(done.get("kv_moved") or [])
        kv_expected = sum(b for r, b in kv_by_req.items() if r in kv_moved)
        kv_blocks = sum(b * -(-moved[r] // block) * block / moved[r] for r, b in kv_by_req.items()
                        if r in kv_moved and moved.get(r))
        ex["kv_expected_bytes"], ex["kv_whole_block_bytes"] = round(kv_expected), round(kv_blocks)
        match = {"weights": ex["weight_bytes"] == net + disk, "kv": done.get("kv_bytes") == round(kv_expected),
                 "kv_whole_blocks": done.get("kv_bytes") == round(kv_blocks) != round(kv_expected),
                 "kv_requests": kv_moved == set(kv_by_req), "total_as_planned": ex["moved_bytes"] == predicted}
    mig_s = done["seconds"] if done else None
    move_s = (ex or {}).get("executor_s") or mig_s
    moved_net = ex["received_bytes"] if ex else None
    # tokens after the configure event come from the new config (every replica changes in these changes)
    running = [lr for lr in lrs if sum(w <= t_conf for w in lr.token_wall) < lr.max_tokens]
    first_new = min((w for lr in lrs for w in lr.token_wall if w > t_conf), default=None)
    nxt = [next((w for w in lr.token_wall if w > t_conf), None) for lr in running]
    gaps = [b - a for lr in lrs for a, b in zip(lr.token_wall, lr.token_wall[1:])]
    bw = moved_net / move_s if move_s and moved_net else None
    disk_read = (ex or {}).get("checkpoint_bytes") or (done or {}).get("loaded_bytes") or 0
    return {"config_id": conf["config_id"] if conf else None, "plan_config": plan.config.short(),
            "plan": {"transfers": len(plan.transfers), "net_bytes": net, "disk_bytes": disk, "kv_bytes": kv,
                     "predicted_bytes": predicted, "est_seconds": round(plan.est_seconds, 4)},
            "executor": ex, "bytes_match": match,
            "configured": {k: done.get(k) for k in ("seconds", "loaded_bytes", "failed")} if done else None,
            "migration_s": mig_s, "move_s": move_s,
            "implied_GBps": round(bw / 1e9, 3) if bw else None,
            "pct_of_p2p": round(100 * bw / p2p_bps, 1) if bw and p2p_bps else None,
            "disk_GBps": round(disk_read / move_s / 1e9, 3) if disk_read and move_s else None,
            "ttft_new_config_s": round(first_new - t_call, 4) if first_new else None,
            "every_next_token_s": round(max(nxt) - t_call, 4) if nxt and None not in nxt else None,
            "stall_s": round(max(gaps, default=0.0), 4),
            "step_s_median": round(statistics.median(gaps), 5) if gaps else None, **outcome(lrs, ref)}
