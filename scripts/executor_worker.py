"""Worker of scripts/bench_migration.py --executor: one of 2 gloo processes (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT set) timing the migration executor and raw point-to-point sends.

Usage: python scripts/executor_worker.py CONFIG.json OUT.json
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from spotserve.daemon.executor import MigrationExecutor
from spotserve.daemon.layout import KVRequest, Layout, box_shape
from spotserve.engine.dist import init_world
from spotserve.engine.kv_reshard import RequestKV
from spotserve.models.spec import OPT_6_7B, get_spec
from spotserve.planner import GPU, CostModel
from spotserve.planner.migration import MigrationPlanner
from spotserve.planner.profiles import parse_profile
from spotserve.planner.types import ParallelConfig, ReconfigurationPlan, RunningRequest

GPUS = ["g0", "g1"]


def spec_of(cfg: dict):
    if cfg["spec"] == "cpu-1g":
        base = replace(OPT_6_7B, name="cpu-1g", num_layers=8, hidden=2048, num_heads=32, ffn=8192)
    else:
        base = get_spec(cfg["spec"])
    return replace(base, num_layers=cfg["layers"]) if cfg.get("layers") else base


def cost_model(spec) -> CostModel:
    data = {"name": "bench", "layer_num": spec.num_layers, "pp_init_comm": 1.0, "pp_incr_comm": 0.1,
            "embed": [0.1], "final_fix_factor": 1.0, "dtype": "fp16", "reserved_bytes": 0}
    for tp in (1, 2):
        data[f"tp-{tp}"] = {f"bsz-{b}": {"init": 10.0 * b / tp, "incr": 1.0 + b / tp} for b in (1, 64)}
    return CostModel(parse_profile(data), spec, gpu_memory_bytes=1 << 40)


def scenario(name: str, spec, cfg: dict):
    """(old layout, new layout, transfers, KV requests, old replica of each request)."""
    bs = 16
    if name == "weights-move":
        x, y, px, py, inherits = ParallelConfig(1, 1, 1, 1), ParallelConfig(1, 1, 1, 1), ["g0"], ["g1"], {0: 0}
    elif name == "weights-reslice":
        x, y, px, py, inherits = ParallelConfig(1, 2, 1, 1), ParallelConfig(1, 1, 2, 1), GPUS, GPUS, {0: 0}
    else:  # KV of replica 0 moves from g0 to g1; both already hold the whole model
        x, y = ParallelConfig(2, 1, 1, 64), ParallelConfig(2, 1, 1, 64)
        px, py, inherits = GPUS, GPUS[::-1], {0: 0, 1: 1}
    place_x, place_y = dict(zip(x.positions(), px)), dict(zip(y.positions(), py))
    running = []
    if name == "kv-blocks":
        running = [RunningRequest(f"r{i}", 0, cfg["kv_tokens"], cfg["kv_tokens"], 0, 1) for i in range(cfg["kv_requests"])]
    gpus = [GPU(g, "i0", i, 1 << 40) for i, g in enumerate(GPUS)]
    plan = MigrationPlanner(cost_model(spec)).migrate(y, None, place_y, inherits, gpus,
                                                      ReconfigurationPlan(x, place_x, [], 0.0), running)
    reqs = [KVRequest(q.request_id, 0, plan.continued[q.request_id], q.tokens) for q in running]
    return Layout.of(x, place_x, bs), Layout.of(y, place_y, bs), plan.transfers, reqs


def timed(fn, repeat: int) -> list[float]:
    """Wall seconds of fn() per repeat, the slowest rank's (after one warm-up)."""
    fn()
    out = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append(float(t))
    return out


def main() -> int:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    world = init_world(timeout_s=600.0)
    me = GPUS[world.rank]
    spec = spec_of(cfg)
    results = {}
    for name in cfg["scenarios"]:
        old, new, transfers, reqs = scenario(name, spec, cfg)
        weights = {n: torch.ones(box_shape(spec, n, r.dim, r.end - r.start), dtype=torch.float16)
                   for n, r in old.weight_ranges(spec, me).items()}
        kv = {}
        held = old.kv_ranges(spec, me)
        for q in reqs:
            if held[0] == q.old_replica:
                nb = -(-q.num_tokens // old.block_size)
                data = torch.ones(nb, held[1][1] - held[1][0], 2, held[2][1] - held[2][0], old.block_size,
                                  spec.head_dim, dtype=torch.float16)
                kv[q.request_id] = RequestKV(q.request_id, q.num_tokens, old.block_size, held[1], held[2], data)
        # New shards, KV pieces and staging made by prepare(allocate=True), outside the timing, as a
        # daemon or the engine's KV cache would hand them out (the raw baseline also receives into a
        # ready buffer); the warm-up run touches them.
        ex = MigrationExecutor(spec, me, {g: i for i, g in enumerate(GPUS)}, dtype=torch.float16,
                               staging_bytes=cfg["staging"], solo_bytes=cfg["solo"], depth=cfg.get("depth", 4))
        outcome = {}
        prep = ex.prepare(old, new, transfers, reqs, allocate=True)  # done when the plan arrives, not timed

        def migrate():
            outcome["o"] = ex.run(old, new, transfers, weights, kv=kv, requests=reqs, prepared=prep)

        t_exec = timed(migrate, cfg["repeat"])
        st = outcome["o"].stats
        sizes = torch.tensor([st.sent_bytes], dtype=torch.int64)
        both = [torch.zeros(1, dtype=torch.int64) for _ in GPUS]
        dist.all_gather(both, sizes)
        per_dir = [int(b) for b in both]  # bytes rank i sends to the other
        send = torch.ones(max(per_dir[world.rank], 1), dtype=torch.uint8)
        recv = torch.zeros(max(per_dir[1 - world.rank], 1), dtype=torch.uint8)

        def raw():
            ops = []
            if per_dir[world.rank]:
                ops.append(dist.P2POp(dist.isend, send, 1 - world.rank))
            if per_dir[1 - world.rank]:
                ops.append(dist.P2POp(dist.irecv, recv, 1 - world.rank))
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        t_raw = timed(raw, cfg["repeat"])
        total = sum(per_dir)
        results[name] = {
            "bytes": total, "bytes_per_direction": per_dir, "executor_s": statistics.median(t_exec),
            "raw_s": statistics.median(t_raw), "executor_runs_s": t_exec, "raw_runs_s": t_raw,
            "executor_GBps": total / statistics.median(t_exec) / 1e9, "raw_GBps": total / statistics.median(t_raw) / 1e9,
            "ratio": statistics.median(t_raw) / statistics.median(t_exec), "moves": len(outcome["o"].resolution.moves),
            "messages_sent": st.messages_sent, "direct_messages": st.direct_messages, "rounds": st.rounds,
            "staging_bytes": st.staging_bytes, "local_bytes": st.local_bytes, "prepare_s": prep.seconds,
            "prepare_alloc_s": prep.alloc_seconds,
            "host_ms": {k: getattr(st, k) * 1e3 for k in ("alloc_s", "pack_s", "post_s", "wait_s", "unpack_s",
                                                          "local_s", "arrive_s", "drain_s")}}
        del weights, kv, outcome, ex, prep, send, recv
    if world.rank == 0:
        Path(sys.argv[2]).write_text(json.dumps({"spec": spec.name, "config": cfg, "results": results}, indent=2))
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
