"""Where a step's device time goes: per-kernel tables (torch.profiler) and cuBLAS rates on the model's shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from spotserve.profile.timing import device_ms, median


def kernel_table(fn, reps: int = 3, top: int = 10) -> dict:
    """Device µs per call of fn() by kernel name (top entries), the kernel count and the total µs per call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:90], "us": us / reps, "calls": e.count / reps})
    rows.sort(key=lambda r: -r["us"])
    return {"total_us": sum(r["us"] for r in rows), "kernels": sum(r["calls"] for r in rows), "top": rows[:top]}


def print_kernel_table(title: str, table: dict) -> None:
    print(f"  {title}: {table['total_us'] / 1e3:.3f} ms of kernels, {table['kernels']:.0f} launches per call")
    for r in table["top"]:
        print(f"    {r['us']:9.1f} us {r['calls']:6.0f}x  {r['kernel']}")


def gemm_rates(hidden: int, ffn: int, vocab: int, dtype=torch.float16, rows=(1, 2, 8, 32, 4096)) -> list[dict]:
    """cuBLAS time of the decoder's products at several row counts (with bias, as the engine calls them)."""
    shapes = {"qkv": (3 * hidden, hidden), "o": (hidden, hidden), "up": (ffn, hidden), "down": (hidden, ffn),
              "lm_head": (vocab, hidden)}
    out = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=dtype, device="cuda") * 0.02
        b = torch.randn(n, dtype=dtype, device="cuda") if name != "lm_head" else None
        for m in rows:
            x = torch.randn(m, k, dtype=dtype, device="cuda")
            ms = median(device_ms(lambda: F.linear(x, w, b), 20, warmup=3, device="cuda"))
            nobias = median(device_ms(lambda: F.linear(x, w), 20, warmup=3, device="cuda")) if b is not None else ms
            out.append({"gemm": name, "m": m, "n": n, "k": k, "ms": ms, "ms_no_bias": nobias,
                        "tb_per_s": (n * k + m * k + m * n) * 2 / (ms / 1e3) / 1e12,
                        "tflop_per_s": 2 * m * n * k / (ms / 1e3) / 1e12})
    return out
