"""Brute-force pipeline schedule (event by event) used to check the CostModel's closed forms."""
from __future__ import annotations


def simulate(stage_prefill: list[float], stage_decode: list[float], hop_prefill: float, hop_decode: float,
             micro_batches: int, tokens: int) -> tuple[float, list[list[float]]]:
    """Run m micro-batches through prefill then tokens - 1 decode passes; each stage serves one
    micro-batch at a time in order of readiness (FIFO, ties by index), a hop is a pure delay, and
    decoding starts once the whole batch is prefilled (the engine's phase barrier).

    Returns (time the last micro-batch finishes, per micro-batch list of pass completion times)."""
    pp = len(stage_prefill)
    free = [0.0] * pp  # when each stage is next idle
    done: list[list[float]] = [[] for _ in range(micro_batches)]
    passes = [0] * micro_batches
    # state per micro-batch: (pass index, stage, ready time at that stage)
    events = [(0.0, i, 0, 0) for i in range(micro_batches)]  # (ready time, mb, pass, stage)
    while events:
        # the stage takes the micro-batch that became ready first (ties: lower index), one event at a time
        events.sort()
        t, i, k, s = events.pop(0)
        work = stage_prefill[s] if k == 0 else stage_decode[s]
        start = max(t, free[s])
        end = start + work
        free[s] = end
        if s + 1 < pp:
            events.append((end + (hop_prefill if k == 0 else hop_decode), i, k, s + 1))
            continue
        done[i].append(end)
        passes[i] += 1
        back = hop_decode if pp > 1 else 0.0
        if k == 0 and all(passes) and tokens > 1:  # barrier: the last prefill releases every decode
            t_pre = max(d[0] for d in done)
            events.extend((t_pre + back, j, 1, 0) for j in range(micro_batches))
        elif 0 < k and k + 1 < tokens:
            events.append((end + back, i, k + 1, 0))
    return max(d[-1] for d in done), done
