"""Engine vs transformers vs plain torch + CUDA graph, against the machine's memory and compute floors.

Runs on the device machine (one GPU): `python scripts/bench_engine.py [--json PATH]`. For the
OPT-6.7B shape (fp16, random weights built on the GPU with a fixed seed, tp = pp = 1): prefill of
512-token prompts at batch 1 and 8, decode ms/step at batch 1, 8 and 32 with 512-token contexts,
for three contenders on the same weight tensors: spotserve's engine (custom kernels, decode from
CUDA graphs), Hugging Face transformers eager, and plain torch ops over a static KV cache with the
decode step in a CUDA graph. Then the GPT-NeoX-20B shape at batch 1 and 8 (engine, plain torch).
Floors, from ceilings measured in the same run: memory = (weights + KV bytes read per step) /
device-to-device copy rate (bytes read + written per second); compute = FLOPs / rate of an
8192^3 fp16 matrix product on random data. Correctness: greedy tokens of the engine vs
transformers for 32 tokens on 10 random prompts, and the logits' relative error.
`--tiny` runs the same code on the CPU with tiny shapes (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

from spotserve.engine.sequence import SamplingParams
from spotserve.models.spec import get_spec
from spotserve.profile.diagnose import gemm_rates, kernel_table, print_kernel_table
from spotserve.profile.contenders import hf_decode_ms, hf_greedy, hf_model, hf_prefill_ms
from spotserve.profile.plain_torch import PlainTorchDecoder
from spotserve.profile.profiler import build_engine, decode_ms, prefill_ms, random_prompts
from spotserve.profile.timing import copy_bandwidth, device_ms, matmul_rate, median, wall_ms
from spotserve.profile.weights import random_weights

FULL = {"device": "cuda", "dtype": torch.float16, "prompt": 512, "steps": 20, "warmup": 3, "reps": 5,
        "models": [("opt-6.7b", (1, 8), (1, 8, 32), True), ("gpt-neox-20b", (1, 8), (1, 8), False)],
        "check_prompts": 10, "check_len": 64, "check_tokens": 32}
TINY = {"device": "cpu", "dtype": torch.float32, "prompt": 16, "steps": 3, "warmup": 1, "reps": 2,
        "models": [("opt-tiny", (1, 2), (1, 2), True), ("gpt-neox-tiny", (1, 2), (1, 2), False)],
        "check_prompts": 3, "check_len": 8, "check_tokens": 6}


def matmul_params(spec) -> int:
    """Weights one token multiplies through in one decoder layer."""
    kv = spec.kv_heads * spec.head_dim
    return spec.hidden * (spec.hidden + 2 * kv) + spec.hidden * spec.hidden + (3 if spec.gated_mlp else 2) * spec.hidden * spec.ffn


def floors(spec, phase: str, batch: int, ctx: float, prompt: int, ceil: dict, nbytes: int) -> dict:
    """Memory and compute floors (ms) of one prefill or decode step; 'binding' names the larger."""
    L, h = spec.num_layers, spec.hidden
    weights = (L * spec.layer_params() + spec.vocab * h + h) * nbytes  # layers + LM head + final norm
    kv_token = L * spec.kv_elems_per_token_layer() * nbytes
    if phase == "decode":
        moved = weights + batch * (ctx * kv_token + kv_token)  # read the contexts, write the new rows
        flops = 2 * batch * (L * matmul_params(spec) + spec.vocab * h) + 4 * batch * ctx * h * L
    else:
        tokens = batch * prompt
        moved = weights + tokens * kv_token
        flops = 2 * tokens * L * matmul_params(spec) + 2 * batch * prompt ** 2 * h * L + 2 * batch * spec.vocab * h
    mem = moved / ceil["copy_bytes_per_s"] * 1e3
    comp = flops / ceil["matmul_flops_per_s"] * 1e3
    return {"memory_floor_ms": mem, "compute_floor_ms": comp, "bytes": moved, "flops": flops,
            "binding": "memory" if mem >= comp else "compute", "floor_ms": max(mem, comp)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (float)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def correctness(engine, hf, spec, cfg, device) -> dict:
    """Greedy tokens and logits of the engine vs transformers on random prompts (all in one batch)."""
    n, length, new = cfg["check_prompts"], cfg["check_len"], cfg["check_tokens"]
    prompts = random_prompts(spec, n, length, seed=1234)
    ref_tokens, ref_logits = hf_greedy(hf, torch.tensor(prompts, device=device), new)
    for i, p in enumerate(prompts):
        engine.add_request(f"check-{i}", p, SamplingParams(new))
    logits = []
    while engine.has_unfinished():
        engine.step()
        logits.append(engine.last_logits.clone())
    got = [engine.finished[f"check-{i}"].output for i in range(n)]
    rows = []
    for i in range(n):
        agree = next((t for t in range(new) if got[i][t] != ref_tokens[i][t]), new)
        # logits are comparable while both saw the same tokens: steps 0 .. agree (inclusive)
        errs = [rel(logits[t][i], ref_logits[t][i]) for t in range(min(agree + 1, new))]
        row = {"matching_tokens": agree, "first_step_rel_err": errs[0], "max_rel_err": max(errs)}
        if agree < new:
            top = torch.topk(ref_logits[agree][i], 2).values
            mine = logits[agree][i]
            row["flip"] = {"step": agree, "hf_top2_margin": float(top[0] - top[1]),
                           "hf_token": ref_tokens[i][agree], "engine_token": got[i][agree],
                           "engine_margin": float(mine[got[i][agree]] - mine[ref_tokens[i][agree]]),
                           "max_abs_logit_diff": float((mine - ref_logits[agree][i]).abs().max())}
        rows.append(row)
    return {"prompts": n, "prompt_len": length, "new_tokens": new,
            "all_tokens_match": sum(r["matching_tokens"] == new for r in rows),
            "max_first_step_rel_err": max(r["first_step_rel_err"] for r in rows),
            "max_rel_err_while_agreeing": max(r["max_rel_err"] for r in rows), "per_prompt": rows}


def replay_all(graphs) -> None:
    for graph in graphs:
        graph.replay()


def diagnose_decode(engine, spec, prompts, b: int, ctx: float, cfg: dict, row: dict) -> None:
    """Kernel table of the static decode step at batch b, the CPU time of launching its graphs, and
    (b = 1) the step replayed from one whole-model graph instead of several layer slices."""
    dec = engine.runner.decoder
    size, ctxb = dec.bucket(b), dec.context_bucket(int(ctx))
    with torch.inference_mode():
        row["kernels"] = kernel_table(lambda: dec._forward(size, ctxb))
    print_kernel_table(f"{spec.name} decode b={b} (eager static step)", row["kernels"])
    graphs = dec.graphs.get((size, ctxb))
    if graphs is not None:  # CPU time of launching the graphs (the GPU idles until the first starts)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        replay_all(graphs)
        row["graph_launch_cpu_ms"] = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        print(f"  launching {len(graphs)} graphs (CPU): {row['graph_launch_cpu_ms']:.3f} ms")
    if b == 1:
        chunks, dec.chunks = dec.chunks, 1
        dec.graphs.pop((size, ctxb), None)
        row["engine_one_graph_ms"] = median(decode_ms(engine, prompts, cfg["steps"], cfg["warmup"]))
        one = dec.graphs[(size, ctxb)]
        row["engine_one_graph_replay_ms"] = median(device_ms(lambda: replay_all(one), cfg["steps"], 2, "cuda"))
        dec.chunks = chunks
        dec.graphs.pop((size, ctxb), None)
        print(f"  one whole-model graph: step {row['engine_one_graph_ms']:.3f} ms, "
              f"replay {row['engine_one_graph_replay_ms']:.3f} ms")


def bench_model(name: str, prefill_b, decode_b, with_hf: bool, cfg: dict, ceil: dict, diagnose: bool = False) -> dict:
    spec, dev, dtype, P = get_spec(name), cfg["device"], cfg["dtype"], cfg["prompt"]
    nbytes = torch.finfo(dtype).bits // 8
    t0 = time.perf_counter()
    weights = random_weights(spec, dtype, dev, seed=0)
    hf = hf_model(spec, weights, dtype) if with_hf else None
    max_len = P + cfg["warmup"] + cfg["steps"] + 8
    max_batch = max(*decode_b, cfg["check_prompts"] if with_hf else 1)
    engine = build_engine(spec, weights, dev, dtype, max_batch, max(max_len, cfg["check_len"] + cfg["check_tokens"]))
    del weights
    out = {"setup_s": round(time.perf_counter() - t0, 1), "prefill": {}, "decode": {}}
    model = engine.runner.model
    for b in prefill_b:
        prompts = random_prompts(spec, b, P, seed=b)
        ids = torch.tensor(prompts, device=dev)
        row = floors(spec, "prefill", b, P, P, ceil, nbytes)
        row["engine_ms"] = median(prefill_ms(engine, prompts, cfg["reps"]))
        plain = PlainTorchDecoder(model, b, P)
        row["plain_torch_ms"] = median(device_ms(lambda: plain.prefill(ids), cfg["reps"], 1, dev))
        del plain
        if hf is not None:
            row["hf_eager_ms"] = median(hf_prefill_ms(hf, ids, cfg["reps"]))
        out["prefill"][f"bsz-{b}"] = row
        if diagnose and b == max(prefill_b):
            try:
                row["kernels"] = kernel_table(lambda: prefill_ms(engine, prompts, 1, warmup=0), reps=2)
                print_kernel_table(f"{name} prefill b={b}", row["kernels"])
            except Exception as exc:  # diagnostics must not cost the benchmark
                print(f"  prefill kernel table failed: {exc!r}")
        print(f"  {name} prefill b={b}: " + ", ".join(f"{k}={v:.2f}" for k, v in row.items() if k.endswith("_ms")),
              flush=True)
    for b in decode_b:
        prompts = random_prompts(spec, b, P, seed=100 + b)
        ids = torch.tensor(prompts, device=dev)
        ctx = P + 1 + cfg["warmup"] + cfg["steps"] / 2
        row = floors(spec, "decode", b, ctx, P, ceil, nbytes)
        row["engine_ms"] = median(decode_ms(engine, prompts, cfg["steps"], cfg["warmup"]))
        graphs = engine.runner.decoder.graphs
        if graphs:  # the last captured graph (this batch's bucket): device time of the replay alone
            last = list(graphs.values())[-1]
            row["engine_graph_replay_ms"] = median(device_ms(lambda: replay_all(last), cfg["steps"], 2, dev))
        plain = PlainTorchDecoder(model, b, max_len)
        tok = plain.prefill(ids)
        pos = [P]

        def step():
            plain.decode(tok, pos[0]).tolist()
            pos[0] += 1

        row["plain_torch_ms"] = median(wall_ms(step, cfg["steps"], cfg["warmup"], dev))
        if dev == "cuda":
            row["plain_torch_graph_replay_ms"] = median(device_ms(plain.graph.replay, cfg["steps"], 2, dev))
        del plain
        if hf is not None:
            row["hf_eager_ms"] = median(hf_decode_ms(hf, ids, steps=5))
        out["decode"][f"bsz-{b}"] = row
        if diagnose and b in (1, max(decode_b)):
            try:
                diagnose_decode(engine, spec, prompts, b, ctx, cfg, row)
            except Exception as exc:  # diagnostics must not cost the benchmark
                print(f"  decode diagnostics failed: {exc!r}")
        print(f"  {name} decode b={b}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items() if k.endswith("_ms")),
              flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    if hf is not None:
        out["correctness"] = correctness(engine, hf, spec, cfg, dev)
    if diagnose:
        out["gemm"] = gemm_rates(spec.hidden, spec.ffn, spec.vocab, dtype, rows=(1, 2, 8, 32, 8 * P))
        for g in out["gemm"]:
            print(f"  gemm {g['gemm']:<8} m={g['m']:<5} {g['ms']:.4f} ms (no bias {g['ms_no_bias']:.4f})"
                  f" {g['tb_per_s']:.2f} TB/s {g['tflop_per_s']:.0f} TFLOP/s")
    for phase in ("prefill", "decode"):
        for row in out[phase].values():
            row["ratios"] = {k[:-3]: row[k] / row["floor_ms"] for k in list(row)
                             if k.endswith("_ms") and "floor" not in k}
    del engine, hf, model
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


def print_table(result: dict) -> None:
    cols = [("engine", "engine"), ("replay", "engine_graph_replay"), ("plain+graph", "plain_torch"),
            ("plain replay", "plain_torch_graph_replay"), ("hf eager", "hf_eager")]
    print(f"\n{'model':<14}{'phase':<8}{'b':>3} {'floor ms':>13} " + "".join(f"{c:>16}" for c, _ in cols))
    for name, m in result["models"].items():
        for phase in ("prefill", "decode"):
            for key, row in m[phase].items():
                floor = f"{row['floor_ms']:.2f} ({row['binding'][0]})"
                cells = "".join(f"{row[k + '_ms']:>8.2f} {row['ratios'][k]:>5.2f}x" if k + "_ms" in row
                                else f"{'-':>16}" for _, k in cols)
                print(f"{name:<14}{phase:<8}{key[4:]:>3} {floor:>13} {cells}")
    for name, m in result["models"].items():
        c = m.get("correctness")
        if c:
            print(f"{name}: greedy tokens equal to transformers for all {c['new_tokens']} tokens on "
                  f"{c['all_tokens_match']}/{c['prompts']} prompts; logits rel err (first step) "
                  f"<= {c['max_first_step_rel_err']:.2e}, while agreeing <= {c['max_rel_err_while_agreeing']:.2e}")
            for i, r in enumerate(c["per_prompt"]):
                if "flip" in r:
                    f = r["flip"]
                    print(f"  prompt {i}: flip at token {f['step']}: transformers' top-2 margin "
                          f"{f['hf_top2_margin']:.4f}, engine's {f['engine_margin']:.4f} (max |logit diff| "
                          f"{f['max_abs_logit_diff']:.4f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny shapes")
    ap.add_argument("--models", default=None, help="comma-separated subset of the models to run")
    ap.add_argument("--diagnose", action="store_true", help="kernel tables and cuBLAS rates (first model, GPU)")
    args = ap.parse_args(argv)
    cfg = TINY if args.tiny else FULL
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        ap.error("needs a CUDA GPU (use --tiny for the CPU smoke test)")
    torch.manual_seed(0)
    dev = cfg["device"]
    big = dev == "cuda"
    ceil = {"copy_bytes_per_s": copy_bandwidth(dev, nbytes=(1 << 30) if big else (1 << 24)),
            "matmul_flops_per_s": matmul_rate(dev, n=8192 if big else 256, dtype=cfg["dtype"])}
    import transformers

    result = {"device": torch.cuda.get_device_name() if big else platform.processor() or "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "dtype": str(cfg["dtype"]),
              "prompt_len": cfg["prompt"], "decode_steps": cfg["steps"], "ceilings": ceil, "models": {}}
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
          f"matmul {ceil['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    wanted = None if args.models is None else set(args.models.split(","))
    for i, (name, prefill_b, decode_b, with_hf) in enumerate(cfg["models"]):
        if wanted is None or name in wanted:
            diagnose = args.diagnose and i == 0 and dev == "cuda"
            result["models"][name] = bench_model(name, prefill_b, decode_b, with_hf, cfg, ceil, diagnose)
            if args.json:  # keep what finished if a later model fails
                args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
