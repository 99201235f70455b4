"""Benchmark spotserve's CUDA kernels against the memory floor and plain torch, on one GPU.

Per kernel: time per call, bytes it must move (each input read once, each output written once),
achieved GB/s and its fraction of the device-to-device copy bandwidth measured in the same run.
Decode attention (OPT-6.7B heads: 32 x 128, fp16, 512-token contexts, batch 1/8/32) also runs
against torch scaled_dot_product_attention over a gathered (contiguous) cache, and against its
memory floor, KV bytes / copy bandwidth. Every contender is timed as CUDA-graph replays of
back-to-back calls over enough distinct buffers that the working set exceeds the L2 cache
(except where noted "small": decode-sized inputs that a real step would find in L2 anyway).

The OPT-6.7B linear layers (qkv, out, fc1, fc2 weights) at decode batches M = 1, 2, 4, 8 run
ops.skinny_gemm against cuBLAS (F.linear), with bytes = weight + activations read once.

Usage: python scripts/bench_kernels.py [--json PATH] [--quick] [--sections attention,gemm,elementwise]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import torch
import torch.nn.functional as F

from spotserve import ops

DEV = "cuda"
H16 = torch.float16
WORKING_SET = 256 << 20  # bytes of distinct inputs per timed graph (> 4x an H100's 50 MB L2)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written.

    A 1 GiB fp32 copy, after half a second of copies so the clocks have ramped up.
    """
    src = torch.randn(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    for _ in range(200):
        dst.copy_(src)
    ms = time_graph(lambda i: dst.copy_(src), 4, replays=20)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def time_graph(fn, calls: int, replays: int = 30) -> float:
    """Median milliseconds per call of fn(i), i < calls, captured back to back in one CUDA graph."""
    for i in range(min(calls, 2)):  # warm-up outside capture (lazy init, allocator)
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times) / calls


def sets_for(nbytes_per_set: int, cap: int = 64) -> int:
    return max(2, min(cap, math.ceil(WORKING_SET / max(nbytes_per_set, 1))))


def bench_decode_attention(bw: float, batches, context: int = 512, heads: int = 32, dim: int = 128,
                           block_size: int = 16) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        kv_bytes = 2 * batch * context * heads * dim * 2
        layers = sets_for(kv_bytes)  # one cache per "layer", as a decode step walks them
        blocks_per_seq = context // block_size
        num_blocks = batch * blocks_per_seq
        k_caches = [torch.randn(num_blocks, block_size, heads, dim, generator=g).to(H16).to(DEV) for _ in range(layers)]
        v_caches = [torch.randn(num_blocks, block_size, heads, dim, generator=g).to(H16).to(DEV) for _ in range(layers)]
        # Fragmented: every sequence's blocks scattered over the pool; twice as wide as needed (the
        # unused half, block 0, is never read) so the same tables serve a launch for 2x the context.
        tables = [torch.cat([torch.randperm(num_blocks, generator=g).int().view(batch, blocks_per_seq),
                             torch.zeros(batch, blocks_per_seq, dtype=torch.int32)], dim=1).to(DEV)
                  for _ in range(layers)]
        lens = torch.full((batch,), context, dtype=torch.int32, device=DEV)
        qs = [torch.randn(batch, heads, dim, generator=g).to(H16).to(DEV) for _ in range(layers)]
        out = torch.empty(batch, heads, dim, dtype=H16, device=DEV)
        scale = dim**-0.5

        def dense(cache, table):  # [batch, heads, context, dim], contiguous
            return torch.stack([ops.gather_kv(cache, table[s], context) for s in range(batch)]).transpose(1, 2).contiguous()

        k_dense = [dense(k_caches[i], tables[i]) for i in range(layers)]
        v_dense = [dense(v_caches[i], tables[i]) for i in range(layers)]

        def ours(partition, planned=context):
            return lambda i: ops.paged_decode_attention(out, qs[i], k_caches[i], v_caches[i], tables[i], lens,
                                                        planned, scale, partition)

        def sdpa(i):  # output from the graph's pool: no extra copy kernel is timed
            return F.scaled_dot_product_attention(qs[i].unsqueeze(2), k_dense[i], v_dense[i], scale=scale)

        def no_cluster(i):
            os.environ["SPOTSERVE_ATTN_CLUSTER"] = "0"  # read at launch time, i.e. while capturing
            ours(0)(i)
            os.environ.pop("SPOTSERVE_ATTN_CLUSTER")

        # Correctness of what is timed: ours against SDPA on the same data.
        ours(0)(0)
        ref = sdpa(0)[:, :, 0].float()
        err = float((out.float() - ref).norm() / ref.norm())
        floor_us = kv_bytes / (bw * 1e9) * 1e6
        t_sdpa = time_graph(sdpa, layers) * 1e3
        # "bucket": launched for twice the context, as a CUDA graph captured for the next power of
        # two runs a 513..1024-token decode step.
        contenders = [("spotserve auto", ours(0)), ("spotserve auto, bucket 2x", ours(0, 2 * context)),
                      ("spotserve auto, no cluster", no_cluster)]
        contenders += [(f"spotserve p={p}", ours(p)) for p in (32, 64, 128, 256, 512)]
        for name, fn in contenders + [("torch sdpa (contiguous)", sdpa)]:
            t = t_sdpa if fn is sdpa else time_graph(fn, layers) * 1e3
            rows.append({"kernel": "decode_attention", "contender": name, "batch": batch, "context": context,
                         "heads": heads, "head_dim": dim, "us": t, "kv_bytes": kv_bytes,
                         "GBps": kv_bytes / (t * 1e-6) / 1e9, "floor_us": floor_us, "x_floor": t / floor_us,
                         "speedup_vs_sdpa": t_sdpa / t, "rel_err_vs_sdpa": err})
        del k_caches, v_caches, k_dense, v_dense
        torch.cuda.empty_cache()
    return rows


# OPT-6.7B linear layers (N x K of the weight) as one decode step runs them.
GEMM_SHAPES = (("qkv", 12288, 4096), ("out", 4096, 4096), ("fc1", 16384, 4096), ("fc2", 4096, 16384))


def bench_skinny_gemm(bw: float, rows_m=(1, 2, 4, 8), splits=(1, 2, 4)) -> list[dict]:
    """ops.skinny_gemm vs cuBLAS (F.linear) for the OPT-6.7B weights at decode batch sizes.

    Bytes = weight + x + y + bias, i.e. each read once; the weight dominates. Forced split_k
    variants show what the planner's choice costs at the smallest and largest batch.
    """
    rows = []
    g = torch.Generator(device=DEV).manual_seed(2)
    for name, n, k in GEMM_SHAPES:
        w_bytes = n * k * 2
        sets = sets_for(w_bytes)  # distinct weights: every call streams its weight from HBM
        ws = [(torch.randn(n, k, generator=g, device=DEV) * k**-0.5).to(H16) for _ in range(sets)]
        bias = torch.randn(n, generator=g, device=DEV).to(H16)
        for m in rows_m:
            xs = [torch.randn(m, k, generator=g, device=DEV).to(H16) for _ in range(sets)]
            nbytes = w_bytes + m * k * 2 + m * n * 2 + n * 2
            want = F.linear(xs[0].float(), ws[0].float(), bias.float())
            contenders = [("cuBLAS (F.linear)", None), ("spotserve auto", 0)]
            if m in (rows_m[0], rows_m[-1]):
                contenders += [(f"spotserve split={s}", s) for s in splits]
            for contender, split in contenders:
                if split is None:
                    fn = lambda i: F.linear(xs[i], ws[i], bias)  # noqa: E731
                else:
                    fn = lambda i, split=split: ops.skinny_gemm(xs[i], ws[i], bias, split)  # noqa: E731
                got = fn(0).float()
                err = float((got - want).norm() / want.norm())
                row = _row("linear", f"{name} {n}x{k}", contender, time_graph(fn, sets), nbytes, bw)
                row.update(m=m, n=n, k=k, rel_err=err)
                rows.append(row)
        del ws
        torch.cuda.empty_cache()
    return rows


def _row(kernel, shape, contender, ms, nbytes, bw, small=False):
    t = ms * 1e3
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"kernel": kernel, "shape": shape, "contender": contender, "us": t, "bytes": nbytes, "GBps": gbps,
            "frac_copy_bw": gbps / bw, "small": small}


def bench_elementwise(bw: float, quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    r16 = lambda *s: torch.randn(*s, generator=g).to(H16).to(DEV)  # noqa: E731
    token_counts = (32,) if quick else (32, 4096)

    for tokens in token_counts:
        small = tokens <= 32
        # Fused residual add + norm, hidden of OPT-6.7B (LayerNorm) and LLaMA-30B (RMSNorm).
        for kind, hidden in (("layer", 4096), ("rms", 6656)):
            nbytes = 4 * tokens * hidden * 2 + 2 * hidden * 2
            n = sets_for(4 * tokens * hidden * 2)
            xs, rs = [r16(tokens, hidden) for _ in range(n)], [r16(tokens, hidden) for _ in range(n)]
            w, b = r16(hidden), r16(hidden)
            if kind == "layer":
                fused = lambda i: ops.fused_add_layer_norm(xs[i], rs[i], w, b, 1e-5)  # noqa: E731
                plain_torch = lambda i: (rs[i].add_(xs[i]), xs[i].copy_(F.layer_norm(rs[i], (hidden,), w, b, 1e-5)))  # noqa: E731
            else:
                fused = lambda i: ops.fused_add_rms_norm(xs[i], rs[i], w, 1e-6)  # noqa: E731
                plain_torch = lambda i: ops.fused_add_rms_norm_ref(xs[i], rs[i], w, 1e-6)  # noqa: E731
            name = f"fused_add_{kind}_norm"
            shape = f"{tokens}x{hidden}"
            rows.append(_row(name, shape, "spotserve", time_graph(fused, n), nbytes, bw, small))
            rows.append(_row(name, shape, "torch unfused", time_graph(plain_torch, n), nbytes, bw, small))

        # Rotary, GPT-NeoX-20B heads (64 x 96, rotary 24) and LLaMA-30B (52 x 128, full).
        for heads, dim, rot in ((64, 96, 24), (52, 128, 128)):
            per = tokens * 3 * heads * dim * 2
            n = sets_for(per)
            qkvs = [r16(tokens, 3 * heads, dim) for _ in range(n)]
            cache = ops.rotary_cos_sin_cache(2048, rot, device=DEV)
            pos = torch.randint(0, 2048, (tokens,), generator=g).to(DEV)
            nbytes = 2 * tokens * 2 * heads * rot * 2 + tokens * rot * 4 + tokens * 8
            fused = lambda i: ops.rotary_embedding(qkvs[i][:, :heads], qkvs[i][:, heads:2 * heads], pos, cache, rot)  # noqa: E731
            plain = lambda i: ops.rotary_embedding_ref(qkvs[i][:, :heads], qkvs[i][:, heads:2 * heads], pos, cache, rot)  # noqa: E731
            shape = f"{tokens}x{heads}x{dim} rot{rot}"
            rows.append(_row("rotary_embedding", shape, "spotserve", time_graph(fused, n), nbytes, bw, small))
            rows.append(_row("rotary_embedding", shape, "torch unfused", time_graph(plain, n), nbytes, bw, small))

        # Bias + activation on the FFN's first matmul output: OPT relu, NeoX gelu, LLaMA swiglu.
        for act, cols in (("relu", 16384), ("gelu", 24576), ("swiglu", 17920)):
            in_cols = 2 * cols if act == "swiglu" else cols
            n = sets_for(tokens * in_cols * 2)
            xs = [r16(tokens, in_cols) for _ in range(n)]
            out = torch.empty(tokens, cols, dtype=H16, device=DEV)
            bias = None if act == "swiglu" else r16(in_cols)
            nbytes = tokens * (in_cols + cols) * 2 + (in_cols * 2 if bias is not None else 0)
            fused = lambda i: ops.bias_act(out, xs[i], bias, act)  # noqa: E731
            plain = lambda i: ops.bias_act_ref(out, xs[i], bias, act)  # noqa: E731
            shape = f"{tokens}x{in_cols} {act}"
            rows.append(_row("bias_act", shape, "spotserve", time_graph(fused, n), nbytes, bw, small))
            rows.append(_row("bias_act", shape, "torch unfused", time_graph(plain, n), nbytes, bw, small))

        # KV cache write for OPT-6.7B (32 x 128), one token per sequence or a prefill.
        heads, dim = 32, 128
        n = sets_for(tokens * 2 * heads * dim * 2)
        kvs = [r16(tokens, 3, heads, dim) for _ in range(n)]
        kc = torch.empty(tokens * 4 // 16 + 1, 16, heads, dim, dtype=H16, device=DEV)
        vc = torch.empty_like(kc)
        slots = torch.randperm(kc.shape[0] * 16, generator=g)[:tokens].to(DEV)
        nbytes = 4 * tokens * heads * dim * 2 + tokens * 8
        fused = lambda i: ops.write_kv_cache(kvs[i][:, 1], kvs[i][:, 2], kc, vc, slots)  # noqa: E731

        def plain(i):  # what torch offers without a kernel: two index_copy_ (no padding slots here)
            kc.view(-1, heads, dim).index_copy_(0, slots, kvs[i][:, 1])
            vc.view(-1, heads, dim).index_copy_(0, slots, kvs[i][:, 2])
        rows.append(_row("write_kv_cache", f"{tokens}x{heads}x{dim}", "spotserve", time_graph(fused, n), nbytes, bw, small))
        rows.append(_row("write_kv_cache", f"{tokens}x{heads}x{dim}", "torch index_copy", time_graph(plain, n), nbytes, bw,
                         small))
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--quick", action="store_true", help="decode attention at batch 1 only, small shapes only")
    ap.add_argument("--sections", default="attention,gemm,elementwise",
                    help="comma-separated subset of attention, gemm, elementwise (default: all)")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    unknown = sections - {"attention", "gemm", "elementwise"}
    if unknown:
        raise SystemExit(f"bench_kernels: unknown --sections {sorted(unknown)}")
    if not torch.cuda.is_available() or not ops.WITH_CUDA:
        raise SystemExit("bench_kernels: needs a CUDA GPU and spotserve._C built with CUDA (SPOTSERVE_CUDA=1)")
    torch.manual_seed(0)
    bw_start = copy_bandwidth()
    attn = bench_decode_attention(bw_start, (1,) if args.quick else (1, 8, 32)) if "attention" in sections else []
    gemm = bench_skinny_gemm(bw_start, (1, 8) if args.quick else (1, 2, 4, 8)) if "gemm" in sections else []
    elem = bench_elementwise(bw_start, args.quick) if "elementwise" in sections else []
    bw_end = copy_bandwidth()
    bw = max(bw_start, bw_end)  # the higher rate gives the stricter floor
    for r in attn:
        r["floor_us"] = r["kv_bytes"] / (bw * 1e9) * 1e6
        r["x_floor"] = r["us"] / r["floor_us"]
    for r in elem + gemm:
        r["frac_copy_bw"] = r["GBps"] / bw
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "copy_GBps": bw, "copy_GBps_at_start": bw_start, "copy_GBps_at_end": bw_end,
              "decode_attention": attn, "skinny_gemm": gemm, "kernels": elem}
    print(f"device {props.name}, torch {torch.__version__}, copy bandwidth {bw:.0f} GB/s (read + write; "
          f"{bw_start:.0f} at the start, {bw_end:.0f} at the end)\n")
    print(f"{'decode attention (32x128 fp16, ctx 512)':<42}{'batch':>6}{'us':>9}{'GB/s':>8}{'x floor':>9}"
          f"{'vs sdpa':>9}{'err':>9}")
    for r in attn:
        print(f"{r['contender']:<42}{r['batch']:>6}{r['us']:>9.2f}{r['GBps']:>8.0f}{r['x_floor']:>9.2f}"
              f"{r['speedup_vs_sdpa']:>8.2f}x{r['rel_err_vs_sdpa']:>9.1e}")
    if gemm:
        print(f"\n{'linear (fp16, y = x W^T + b)':<26}{'M':>3}  {'contender':<20}{'us':>9}{'GB/s':>8}{'of copy':>9}"
              f"{'vs cuBLAS':>11}{'err':>9}")
        base = {(r["shape"], r["m"]): r["us"] for r in gemm if r["contender"].startswith("cuBLAS")}
        for r in gemm:
            print(f"{r['shape']:<26}{r['m']:>3}  {r['contender']:<20}{r['us']:>9.2f}{r['GBps']:>8.0f}"
                  f"{r['frac_copy_bw']:>8.0%}{base[(r['shape'], r['m'])] / r['us']:>10.2f}x{r['rel_err']:>9.1e}")
    print(f"\n{'kernel':<22}{'shape':<26}{'contender':<17}{'us':>9}{'GB/s':>8}{'of copy':>9}")
    for r in elem:
        print(f"{r['kernel']:<22}{r['shape']:<26}{r['contender']:<17}{r['us']:>9.2f}{r['GBps']:>8.0f}"
              f"{r['frac_copy_bw']:>8.0%}{' small' if r['small'] else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
