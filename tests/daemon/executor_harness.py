"""Worker of the migration-executor tests: one of 4 gloo processes that run every migration case in turn.

Run as `python executor_harness.py CASES.json OUT_DIR` with RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT set. GPU ids are "g<rank>"; positions are placed in rank order (as make_contexts lays
out engines). Per case every rank:
  - loads its old shards for config X from the checkpoint (the context it holds before);
  - "engine" cases: serves the requests on X for a few steps, exports them (Engine.export_request);
  - builds the migration plan with the real MigrationPlanner (X -> Y, GPUs not in `gpus` are gone);
  - runs MigrationExecutor (ranks that are gone do not take part at all);
  - compares its new shards with a fresh load_shard of Y, checks each unit is complete when
    on_arrival reports it, and (engine cases) resumes the requests on Y from the moved KV.
Results: OUT/<case>.<rank>.json per rank, OUT/<case>.out<replica>.json from each Y sampler.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from spotserve.daemon.executor import MigrationExecutor
from spotserve.daemon.layout import KVRequest, Layout, unit_of
from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import init_world, make_contexts
from spotserve.engine.engine import Engine, RequestState
from spotserve.engine.sequence import SamplingParams
from spotserve.models.loader import CheckpointReader, load_shard
from spotserve.planner import GPU, CostModel, Workload
from spotserve.planner.migration import MigrationPlanner
from spotserve.planner.profiles import parse_profile
from spotserve.planner.types import ParallelConfig, ReconfigurationPlan, RunningRequest

MAX_OUT = 16


def cost_model(spec) -> CostModel:
    data = {"name": "tiny", "layer_num": spec.num_layers, "pp_init_comm": 1.0, "pp_incr_comm": 0.1,
            "embed": [0.1, 0.2], "final_fix_factor": 1.0, "dtype": "fp32", "reserved_bytes": 0}
    for tp in (1, 2, 4):
        data[f"tp-{tp}"] = {f"bsz-{b}": {"init": 10.0 * b / tp, "incr": 1.0 + b / tp} for b in (1, 2, 4)}
    return CostModel(parse_profile(data), spec, gpu_memory_bytes=1 << 30, workload=Workload(prompt_len=8, output_len=8))


def reference(model_dir: str, requests: list[dict]) -> dict[str, list[int]]:
    """Tokens of an uninterrupted single-worker run of every request."""
    engine = Engine(EngineConfig(model_dir, block_size=4, num_blocks=64))
    for r in requests:
        engine.add_request(r["id"], r["prompt"], SamplingParams(r["max_new_tokens"]))
    return engine.run()


def share_requests(engine, world, x: ParallelConfig, requests: list[dict]) -> dict[str, dict]:
    """Every rank learns every request's generated tokens and cached positions (from its old replica)."""
    out = {}
    for rep in range(x.dp):
        mine = [r for i, r in enumerate(requests) if i % x.dp == rep]
        t = torch.zeros(len(mine), MAX_OUT + 2, dtype=torch.long)
        if engine is not None and engine.ctx.replica == rep:
            for j, r in enumerate(mine):
                seq = engine.get(r["id"])
                t[j, 0], t[j, 1] = seq.num_cached, len(seq.output)
                t[j, 2:2 + len(seq.output)] = torch.tensor(seq.output, dtype=torch.long)
        dist.broadcast(t, rep * x.pp * x.tp)
        for j, r in enumerate(mine):
            n = int(t[j, 1])
            out[r["id"]] = {"replica": rep, "num_cached": int(t[j, 0]), "output": t[j, 2:2 + n].tolist()}
    return out


def run_case(case: dict, world, out: Path) -> None:
    rank, model_dir = world.rank, case["model_dir"]
    spec = CheckpointReader(model_dir).spec
    x, y = ParallelConfig(*case["x"], batch=4), ParallelConfig(*case["y"], batch=4)
    me = f"g{rank}"
    px = {p: f"g{i}" for i, p in enumerate(x.positions())}
    py = {p: f"g{i}" for i, p in enumerate(y.positions())}
    old, new = Layout.of(x, px, case["bs_x"]), Layout.of(y, py, case["bs_y"])
    gone = [g for g in px.values() if g not in case["gpus"]]
    requests = case.get("requests", [])
    engine_x = None
    ctx_x = make_contexts(world, x.dp, x.pp, x.tp) if requests else None
    pos_x = old.position(me)
    old_w = load_shard(model_dir, x.pp, pos_x.stage, x.tp, pos_x.shard) if pos_x else {}
    kv_pieces, info = {}, {}
    if requests:
        engine_x = Engine(EngineConfig(model_dir, pp=x.pp, tp=x.tp, block_size=case["bs_x"], num_blocks=64,
                                       timeout_s=world.timeout_s), ctx_x, spec, weights=dict(old_w))
        for i, r in enumerate(requests):
            if i % x.dp == ctx_x.replica:
                engine_x.add_request(r["id"], r["prompt"], SamplingParams(r["max_new_tokens"]))
        for _ in range(case["steps"]):
            engine_x.step()
        for rid in list(engine_x.scheduler.seqs):
            engine_x.commit(rid, len(engine_x.get(rid).output))
            _, piece = engine_x.export_request(rid)
            if piece is not None:
                kv_pieces[rid] = piece
        info = share_requests(engine_x, world, x, requests)
        del engine_x
    # The plan, as the controller would compute it (identical on every rank).
    gpus = [GPU(g, "i0", int(g[1:]), 1 << 30) for g in case["gpus"]]
    running = [RunningRequest(r["id"], info[r["id"]]["replica"], len(r["prompt"]), info[r["id"]]["num_cached"],
                              len(info[r["id"]]["output"]), r["max_new_tokens"] - len(info[r["id"]]["output"]))
               for r in requests]
    inherits = {r: r for r in range(min(x.dp, y.dp))}
    plan = MigrationPlanner(cost_model(spec)).migrate(y, None, py, inherits, gpus,
                                                      ReconfigurationPlan(x, px, [], 0.0), running)
    kv_reqs = [KVRequest(rid, info[rid]["replica"], rep, info[rid]["num_cached"])
               for rid, rep in sorted(plan.continued.items())]  # the executor finds the lost ones itself
    pos_y = new.position(me)
    expected = load_shard(model_dir, y.pp, pos_y.stage, y.tp, pos_y.shard) if pos_y else {}
    result = {"rank": rank, "participated": me not in gone}
    if me not in gone:
        allocated: dict[str, torch.Tensor] = {}

        def alloc(name, shape, dtype):  # NaN-filled: an element no move writes shows up in the checks
            allocated[name] = torch.full(shape, float("nan"), dtype=dtype)
            return allocated[name]

        bad_units = []

        def on_arrival(unit):
            if unit[0] == "kv":
                return
            for name in expected:
                if unit_of(spec, name, pos_y.stage == 0) == unit:
                    got = allocated.get(name, old_w.get(name))
                    if got is None or not torch.equal(got, expected[name]):
                        bad_units.append([*unit, name])

        ex = MigrationExecutor(spec, me, {f"g{i}": i for i in range(world.size)}, dtype=torch.float32,
                               staging_bytes=case["staging"], solo_bytes=case["solo"], checkpoint=model_dir,
                               alloc=alloc)
        kwargs = dict(kv=kv_pieces, requests=kv_reqs, live=set(case["gpus"]), on_arrival=on_arrival)
        if case.get("threaded"):
            thread, progress, box = ex.start(old, new, plan.transfers, old_w, **kwargs)
            units = {unit_of(spec, n, pos_y.stage == 0) for n in expected} if pos_y else set()
            if pos_y and any(r.new_replica == pos_y.replica for r in kv_reqs):
                units |= {("kv", layer) for layer in range(*new.kv_ranges(spec, me)[1])}
            for unit in sorted(units, key=lambda u: (u[0] == "kv", u[0] == "head", u[1])):
                progress.wait(unit, timeout=60)  # the engine would start this layer here
            thread.join(60)
            result["waited_units"] = len(units)
            if "error" in box:
                raise box["error"]
            outcome = box["outcome"]
        else:
            outcome = ex.run(old, new, plan.transfers, old_w, **kwargs)
        st = outcome.stats
        result.update(
            identical=sorted(outcome.weights) == sorted(expected) and all(
                torch.equal(outcome.weights[n], t) for n, t in expected.items()),
            bad_units=bad_units, stats=st.__dict__, lost_kv=sorted(outcome.lost_kv),
            disk_moves=sum(m.nbytes for m in outcome.resolution.moves if m.src is None and m.dst == me),
            summary=outcome.resolution.summary(), planner_lost=sorted(plan.lost_kv),
            checks=[[c.planner, c.exact, plan.transfers[c.index].tensor] for c in outcome.resolution.checks],
            kv_tokens={rid: p.num_tokens for rid, p in outcome.kv.items()},
            net_moves_in=sum(1 for m in outcome.resolution.moves if m.dst == me and m.src not in (None, me)))
    if requests:
        ctx_y = make_contexts(world, y.dp, y.pp, y.tp)
        if ctx_y is not None:
            engine = Engine(EngineConfig(model_dir, pp=y.pp, tp=y.tp, block_size=case["bs_y"], num_blocks=64,
                                         timeout_s=world.timeout_s), ctx_y, spec, weights=outcome.weights)
            for i, r in enumerate(requests):
                rid = r["id"]
                rep = plan.continued.get(rid, i % y.dp)
                if rep != ctx_y.replica:
                    continue
                state = RequestState(rid, r["prompt"], info[rid]["output"], SamplingParams(r["max_new_tokens"]))
                engine.import_request(state, outcome.kv.get(rid))
            engine.step()
            first = engine.last_step_tokens
            outputs = engine.run()
            if rank == ctx_y.sampler_rank:
                (out / f"{case['name']}.out{ctx_y.replica}.json").write_text(json.dumps(
                    {"outputs": outputs, "first_step_tokens": first,
                     "kv_imported": sorted(rid for rid in outcome.kv if rid in outputs)}))
    (out / f"{case['name']}.{rank}.json").write_text(json.dumps(result))
    dist.barrier()


def main() -> int:
    spec_file, out = Path(sys.argv[1]), Path(sys.argv[2])
    data = json.loads(spec_file.read_text())
    world = init_world(timeout_s=60.0)
    torch.set_num_threads(1)
    for case in data["cases"]:
        run_case(case, world, out)
    if world.rank == 0:
        for model_dir, requests in data.get("references", {}).items():
            (out / f"reference.{Path(model_dir).name}.json").write_text(json.dumps(reference(model_dir, requests)))
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
