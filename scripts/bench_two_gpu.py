"""Two workers (NCCL on 2 GPUs, gloo on CPU): the engine at tp=2 and pp=2 vs tp=1, NCCL p2p bandwidth, executor.

Launch as two processes: `torchrun --standalone --nproc_per_node 2 scripts/bench_two_gpu.py --json OUT.json`
(GPU: OPT-6.7B shape, fp16 random weights built on each GPU with the same seed) or with
`--device cpu --model opt-tiny` (fp32, gloo: a rehearsal of the same code with tiny shapes).
Phases, in order (each one's failure is written to the JSON and the next phase still runs when the
workers are still in step):
  p2p       point-to-point bandwidth worker 0 -> worker 1 for 8 MiB, 64 MiB and 1 GiB messages
  tp1       worker 0 alone (pp = tp = 1, CUDA graphs): reference greedy tokens (10 prompts x 32 steps)
            and decode ms/step at batch 1, 8, 32 with 512-token contexts
  tp2, pp2  the same on both workers over torch.distributed; tokens compared with tp1's, first
            divergence explained by the reference's top-2 logit margin there (fp16 ties)
  executor  spotserve.daemon.executor moving the weight shards tp=1 (worker 0) -> tp=2 (both) and
            the KV blocks of running requests worker 0 -> worker 1, against raw p2p of the same bytes:
            move only and including allocation, NCCL alone on the executor's rounds, a sweep of
            settings (--exec-sweep) and a per-round timeline (scripts/two_gpu_executor.py)
Memory floor of a layout: (weight + KV bytes read per decode step per GPU) / device copy rate
(bytes read + written per second, measured in the same run); tp: the busiest GPU; pp: the sum of
the stages (one micro-batch runs through them one after the other).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from spotserve.engine.config import EngineConfig
from spotserve.engine.dist import init_world, make_contexts
from spotserve.engine.engine import Engine
from spotserve.engine.sequence import SamplingParams
from spotserve.models import sharding
from spotserve.models.spec import get_spec
from spotserve.profile.profiler import DTYPE_NAMES, decode_ms, random_prompts
from spotserve.profile.timing import copy_bandwidth, median
from spotserve.profile.weights import random_weights

GPU = {"dtype": torch.float16, "ctx": 512, "batches": (1, 8, 32), "steps": 20, "warmup": 3,
       "check_prompts": 10, "check_len": 64, "check_tokens": 32, "p2p": (8 << 20, 64 << 20, 256 << 20, 1 << 30),
       "p2p_reps": 20, "copy_bytes": 1 << 30, "kv_requests": 16, "kv_tokens": 512, "repeat": 3}
CPU = {"dtype": torch.float32, "ctx": 32, "batches": (1, 8, 32), "steps": 4, "warmup": 1,
       "check_prompts": 10, "check_len": 16, "check_tokens": 32, "p2p": (1 << 20, 8 << 20), "p2p_reps": 3,
       "copy_bytes": 1 << 24, "kv_requests": 4, "kv_tokens": 32, "repeat": 2}


class Run:
    """Shared state of one worker: world, options, results (rank 0 writes them)."""

    def __init__(self, args):
        self.args = args
        self.cfg = CPU if args.device == "cpu" else GPU
        self.world = init_world(timeout_s=args.timeout, backend="gloo" if args.device == "cpu" else "nccl")
        if self.world.size != 2:
            raise ValueError(f"run me as 2 processes (torchrun --nproc_per_node 2), got a world of {self.world.size}")
        self.rank = self.world.rank
        self.dev = "cpu" if args.device == "cpu" else "cuda"
        self.spec = get_spec(args.model)
        self.dtype = self.cfg["dtype"]
        self.result = {"model": self.spec.name, "dtype": DTYPE_NAMES[self.dtype], "device": self.dev_name(),
                       "torch": torch.__version__, "config": {k: list(v) if isinstance(v, tuple) else
                                                              (str(v) if k == "dtype" else v)
                                                              for k, v in self.cfg.items()},
                       "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                              "NVSHMEM_DISABLE_NVLS")},
                       "phases": {}, "errors": {}}
        self.full = None  # full random weights of the model on this worker's device
        self.ref = None  # tp1 reference: tokens and per-step top-2 margins

    def dev_name(self) -> str:
        return torch.cuda.get_device_name() if self.dev == "cuda" else "cpu"

    def sync(self) -> None:
        """All workers here (a tiny all-reduce on the default group)."""
        t = torch.ones(1, device=self.dev)
        dist.all_reduce(t)
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def share(self, key: str, obj=None, src: int = 0):
        """JSON object from worker `src` to all (through the rendezvous store)."""
        if self.rank == src:
            self.world.store.set(key, json.dumps(obj))
            return obj
        return json.loads(self.world.store.get(key))

    def save(self) -> None:
        if self.rank == 0 and self.args.json:
            self.args.json.write_text(json.dumps(self.result, indent=1) + "\n")

    def weights(self) -> dict:
        if self.full is None:
            self.full = random_weights(self.spec, self.dtype, self.dev, seed=0)
        return self.full

    def engine(self, pp: int, tp: int, ctx=None, max_batch: int = 32, max_len: int = 0) -> Engine:
        """An engine over this worker's slice of the random weights."""
        stage, shard = (ctx.stage, ctx.shard) if ctx is not None else (0, 0)
        full = self.weights()
        w = {}
        for name in sharding.stage_tensor_names(self.spec, pp, stage):
            sl = sharding.shard_slice(self.spec, name, tp, shard)
            w[name] = full[name] if sl is None else full[name].narrow(sl[0], sl[1], sl[2] - sl[1]).contiguous()
        bs = 16
        num_blocks = max_batch * -(-max_len // bs) + 4
        config = EngineConfig(f"<random {self.spec.name}>", pp=pp, tp=tp, block_size=bs, num_blocks=num_blocks,
                              max_batch=max_batch, max_batch_tokens=max_batch * max_len, dtype=DTYPE_NAMES[self.dtype],
                              device=self.dev, timeout_s=self.args.timeout, cuda_graphs=self.dev == "cuda")
        return Engine(config, ctx=ctx, spec=self.spec, weights=w)


# --- phases -------------------------------------------------------------------------------------
def phase_p2p(run: Run) -> dict:
    """Unidirectional bandwidth worker 0 -> 1: `reps` back-to-back messages between two syncs."""
    out = {}
    for size in run.cfg["p2p"]:
        buf = torch.ones(size, dtype=torch.uint8, device=run.dev) if run.rank == 0 else \
            torch.empty(size, dtype=torch.uint8, device=run.dev)

        def once(n):
            for _ in range(n):
                if run.rank == 0:
                    dist.send(buf, 1)
                else:
                    dist.recv(buf, 0)

        once(2)
        run.sync()
        reps = run.cfg["p2p_reps"] if size < (1 << 30) else max(5, run.cfg["p2p_reps"] // 2)
        t0 = time.perf_counter()
        once(reps)
        run.sync()
        s = time.perf_counter() - t0
        ok = bool(buf[:16].eq(1).all()) if run.rank == 1 else True
        out[f"{size >> 20}MiB"] = {"bytes": size, "reps": reps, "seconds": s, "GBps": size * reps / s / 1e9,
                                   "received_ok": ok}
        del buf
    return out


def layout_floor(run: Run, eng: Engine, batch: int, ctx: float, copy_bps: float) -> dict:
    """This worker's weight + KV bytes of one decode step and its memory floor (ms)."""
    model = eng.runner.model
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    kv_tok = eng.runner.cache.bytes_per_token
    moved = wbytes + batch * (ctx * kv_tok + kv_tok)
    return {"weight_bytes": wbytes, "kv_bytes_per_token": kv_tok, "bytes": int(moved),
            "floor_ms": moved / copy_bps * 1e3}


def greedy(eng: Engine, prompts, new: int) -> tuple[list[list[int]], list]:
    """Greedy outputs and per-step logits (on the worker that has them) of prompts run as one batch."""
    for i, p in enumerate(prompts):
        eng.add_request(f"check-{i}", p, SamplingParams(new))
    logits = []
    while eng.has_unfinished():
        eng.step()
        lg = eng.last_logits
        logits.append(None if lg is None else lg.clone())
    out = [list(eng.finished[f"check-{i}"].output) for i in range(len(prompts))]
    for i in range(len(prompts)):
        eng.finished.pop(f"check-{i}", None)
    return out, logits


def timings(run: Run, eng: Engine, name: str, peers: int) -> dict:
    """Decode ms/step (median) and tokens/s at each batch, beside the layout's memory floor."""
    cfg, rows = run.cfg, {}
    copy_bps = run.result["copy_bytes_per_s"]
    for b in cfg["batches"]:
        prompts = random_prompts(run.spec, b, cfg["ctx"], seed=100 + b)
        ms = median(decode_ms(eng, prompts, cfg["steps"], cfg["warmup"]))
        ctx = cfg["ctx"] + 1 + cfg["warmup"] + cfg["steps"] / 2
        mine = layout_floor(run, eng, b, ctx, copy_bps)
        floors = [mine] if peers == 1 else [run.share(f"{name}-floor-{b}-{r}", mine if run.rank == r else None, r)
                                            for r in range(2)]
        serial = name.startswith("pp")
        floor = sum(f["floor_ms"] for f in floors) if serial else max(f["floor_ms"] for f in floors)
        rows[f"bsz-{b}"] = {"decode_ms": ms, "tokens_per_s": b / ms * 1e3, "memory_floor_ms": floor,
                            "x_floor": ms / floor, "per_gpu": floors}
        if run.rank == 0:
            print(f"  {name} b={b}: {ms:.3f} ms/step, {b / ms * 1e3:.0f} tok/s, floor {floor:.3f} ms "
                  f"({ms / floor:.2f}x)", flush=True)
    return rows


def phase_tp1(run: Run) -> dict:
    """Worker 0 alone: reference tokens + margins, then timings; worker 1 waits."""
    cfg = run.cfg
    prompts = random_prompts(run.spec, cfg["check_prompts"], cfg["check_len"], seed=1234)
    out = {}
    if run.rank == 0:
        t0 = time.perf_counter()
        max_len = max(cfg["ctx"] + cfg["warmup"] + cfg["steps"] + 8, cfg["check_len"] + cfg["check_tokens"])
        eng = run.engine(1, 1, None, max(max(cfg["batches"]), cfg["check_prompts"]), max_len)
        out["setup_s"] = time.perf_counter() - t0
        tokens, logits = greedy(eng, prompts, cfg["check_tokens"])
        top2 = [torch.topk(lg.float(), 2, dim=-1).values for lg in logits]
        margins = [(t[:, 0] - t[:, 1]).tolist() for t in top2]
        run.ref = {"tokens": tokens, "margins": margins}
        run.ref_logits0 = logits[0].float()
        out["decode"] = timings(run, eng, "tp1", 1)
        del eng
        if run.dev == "cuda":
            torch.cuda.empty_cache()
        run.share("tp1-ref", run.ref)
    else:
        run.ref = run.share("tp1-ref")
        run.ref_logits0 = None
    return out


def compare(run: Run, eng: Engine, name: str, outputs=None) -> dict:
    """Greedy tokens of this layout vs tp1's; the sampler worker explains the first flip of each prompt.
    outputs: greedy()'s (tokens, logits) of the check prompts when already run."""
    cfg = run.cfg
    prompts = random_prompts(run.spec, cfg["check_prompts"], cfg["check_len"], seed=1234)
    tokens, logits = outputs or greedy(eng, prompts, cfg["check_tokens"])
    ref, new = run.ref["tokens"], cfg["check_tokens"]
    # step-0 logits of tp1 (worker 0) sent to the sampler worker for the relative error
    ref0 = run.ref_logits0 if run.rank == 0 else torch.empty(len(prompts), run.spec.vocab, device=run.dev)
    dist.broadcast(ref0.contiguous() if run.rank == 0 else ref0, 0)
    rows = None
    if logits[0] is not None and eng.runner.ctx.sampler_rank == run.rank:
        rows = []
        for i in range(len(prompts)):
            agree = next((t for t in range(new) if tokens[i][t] != ref[i][t]), new)
            row = {"matching_tokens": agree,
                   "first_step_rel_err": float((logits[0][i].float() - ref0[i]).norm() / ref0[i].norm())}
            if agree < new:
                mine = logits[agree][i].float()
                row["flip"] = {"step": agree, "ref_token": ref[i][agree], "token": tokens[i][agree],
                               "ref_top2_margin": run.ref["margins"][agree][i],
                               "margin": float(mine[tokens[i][agree]] - mine[ref[i][agree]])}
            rows.append(row)
    rows = run.share(f"{name}-cmp", rows, eng.runner.ctx.sampler_rank)
    res = {"prompts": len(prompts), "prompt_len": cfg["check_len"], "new_tokens": new,
           "all_tokens_match": sum(r["matching_tokens"] == new for r in rows),
           "max_first_step_rel_err": max(r["first_step_rel_err"] for r in rows), "per_prompt": rows}
    if run.rank == 0:
        print(f"  {name}: {res['all_tokens_match']}/{len(prompts)} prompts equal to tp1 for all {new} tokens; "
              f"step-0 logits rel err <= {res['max_first_step_rel_err']:.2e}", flush=True)
        for i, r in enumerate(rows):
            if "flip" in r:
                f = r["flip"]
                print(f"    prompt {i}: flip at step {f['step']}: tp1's top-2 margin {f['ref_top2_margin']:.4f}, "
                      f"{name} prefers its token by {f['margin']:.4f}", flush=True)
    return res


def phase_layout(run: Run, pp: int, tp: int) -> dict:
    """The layout on both workers: decode run eagerly (first, so its figures survive a failed capture),
    then from CUDA graphs (tp all-reduces inside them, pp send/recv between them): tokens and logits
    of the two compared, tokens vs tp1, ms/step of each at every batch."""
    name = f"pp{pp}" if pp > 1 else f"tp{tp}"
    cfg = run.cfg
    t0 = time.perf_counter()
    ctx = make_contexts(run.world, 1, pp, tp)
    max_len = max(cfg["ctx"] + cfg["warmup"] + cfg["steps"] + 8, cfg["check_len"] + cfg["check_tokens"])
    eng = run.engine(pp, tp, ctx, max(max(cfg["batches"]), cfg["check_prompts"]), max_len)
    run.sync()
    out = {"setup_s": time.perf_counter() - t0}
    dec = eng.runner.decoder
    prompts = random_prompts(run.spec, cfg["check_prompts"], cfg["check_len"], seed=1234)
    dec.set_graphs(False)
    eager = greedy(eng, prompts, cfg["check_tokens"])
    out["tokens_eager"] = compare(run, eng, f"{name}-eager", eager)
    out["decode_eager"] = timings(run, eng, f"{name}-eager", 2)
    dec.set_graphs(run.dev == "cuda")
    t1 = time.perf_counter()
    graphed = greedy(eng, prompts, cfg["check_tokens"])  # captures the check batch's keys
    out["graph_check"] = graph_vs_eager(run, eng, name, eager, graphed, time.perf_counter() - t1)
    out["tokens"] = compare(run, eng, name, graphed)
    out["decode"] = timings(run, eng, name, 2)
    out["graphs"] = graph_stats(run, eng, name)
    report_graph_speedup(run, name, out)
    del eng
    if run.dev == "cuda":
        torch.cuda.empty_cache()
    return out


def graph_vs_eager(run: Run, eng: Engine, name: str, eager, graphed, seconds: float) -> dict:
    """Greedy tokens of the graph run vs the eager run (same engine, same prompts) and the largest
    relative error of their logits over all steps (on the sampler worker)."""
    (tok_e, log_e), (tok_g, log_g) = eager, graphed
    same = sum(a == b for a, b in zip(tok_e, tok_g))
    err = None
    sampler = eng.runner.ctx.sampler_rank
    if run.rank == sampler:
        err = max(float((g.float() - e.float()).norm() / e.float().norm()) for g, e in zip(log_g, log_e)
                  if g is not None and e is not None and g.shape == e.shape)
    err = run.share(f"{name}-graph-err", err, sampler)
    res = {"prompts": len(tok_e), "tokens_equal": same, "max_logits_rel_err": err, "graph_run_s": seconds}
    if run.rank == 0:
        shown = "n/a" if err is None else f"{err:.2e}"
        print(f"  {name} graphs vs eager: {same}/{len(tok_e)} prompts with equal tokens, logits rel err "
              f"<= {shown}; first graph run (captures included) {seconds:.2f} s", flush=True)
    return res


def graph_stats(run: Run, eng: Engine, name: str) -> dict:
    """Keys each worker captured (they must be equal: matching collectives) and how many graphs."""
    dec = eng.runner.decoder
    mine = {"use_graphs": dec.use_graphs, "keys": [list(k) for k in dec.keys],
            "graphs": sum(len(g) for g in dec.graphs.values()), "micro_batches": dec.micro_batches,
            "chunks": dec.chunks}
    both = [run.share(f"{name}-graphs-{r}", mine if run.rank == r else None, r) for r in range(2)]
    res = dict(mine, per_worker_graphs=[b["graphs"] for b in both], same_keys=both[0]["keys"] == both[1]["keys"])
    if run.rank == 0:
        print(f"  {name} graphs: {res['per_worker_graphs']} captured per worker over {len(mine['keys'])} keys "
              f"(batch bucket, context bucket) {mine['keys']}; same keys on both: {res['same_keys']}", flush=True)
    return res


def report_graph_speedup(run: Run, name: str, out: dict) -> None:
    """Adds eager/graph ms per batch to out["decode"] rows and prints them side by side (rank 0)."""
    mode = "graphs" if out["graphs"]["use_graphs"] else "graphs off (cpu), eager again"
    for key, row in out["decode"].items():
        e = out["decode_eager"][key]["decode_ms"]
        row["eager_decode_ms"], row["graph_speedup"] = e, e / row["decode_ms"]
        if run.rank == 0:
            print(f"  {name} {key}: {mode} {row['decode_ms']:.3f} ms/step vs eager {e:.3f} -> "
                  f"{row['graph_speedup']:.2f}x (floor {row['memory_floor_ms']:.3f} ms)", flush=True)


def phase_executor(run: Run) -> dict:
    """The migration executor against raw p2p of the same bytes, with a settings sweep and a timeline
    of where its time goes (scripts/two_gpu_executor.py)."""
    import two_gpu_executor

    return two_gpu_executor.phase_executor(run)


def print_table(res: dict) -> None:
    ph = res["phases"]
    print(f"\n{'layout':<7}{'b':>4}{'ms/step':>10}{'tok/s':>9}{'floor ms':>10}{'x floor':>9}")
    for name in ("tp1", "tp2", "pp2"):
        for key, row in (ph.get(name) or {}).get("decode", {}).items():
            print(f"{name:<7}{key[4:]:>4}{row['decode_ms']:>10.3f}{row['tokens_per_s']:>9.0f}"
                  f"{row['memory_floor_ms']:>10.3f}{row['x_floor']:>9.2f}")
    for name in ("tp2", "pp2"):
        t = (ph.get(name) or {}).get("tokens")
        if t:
            print(f"{name}: tokens equal to tp1 on {t['all_tokens_match']}/{t['prompts']} prompts x {t['new_tokens']}")
    for k, v in (ph.get("p2p") or {}).items():
        if isinstance(v, dict):
            print(f"p2p {k}: {v['GBps']:.1f} GB/s")
    for k, v in (ph.get("executor") or {}).items():
        if isinstance(v, dict) and "executor_GBps" in v:
            alloc = v.get("with_alloc_pct_of_raw")
            print(f"executor {k}: {v['executor_GBps']:.1f} GB/s = {v['pct_of_raw']:.0f}% of raw "
                  f"{v['raw_GBps']:.1f} GB/s" + ("" if alloc is None else f" (including allocation {alloc:.0f}%)"))
            for row in v.get("sweep", [])[1:]:
                print(f"  setting {row['label']}: {row['pct_of_raw']:.0f}% of raw")
    for k, v in res["errors"].items():
        print(f"ERROR {k}: {v.splitlines()[-1] if v else v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--model", default="opt-6.7b")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=300.0, help="limit of every collective (s)")
    ap.add_argument("--phases", default="p2p,tp1,tp2,pp2,executor")
    ap.add_argument("--exec-sweep", default=None, help="executor settings, ':'-separated, e.g. "
                    "'default:round=64M:solo=1G,depth=2' (keys solo, round, staging, depth; default per device)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA GPU (use --device cpu --model opt-tiny for the rehearsal)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.manual_seed(0)
    run = Run(args)
    res = run.result
    res["copy_bytes_per_s"] = copy_bandwidth(run.dev, nbytes=run.cfg["copy_bytes"])
    res["copy_bytes_per_s_gpu1"] = run.share("copy1", res["copy_bytes_per_s"] if run.rank == 1 else None, 1)
    if run.rank == 0:
        print(f"device {res['device']}, copy {res['copy_bytes_per_s'] / 1e12:.3f} TB/s (read + write); "
              f"worker 1: {res['copy_bytes_per_s_gpu1'] / 1e12:.3f}", flush=True)
    phases = {"p2p": phase_p2p, "tp1": phase_tp1, "tp2": lambda r: phase_layout(r, 1, 2),
              "pp2": lambda r: phase_layout(r, 2, 1), "executor": phase_executor}
    for name in args.phases.split(","):
        t0 = time.perf_counter()
        try:
            res["phases"][name] = phases[name](run)
            res["phases"][name]["phase_s"] = time.perf_counter() - t0
        except Exception:
            res["errors"][name] = f"rank {run.rank}: " + traceback.format_exc()
            print(f"rank {run.rank}: phase {name} failed:\n{res['errors'][name]}", flush=True)
            if run.rank == 0:
                run.save()
            if name in ("p2p", "tp1"):  # later phases need these
                if name == "tp1":
                    break
        if run.rank == 0:
            print(f"phase {name}: {time.perf_counter() - t0:.1f} s", flush=True)
            run.save()
    if run.rank == 1 and res["errors"]:  # worker 1's errors go to worker 0's JSON
        run.world.store.set("errors-1", json.dumps(res["errors"]))
    elif run.rank == 1:
        run.world.store.set("errors-1", "{}")
    if run.rank == 0:
        try:
            for k, v in json.loads(run.world.store.get("errors-1")).items():
                res["errors"][f"{k}@rank1"] = v
        except Exception as exc:
            res["errors"]["collect"] = repr(exc)
        run.save()
        print_table(res)
    run.world.close()
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
