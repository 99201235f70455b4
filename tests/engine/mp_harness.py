"""Multi-process test worker: one process of a pool that runs many engine cases over one process group.

Run as `python mp_harness.py CASES.json OUT_DIR` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
set (the tests launch the pool). For each case every rank creates the case's groups; the first
pp*tp ranks run it, the rest wait at the barrier. The sampler of each run writes
OUT_DIR/<case>.json (outputs) and OUT_DIR/<case>.safetensors (last-step logits per request).
Resume cases run the src config for `stop_after` steps, export state and KV pieces to files,
then the dst config imports them (re-sliced with kv_reshard.assemble) and finishes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import init_world, make_contexts
from spotserve.engine.engine import Engine, RequestState
from spotserve.engine.kv_reshard import RequestKV, assemble
from spotserve.engine.sequence import SamplingParams


def _engine(case: dict, world, layout: dict) -> Engine | None:
    ctx = make_contexts(world, 1, layout["pp"], layout["tp"])
    if ctx is None:
        return None
    cfg = EngineConfig(case["model_dir"], pp=layout["pp"], tp=layout["tp"], block_size=layout.get("block_size", 4),
                       num_blocks=layout.get("num_blocks", 64), micro_batches=layout.get("micro_batches", 1),
                       timeout_s=world.timeout_s)
    return Engine(cfg, ctx)


def _drive(engine: Engine, case: dict, out: Path, name: str, arrivals: list[dict], max_steps: int | None = None):
    """Step the engine (adding requests at their arrival step); record each request's last logits row."""
    last: dict[str, torch.Tensor] = {}
    first_step_tokens = None

    def arrive():
        for r in arrivals:
            if r.get("arrive_step", 0) == engine.steps and not r.get("_added"):
                engine.add_request(r["id"], r["prompt"], SamplingParams(r["max_new_tokens"]))
                r["_added"] = True

    arrive()
    while engine.has_unfinished() or any(not r.get("_added") for r in arrivals):
        if max_steps is not None and engine.steps >= max_steps:
            break
        if not engine.has_unfinished():  # idle before a late arrival: let it in now
            for r in arrivals:
                r["arrive_step"] = engine.steps
            arrive()
        new = engine.step()
        if first_step_tokens is None:
            first_step_tokens = engine.last_step_tokens
        if engine.last_logits is not None:
            for row, rid in enumerate(new):
                last[rid] = engine.last_logits[row].clone()
        arrive()
    ctx = engine.ctx
    if ctx.world.rank == ctx.sampler_rank and max_steps is None:
        outputs = {rid: list(seq.output) for rid, seq in engine.finished.items()}
        (out / f"{name}.json").write_text(json.dumps({"outputs": outputs, "steps": engine.steps,
                                                         "first_step_tokens": first_step_tokens}))
        save_file({k: v.contiguous() for k, v in last.items()}, str(out / f"{name}.safetensors"))


def run_case(case: dict, world, out: Path) -> None:
    if case["kind"] == "generate":
        engine = _engine(case, world, case)
        if engine is not None:
            _drive(engine, case, out, case["name"], [dict(r) for r in case["requests"]])
        dist.barrier()
        return
    # resume: src config runs stop_after steps, exports; dst config imports and finishes.
    src, dst = case["src"], case["dst"]
    tmp = out / f"{case['name']}.parts"
    engine = _engine(case, world, src)
    if engine is not None:
        _drive(engine, case, out, case["name"], [dict(r) for r in case["requests"]], max_steps=case["stop_after"])
        ctx = engine.ctx
        tmp.mkdir(exist_ok=True)
        states = {}
        for rid, seq in list(engine.scheduler.seqs.items()):
            engine.commit(rid, max(0, len(seq.output) - case.get("uncommitted", 0)))
            state, kv = engine.export_request(rid)
            states[rid] = {"prompt": state.prompt, "committed": state.committed,
                           "max_new_tokens": state.params.max_new_tokens}
            if kv is not None:
                (tmp / f"{rid}.{ctx.stage}.{ctx.shard}.kv").write_bytes(kv.to_bytes())
            engine.release(rid)
        if ctx.world.rank == 0:
            (tmp / "states.json").write_text(json.dumps(states))
    dist.barrier()
    engine = _engine(case, world, dst)
    if engine is not None:
        ctx = engine.ctx
        states = json.loads((tmp / "states.json").read_text())
        for rid, s in states.items():
            state = RequestState(rid, s["prompt"], s["committed"], SamplingParams(s["max_new_tokens"]))
            kv = None
            if case["mode"] == "kv":
                pieces = [RequestKV.from_bytes(p.read_bytes()) for p in sorted(tmp.glob(f"{rid}.*.kv"))]
                kv = assemble(pieces, engine.spec, dst["pp"], dst["tp"], ctx.stage, ctx.shard,
                              block_size=dst.get("block_size", 4))
            engine.import_request(state, kv)
        _drive(engine, case, out, case["name"], [])
    dist.barrier()


def main() -> int:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    world = init_world(timeout_s=120.0)
    torch.set_num_threads(1)
    for case in cases:
        run_case(case, world, out)
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
