"""Timers (device events on CUDA, wall clock otherwise) and the two ceilings of the machine.

Ceilings, measured the way the floors use them: a device-to-device copy (bytes read + written
per second) and a large fp16 matrix product on random data (FLOP/s).
"""
from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall_ms(fn, reps: int, warmup: int = 1, device="cpu") -> list[float]:
    """Wall-clock ms of each of `reps` calls of fn() after `warmup` calls (synchronised around each)."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def device_ms(fn, reps: int, warmup: int = 1, device="cpu") -> list[float]:
    """Device time (CUDA events) in ms of each of `reps` calls; wall clock on the CPU."""
    if torch.device(device).type != "cuda":
        return wall_ms(fn, reps, warmup, device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = median(device_ms(lambda: dst.copy_(src), reps, warmup=3, device=device))
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(device="cuda", n: int = 8192, dtype=torch.float16, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data (rotating two input sets)."""
    sets = [(torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device))
            for _ in range(2)]
    out = torch.empty(n, n, dtype=dtype, device=device)
    i = [0]

    def mm():
        a, b = sets[i[0] % 2]
        i[0] += 1
        torch.mm(a, b, out=out)

    ms = median(device_ms(mm, reps, warmup=3, device=device))
    return 2 * n ** 3 / (ms / 1e3)
