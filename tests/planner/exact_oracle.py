"""Exact-byte oracles for migration plans: sizes from sharding.shard_slice, and the executor's resolution."""
from __future__ import annotations

import math
from collections import defaultdict

from spotserve.daemon.layout import KVRequest, Layout
from spotserve.daemon.resolve import resolve
from spotserve.models import hf, sharding
from spotserve.planner import ParallelConfig, Workload
from spotserve.planner.cost import CostModel
from spotserve.planner.profiles import parse_profile
from spotserve.models.spec import get_spec


def cost_for(spec_name: str, tps: list[int], dtype: str = "fp16", memory: int = 10 ** 12) -> CostModel:
    """A cost model for any spec with made-up timings (migration only needs shapes and bytes)."""
    data = {"name": "fake", "layer_num": get_spec(spec_name).num_layers, "pp_init_comm": 1.0, "pp_incr_comm": 0.1,
            "embed": [0.1, 0.2], "final_fix_factor": 1.0, "dtype": dtype, "reserved_bytes": 0}
    for tp in tps:
        data[f"tp-{tp}"] = {f"bsz-{b}": {"init": 10.0 * b / tp, "incr": 1.0 / tp} for b in (1, 2)}
    return CostModel(parse_profile(data), get_spec(spec_name), gpu_memory_bytes=memory,
                     workload=Workload(prompt_len=16, output_len=8))


def shard_bytes(spec, pp: int, tp: int, stage: int, shard: int, dtype_bytes: int) -> dict[str, tuple]:
    """HF name -> (dim, start, end, row bytes) a position holds; replicated: (None, 0, 0, whole bytes)."""
    shapes = hf.shape_map(spec)
    out = {}
    for name in sharding.stage_tensor_names(spec, pp, stage):
        shape = shapes.get(name) or (spec.vocab, spec.hidden)
        sl = sharding.shard_slice(spec, name, tp, shard)
        if sl is None:
            out[name] = (None, 0, 0, math.prod(shape) * dtype_bytes)
        else:
            out[name] = (sl[0], sl[1], sl[2], math.prod(shape) // shape[sl[0]] * dtype_bytes)
    return out


def _pos_bytes(spec, layout: Layout, gpu: str, db: int) -> dict[str, tuple]:
    pos = layout.position(gpu)
    pp, tp = layout.shapes[pos.replica]
    return shard_bytes(spec, pp, tp, pos.stage, pos.shard, db)


def check_exact(cost: CostModel, cur: ParallelConfig | None, cur_place: dict, new: ParallelConfig, placement: dict,
                transfers, continued: dict[str, int] = None, requests=(), live=None, per_transfer: bool = True):
    """Weight bytes: per destination, sum of its transfers + what it keeps == its new shard (shard_slice);
    per transfer (``per_transfer``): nbytes == the executor's exact bytes, and it needs no unnamed move."""
    spec, db = cost.spec, cost.dtype_bytes
    new_l = Layout.of(new, placement)
    old_l = Layout.of(cur, cur_place) if cur is not None else None
    live = set(old_l.gpus() if old_l else []) if live is None else set(live)
    got = defaultdict(int)
    for t in transfers:
        if t.tensor != "kv":
            got[t.dst] += t.nbytes
    for gpu in new_l.gpus():
        need = _pos_bytes(spec, new_l, gpu, db)
        total = sum(b if d is None else (e - s) * b for d, s, e, b in need.values())
        kept = 0
        if old_l is not None and gpu in live and old_l.position(gpu) is not None:
            held = _pos_bytes(spec, old_l, gpu, db)
            for name, (d, s, e, b) in need.items():
                if name in held:
                    hd, hs, he, _ = held[name]
                    kept += b if d is None else max(0, min(e, he) - max(s, hs)) * b
        assert got[gpu] + kept == total, (gpu, got[gpu], kept, total)
    if per_transfer:
        reqs = [KVRequest(q.request_id, q.replica, continued[q.request_id], q.tokens)
                for q in requests if q.request_id in (continued or {})]
        res = resolve(spec, old_l, new_l, list(transfers), reqs, db, live)
        # Disk reads of one unit are interchangeable: the executor may attribute a lost piece to any
        # of that unit's disk transfers, so those are compared as a group; live sources per transfer.
        disk = defaultdict(lambda: [0, 0])
        for c in res.checks:
            t = transfers[c.index]
            if t.src is None:
                g = disk[(t.dst, t.tensor, t.layer)]
                g[0] += c.planner
                g[1] += c.exact
            else:
                assert c.planner == c.exact, (t, c.exact)
        for key, (planned, exact) in disk.items():
            assert planned == exact, (key, planned, exact)
        assert res.summary()["extra_moves"] == 0, res.summary()
