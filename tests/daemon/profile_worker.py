"""Worker of test_executor_profile.py: one of 2 gloo processes (RANK / WORLD_SIZE / MASTER_* set) moving a
tiny model tp1 (g0) -> tp2 (g0, g1) and the KV of a few requests g0 -> g1 with prepare(allocate=True)
and profile=True, then once more without either. Writes OUT/<rank>.json with what the test checks.

Usage: python profile_worker.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from spotserve.daemon.executor import MigrationExecutor
from spotserve.daemon.layout import KVRequest, Layout, box_shape, unit_of
from spotserve.engine.dist import init_world
from spotserve.engine.kv_reshard import RequestKV
from spotserve.models.spec import OPT_TINY
from spotserve.planner.types import ParallelConfig

SPEC = replace(OPT_TINY, name="opt-tiny8u", num_heads=8, hidden=64, ffn=90, vocab=162)
GPUS = ["g0", "g1"]
BS = 4


def layouts():
    x, y = ParallelConfig(2, 1, 1, 1), ParallelConfig(2, 1, 1, 1)
    # replica 0: g0 at tp 1 -> replica 0 on g1 (its KV moves); weights: replica 1 on g1 -> g0 keeps
    old = Layout.of(x, dict(zip(x.positions(), GPUS)), BS)
    new_kv = Layout.of(y, dict(zip(y.positions(), GPUS[::-1])), BS)
    z = ParallelConfig(1, 1, 2, 1)
    old_w = Layout.of(ParallelConfig(1, 1, 1, 1), {ParallelConfig(1, 1, 1, 1).positions()[0]: "g0"}, BS)
    new_w = Layout.of(z, dict(zip(z.positions(), GPUS)), BS)
    return (old_w, new_w, []), (old, new_kv, [KVRequest("a", 0, 0, 9), KVRequest("b", 0, 0, 23)])


def full_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    old = Layout.of(ParallelConfig(1, 1, 1, 1), {ParallelConfig(1, 1, 1, 1).positions()[0]: "g0"}, BS)
    return {n: torch.randn(box_shape(SPEC, n, r.dim, r.end - r.start), generator=g)
            for n, r in old.weight_ranges(SPEC, "g0").items()}


def main() -> int:
    out = Path(sys.argv[1])
    world = init_world(timeout_s=60.0)
    torch.set_num_threads(1)
    me = GPUS[world.rank]
    full = full_weights()
    result = {}
    for case, (old, new, reqs) in zip(("weights", "kv"), layouts()):
        weights = {n: full[n].narrow(r.dim, r.start, r.end - r.start).contiguous()
                   for n, r in old.weight_ranges(SPEC, me).items()}
        kv = {}
        held = old.kv_ranges(SPEC, me)
        for q in reqs:
            if held[0] == q.old_replica:
                data = torch.full((-(-q.num_tokens // BS), held[1][1] - held[1][0], 2, held[2][1] - held[2][0], BS,
                                   SPEC.head_dim), float(len(q.request_id) + q.num_tokens))
                kv[q.request_id] = RequestKV(q.request_id, q.num_tokens, BS, held[1], held[2], data)
        ex = MigrationExecutor(SPEC, me, {g: i for i, g in enumerate(GPUS)}, dtype=torch.float32,
                               staging_bytes=16 << 10, solo_bytes=1 << 10, round_bytes=8 << 10)
        prep = ex.prepare(old, new, [], reqs, allocate=True)
        units = []
        o = ex.run(old, new, [], weights, kv=kv, requests=reqs, prepared=prep, profile=True,
                   on_arrival=lambda unit: units.append(list(unit)))
        again = ex.run(old, new, [], weights, kv=kv, requests=reqs)
        want = {n: full[n].narrow(r.dim, r.start, r.end - r.start) for n, r in new.weight_ranges(SPEC, me).items()}
        want_units = {unit_of(SPEC, n, True) for n in want}
        if o.kv:
            want_units |= {("kv", layer) for layer in range(*new.kv_ranges(SPEC, me)[1])}
        st = o.stats
        result[case] = {
            "identical": all(torch.equal(o.weights[n], t) and torch.equal(again.weights[n], t)
                             for n, t in want.items()),
            "kv_values": {rid: sorted(set(p.data.flatten().tolist())) for rid, p in o.kv.items()},
            "prepared_used": sorted(n for n, t in prep.tensors.items()
                                    if (o.weights.get(n) is t) or (n.startswith("kv/") and o.kv[n[3:]].data is t)),
            "prepared": sorted(prep.tensors), "prepared_alloc_seconds": prep.alloc_seconds,
            "stats": {k: v for k, v in st.__dict__.items() if k != "timing"}, "timing": st.timing,
            "again_timing": again.stats.timing, "again_alloc_s": again.stats.alloc_s,
            "units": units, "want_units": sorted(map(list, want_units))}
    (out / f"{world.rank}.json").write_text(json.dumps(result))
    world.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
