"""Worker of the decode-graph tests: runs layout cases (tp / pp, graphs on or off) on one process group.

Run as `python graph_harness.py CASES.json OUT_DIR` (CASES.json: {"backend": ..., "cases": [...]}) with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
set (the tests launch it). For each case every rank creates the case's groups; the first pp*tp ranks
run it, the others wait at the barrier. Every running rank writes OUT_DIR/<case>.rank<r>.json (its
position, the decode keys in capture order, graphs captured, static decode steps, outputs); the
sampler also writes OUT_DIR/<case>.safetensors: each request's logits at every step, [steps, vocab].
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import init_world, make_contexts
from spotserve.engine.engine import Engine
from spotserve.engine.sequence import SamplingParams


_CONTEXTS: dict = {}


def _engine(case: dict, world) -> Engine | None:
    layout = (case["pp"], case["tp"])
    if layout not in _CONTEXTS:  # groups (and their NCCL communicators) once per layout, not per case
        _CONTEXTS[layout] = make_contexts(world, 1, *layout)
    ctx = _CONTEXTS[layout]
    if ctx is None:
        return None
    cfg = EngineConfig(case["model_dir"], pp=case["pp"], tp=case["tp"], block_size=case.get("block_size", 4),
                       num_blocks=case.get("num_blocks", 96), max_batch=case.get("max_batch", 8),
                       micro_batches=case.get("micro_batches", 1), dtype=case.get("dtype", "fp32"),
                       device=case.get("device", "cpu"), cuda_graphs=case.get("cuda_graphs", True),
                       timeout_s=world.timeout_s)
    return Engine(cfg, ctx)


def run_case(case: dict, world, out: Path) -> None:
    # progress on stderr: the tests show it when a worker fails or hangs
    print(f"rank {world.rank} {time.strftime('%X')} {case['name']}: start", file=sys.stderr, flush=True)
    engine = _engine(case, world)
    if engine is not None:
        decoder = engine.runner.decoder
        pending = sorted(case["requests"], key=lambda r: r["arrive_step"])
        logits: dict[str, list[torch.Tensor]] = {}
        t0 = time.perf_counter()
        while engine.has_unfinished() or pending:
            while pending and pending[0]["arrive_step"] <= engine.steps:
                r = pending.pop(0)
                engine.add_request(r["id"], r["prompt"], SamplingParams(r["max_new_tokens"]))
            new = engine.step()
            if engine.last_logits is not None:
                for row, rid in enumerate(new):
                    logits.setdefault(rid, []).append(engine.last_logits[row].cpu())
        ctx = engine.ctx
        report = {"stage": ctx.stage, "shard": ctx.shard, "keys": [list(k) for k in decoder.keys],
                  "graphs": sum(len(g) for g in decoder.graphs.values()), "static_steps": decoder.steps,
                  "steps": engine.steps, "seconds": time.perf_counter() - t0,
                  "outputs": {rid: list(s.output) for rid, s in engine.finished.items()}}
        (out / f"{case['name']}.rank{world.rank}.json").write_text(json.dumps(report))
        if world.rank == ctx.sampler_rank:
            save_file({rid: torch.stack(rows).contiguous() for rid, rows in logits.items()},
                      str(out / f"{case['name']}.safetensors"))
        print(f"rank {world.rank} {case['name']}: {engine.steps} steps ({decoder.steps} static) in "
              f"{report['seconds']:.2f} s, keys {decoder.keys}, {report['graphs']} graphs", file=sys.stderr, flush=True)
        engine.release_graphs()  # before the groups go (World.close would do it too)
        assert not decoder.graphs
        del engine, decoder
    dist.barrier()


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    world = init_world(timeout_s=120.0, backend=spec["backend"])  # gloo for CPU cases even where CUDA exists
    cases = spec["cases"]
    torch.set_num_threads(1)
    for case in cases:
        run_case(case, world, out)
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
