"""bench_two_gpu.py's executor phase: the migration executor on two workers against raw p2p of the same bytes.

Scenarios: weights-tp1-to-tp2 (the whole model on worker 0 -> tp=2: half of every split tensor to
worker 1, worker 0 copies its own half locally) and kv-blocks (KV of `kv_requests` requests of
`kv_tokens` tokens worker 0 -> worker 1, weights stay). For each, per executor setting of the
sweep (`--exec-sweep`, the first one is the executor's defaults):
  move      run() into new tensors made ahead by prepare(allocate=True) (zeroed before every
            repeat, outside the time): the migration itself
  +alloc    (first setting) run() making its own tensors after torch.cuda.empty_cache(), so every
            new tensor is a cudaMalloc inside the time, as without prepare(allocate=True)
  rounds    NCCL alone on the executor's schedule (same rounds, messages and sizes, no copies):
            what that message structure can reach at best
  raw       one message per direction of the same bytes
  timeline  one profiled run (its outcome is the one checked): host seconds per step and
            per-round CUDA-event times of each worker
and once: 1 GiB as 1..256 messages in one batch_isend_irecv group, and as 4..64 groups in a row
(what many messages per group, or many groups, cost).
"""
from __future__ import annotations

import statistics
import time
import traceback

import torch
import torch.distributed as dist

GPUS = ["g0", "g1"]
SWEEP = {"cuda": "default:round=64M:round=1G:solo=1G:depth=2,staging=1G", "cpu": "default:solo=1G"}
KEYS = {"solo": "solo_bytes", "round": "round_bytes", "staging": "staging_bytes", "depth": "depth"}
HOST_STEPS = ("alloc_s", "pack_s", "post_s", "wait_s", "unpack_s", "local_s", "arrive_s", "drain_s")
MAX_ROWS = 70


def size_of(text: str) -> int:
    """'64M' -> 67108864 (K, M, G: powers of 1024); ValueError otherwise."""
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if mult > 1 else text
    if not digits.isdigit():
        raise ValueError(f"--exec-sweep: {text!r} is not a size (e.g. 64M, 1G)")
    return int(digits) * mult


def parse_sweep(text: str) -> list[tuple[str, dict]]:
    """'default:round=64M:solo=1G,depth=2' -> [(label, MigrationExecutor keyword arguments)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(":"))):
        kw = {}
        if item != "default":
            for part in item.split(","):
                k, _, v = part.partition("=")
                key = KEYS.get(k.strip())
                if key is None or not v:
                    raise ValueError(f"--exec-sweep: bad setting {part!r} (use {', '.join(k + '=' for k in KEYS)})")
                kw[key] = int(v) if key == "depth" else size_of(v.strip())
        out.append((item, kw))
    if not out:
        raise ValueError("--exec-sweep: no setting")
    return out


def agree(run, ok: bool) -> bool:
    """True when every worker says ok (a MIN all-reduce)."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=run.dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_int(run, x: int) -> list[int]:
    t = torch.tensor([x], dtype=torch.int64, device=run.dev)
    both = [torch.zeros(1, dtype=torch.int64, device=run.dev) for _ in range(2)]
    dist.all_gather(both, t)
    return [int(b) for b in both]


def both(run, key: str, obj):
    """[worker 0's obj, worker 1's obj] on every worker (JSON through the store)."""
    return [run.share(f"{key}-{r}", obj if run.rank == r else None, r) for r in range(2)]


def timed(run, fn, repeat: int, before=None) -> list[float]:
    """Wall seconds of fn() per repeat, the slowest worker's (after one warm-up); before() runs
    ahead of each call, outside the time."""
    if before is not None:
        before()
    fn()
    out = []
    for _ in range(repeat):
        if before is not None:
            before()
        run.sync()
        t0 = time.perf_counter()
        fn()
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=run.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out.append(float(t))
    return out


def cuda_sync(run) -> None:
    if run.dev == "cuda":
        torch.cuda.synchronize()


# --- scenarios ------------------------------------------------------------------------------------
def plan_scenario(spec, x, px, y, py, inherits, running):
    """(old layout, new layout, planner transfers, KV requests) of moving config x on px to y on py."""
    from spotserve.daemon.layout import KVRequest, Layout
    from spotserve.planner import GPU as PGPU, CostModel
    from spotserve.planner.migration import MigrationPlanner
    from spotserve.planner.profiles import parse_profile
    from spotserve.planner.types import ReconfigurationPlan

    data = {"name": "bench", "layer_num": spec.num_layers, "pp_init_comm": 1.0, "pp_incr_comm": 0.1,
            "embed": [0.1], "final_fix_factor": 1.0, "dtype": "fp16", "reserved_bytes": 0}
    for tp in (1, 2):  # any cost figures do: the plan's transfers depend on the layouts only
        data[f"tp-{tp}"] = {f"bsz-{b}": {"init": 10.0 * b / tp, "incr": 1.0 + b / tp} for b in (1, 64)}
    cost = CostModel(parse_profile(data), spec, gpu_memory_bytes=1 << 40)
    place_x, place_y = dict(zip(x.positions(), px)), dict(zip(y.positions(), py))
    gpus = [PGPU(g, "i0", i, 1 << 40) for i, g in enumerate(GPUS)]
    plan = MigrationPlanner(cost).migrate(y, None, place_y, inherits, gpus, ReconfigurationPlan(x, place_x, [], 0.0),
                                          running)
    reqs = [KVRequest(q.request_id, 0, plan.continued[q.request_id], q.tokens) for q in running]
    return Layout.of(x, place_x, 16), Layout.of(y, place_y, 16), plan.transfers, reqs


def tp1_to_tp2(spec):
    """The whole model on g0 (tp=1) -> tp=2 on g0 + g1 (g1 receives half of every split tensor)."""
    from spotserve.planner.types import ParallelConfig

    return plan_scenario(spec, ParallelConfig(1, 1, 1, 1), ["g0"], ParallelConfig(1, 1, 2, 1), GPUS, {0: 0}, [])


def kv_scenario(spec, n: int, tokens: int):
    """Two replicas swap GPUs: the KV of n requests of replica 0 moves g0 -> g1 (weights stay)."""
    from spotserve.planner.types import ParallelConfig, RunningRequest

    running = [RunningRequest(f"r{i}", 0, tokens, tokens, 0, 1) for i in range(n)]
    return plan_scenario(spec, ParallelConfig(2, 1, 1, 64), GPUS, ParallelConfig(2, 1, 1, 64), GPUS[::-1],
                         {0: 0, 1: 1}, running)


def executor_inputs(run, me: str, build):
    """Layouts, transfers and KV requests of a scenario, this worker's old shards and KV pieces (ones)."""
    from spotserve.engine.kv_reshard import RequestKV

    old, new, transfers, reqs = build()
    full = run.weights()
    weights = {n: full[n].narrow(r.dim, r.start, r.end - r.start).contiguous()
               for n, r in old.weight_ranges(run.spec, me).items()}
    kv = {}
    held = old.kv_ranges(run.spec, me)
    for q in reqs:
        if held is not None and held[0] == q.old_replica:
            nb = -(-q.num_tokens // old.block_size)
            data = torch.ones(nb, held[1][1] - held[1][0], 2, held[2][1] - held[2][0], old.block_size,
                              run.spec.head_dim, dtype=run.dtype, device=run.dev)
            kv[q.request_id] = RequestKV(q.request_id, q.num_tokens, old.block_size, held[1], held[2], data)
    return old, new, transfers, reqs, weights, kv


# --- NCCL alone -----------------------------------------------------------------------------------
def replay_rounds(run, me: str, rounds) -> None:
    """The schedule's messages, round by round as batch_isend_irecv groups, between ready buffers."""
    peer = 1 - run.rank
    send_n = max([sum(m.nbytes for m in r.messages if m.src == me) for r in rounds] + [1])
    recv_n = max([sum(m.nbytes for m in r.messages if m.dst == me) for r in rounds] + [1])
    send = torch.ones(send_n, dtype=torch.uint8, device=run.dev)
    recv = torch.empty(recv_n, dtype=torch.uint8, device=run.dev)

    def fn():
        works = []
        for rnd in rounds:
            ops, a, b = [], 0, 0
            for msg in rnd.messages:
                if msg.src == me:
                    ops.append(dist.P2POp(dist.isend, send[a:a + msg.nbytes], peer))
                    a += msg.nbytes
                elif msg.dst == me:
                    ops.append(dist.P2POp(dist.irecv, recv[b:b + msg.nbytes], peer))
                    b += msg.nbytes
            if ops:
                works += dist.batch_isend_irecv(ops)
        for w in works:
            w.wait()
        cuda_sync(run)

    return fn


def p2p_groups(run) -> dict:
    """GB/s worker 0 -> 1 of `total` bytes as n messages in one group, and as n groups of one message."""
    total = (1 << 30) if run.dev == "cuda" else (8 << 20)
    buf = (torch.ones if run.rank == 0 else torch.empty)(total, dtype=torch.uint8, device=run.dev)
    out = {}
    for groups, per in ((1, 1), (1, 4), (1, 16), (1, 64), (1, 256), (4, 1), (16, 1), (64, 1)):
        n = groups * per
        size = total // n

        def fn():
            works = []
            for g in range(groups):
                op = dist.isend if run.rank == 0 else dist.irecv
                works += dist.batch_isend_irecv([dist.P2POp(op, buf[(g * per + i) * size:(g * per + i + 1) * size],
                                                            1 - run.rank) for i in range(per)])
            for w in works:
                w.wait()
            cuda_sync(run)

        s = statistics.median(timed(run, fn, run.cfg["repeat"]))
        key = f"{groups}x{per}x{size >> 20}MiB" if size >= 1 << 20 else f"{groups}x{per}x{size >> 10}KiB"
        out[key] = {"groups": groups, "messages_per_group": per, "message_bytes": size, "seconds": s,
                    "GBps": total / s / 1e9}
    if run.rank == 0:
        print("  p2p groups (groups x messages per group x size): " + ", ".join(
            f"{k} {v['GBps']:.3g}" for k, v in out.items()) + " GB/s", flush=True)
    return out


# --- the phase ------------------------------------------------------------------------------------
def phase_executor(run) -> dict:
    cfg, out = run.cfg, {}
    sweep = parse_sweep(getattr(run.args, "exec_sweep", None) or SWEEP[run.dev])
    out["p2p_groups"] = p2p_groups(run)
    for name, build in (("weights-tp1-to-tp2", lambda: tp1_to_tp2(run.spec)),
                        ("kv-blocks", lambda: kv_scenario(run.spec, cfg["kv_requests"], cfg["kv_tokens"]))):
        out[name] = scenario(run, name, build, sweep)
        if run.dev == "cuda":
            torch.cuda.empty_cache()
    return out


def scenario(run, name: str, build, sweep) -> dict:
    me, cfg = GPUS[run.rank], run.cfg
    setup_error = None
    try:
        old, new, transfers, reqs, weights, kv = executor_inputs(run, me, build)
    except Exception:  # tell the peer, so neither waits in a collective the other never joins
        setup_error = traceback.format_exc()
    if not agree(run, setup_error is None):
        raise RuntimeError(f"executor {name}: setup failed on a worker; here: {setup_error}")
    from spotserve.daemon.resolve import resolve

    elem = torch.empty((), dtype=run.dtype).element_size()
    moves = resolve(run.spec, old, new, transfers, reqs, elem).moves
    per_dir = [sum(m.nbytes for m in moves if m.src == g and m.dst not in (None, g)) for g in GPUS]
    send = torch.ones(max(per_dir[run.rank], 1), dtype=torch.uint8, device=run.dev)
    recv = torch.zeros(max(per_dir[1 - run.rank], 1), dtype=torch.uint8, device=run.dev)

    def raw():
        ops = []
        if per_dir[run.rank]:
            ops.append(dist.P2POp(dist.isend, send, 1 - run.rank))
        if per_dir[1 - run.rank]:
            ops.append(dist.P2POp(dist.irecv, recv, 1 - run.rank))
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        cuda_sync(run)

    t_raw = timed(run, raw, cfg["repeat"])
    del send, recv
    total, tr = sum(per_dir), statistics.median(t_raw)
    res = {"bytes": total, "bytes_per_direction": per_dir, "raw_s": tr, "raw_runs_s": t_raw,
           "raw_GBps": total / tr / 1e9, "sweep": []}
    if run.rank == 0:
        print(f"  executor {name}: {total / 1e6:.1f} MB, {per_dir[0] / 1e6:.1f} MB w0->w1, {per_dir[1] / 1e6:.1f} "
              f"MB w1->w0; raw p2p (one message per direction) {tr * 1e3:.2f} ms = {total / tr / 1e9:.2f} GB/s",
              flush=True)
    for i, (label, kw) in enumerate(sweep):
        row = setting(run, name, label, kw, (old, new, transfers, reqs, weights, kv), tr, with_alloc=i == 0,
                      rows=i == 0)
        res["sweep"].append(row)
        if run.dev == "cuda":
            torch.cuda.empty_cache()
    first = res["sweep"][0]
    res.update(executor_s=first["move_s"], executor_GBps=total / first["move_s"] / 1e9,
               pct_of_raw=first["pct_of_raw"], with_alloc_s=first.get("with_alloc_s"),
               with_alloc_pct_of_raw=first.get("with_alloc_pct_of_raw"), prepare_s=first["prepare_s"],
               wrong_tensors=sorted({n for r in res["sweep"] for n in r["wrong_tensors"]}),
               kv_ok=all(r["kv_ok"] for r in res["sweep"]))
    return res


def setting(run, name, label, kw, inputs, tr, with_alloc: bool, rows: bool) -> dict:
    """One executor setting on one scenario: move, NCCL alone on its rounds, (+alloc), a profiled run."""
    from spotserve.daemon.executor import MigrationExecutor

    old, new, transfers, reqs, weights, kv = inputs
    me, cfg = GPUS[run.rank], run.cfg
    dev = torch.device("cuda", torch.cuda.current_device()) if run.dev == "cuda" else torch.device("cpu")
    ex = MigrationExecutor(run.spec, me, {g: i for i, g in enumerate(GPUS)}, dtype=run.dtype, device=dev, **kw)
    t = time.perf_counter()
    prep = ex.prepare(old, new, transfers, reqs, allocate=True)
    cuda_sync(run)
    prep_total = time.perf_counter() - t
    box = {}

    def zero():
        for x in prep.tensors.values():
            x.zero_()
        cuda_sync(run)

    def migrate(p=prep, profile=False):
        box["o"] = ex.run(old, new, transfers, weights, kv=kv, requests=reqs, prepared=p, profile=profile)
        cuda_sync(run)

    t_move = timed(run, migrate, cfg["repeat"], zero)
    t_rounds = timed(run, replay_rounds(run, me, prep.rounds), cfg["repeat"])
    zero()
    run.sync()
    migrate(profile=True)
    o = box["o"]
    st = o.stats
    full = run.weights()
    wrong = [n for n, r in new.weight_ranges(run.spec, me).items()
             if not torch.equal(o.weights[n], full[n].narrow(r.dim, r.start, r.end - r.start))]
    kv_ok = all(bool(p.data.eq(1).all()) for p in o.kv.values())
    mine = {"host_ms": {k: getattr(st, k) * 1e3 for k in HOST_STEPS}, "timeline": st.timing.get("timeline"),
            "rounds": st.timing.get("rounds") if rows else None, "seconds": st.seconds,
            "messages_sent": st.messages_sent, "messages_received": st.messages_received,
            "direct_messages": st.direct_messages, "rounds_with_work": st.rounds, "staging_bytes": st.staging_bytes,
            "local_bytes": st.local_bytes, "wrong": wrong, "kv_ok": kv_ok, "prepare_s": prep.seconds,
            "prepare_alloc_s": prep.alloc_seconds, "prepare_total_s": prep_total}
    per = both(run, f"{name}-{label}-stats", mine)
    tm, trr = statistics.median(t_move), statistics.median(t_rounds)
    cfg_used = {"solo_bytes": ex.solo_bytes, "round_bytes": ex.round_bytes, "staging_bytes": ex.staging_bytes,
                "depth": ex.depth}
    res = {"label": label, "config": cfg_used, "move_s": tm, "move_runs_s": t_move, "pct_of_raw": 100 * tr / tm,
           "rounds_s": trr, "rounds_pct_of_raw": 100 * tr / trr, "rounds": len(prep.rounds),
           "prepare_s": max(p["prepare_s"] for p in per), "prepare_alloc_s": max(p["prepare_alloc_s"] for p in per),
           "wrong_tensors": per[0]["wrong"] + per[1]["wrong"], "kv_ok": per[0]["kv_ok"] and per[1]["kv_ok"],
           "workers": per}
    del box, prep
    if with_alloc:
        prep_na = ex.prepare(old, new, transfers, reqs)

        def fresh():
            box2.pop("o", None)
            if run.dev == "cuda":
                torch.cuda.empty_cache()

        box2 = {}

        def migrate_na():
            box2["o"] = ex.run(old, new, transfers, weights, kv=kv, requests=reqs, prepared=prep_na)
            cuda_sync(run)

        t_alloc = timed(run, migrate_na, cfg["repeat"], fresh)
        alloc_s = [x / 1e3 for x in both(run, f"{name}-{label}-alloc", box2["o"].stats.alloc_s * 1e3)]
        ta = statistics.median(t_alloc)
        res.update(with_alloc_s=ta, with_alloc_runs_s=t_alloc, with_alloc_pct_of_raw=100 * tr / ta, alloc_s=alloc_s)
        del box2
    if run.rank == 0:
        report(name, res, tr)
    return res


def _mb(n: float) -> str:
    return f"{n / (1 << 20):.0f}MiB" if n >= 1 << 20 else f"{n / 1024:.0f}KiB"


def report(name: str, r: dict, tr: float) -> None:
    c, w = r["config"], r["workers"]
    ok = "ok" if not r["wrong_tensors"] and r["kv_ok"] else f"WRONG {r['wrong_tensors'][:3]} kv_ok={r['kv_ok']}"
    print(f"  executor {name} [{r['label']}: solo {_mb(c['solo_bytes'])} round {_mb(c['round_bytes'])} staging "
          f"{_mb(c['staging_bytes'])} depth {c['depth']}]: move {r['move_s'] * 1e3:.2f} ms = {r['pct_of_raw']:.0f}% "
          f"of raw {tr * 1e3:.2f} ms; NCCL alone on these {r['rounds']} rounds {r['rounds_s'] * 1e3:.2f} ms "
          f"({r['rounds_pct_of_raw']:.0f}% of raw); prepare {r['prepare_s'] * 1e3:.1f} ms + alloc "
          f"{r['prepare_alloc_s'] * 1e3:.1f} ms; {ok}", flush=True)
    if "with_alloc_s" in r:
        print(f"    including allocation (new tensors made inside the move; CUDA cache emptied first): "
              f"{r['with_alloc_s'] * 1e3:.2f} ms = {r['with_alloc_pct_of_raw']:.0f}% of raw; alloc_s "
              f"w0 {r['alloc_s'][0] * 1e3:.2f} ms, w1 {r['alloc_s'][1] * 1e3:.2f} ms", flush=True)
    for k, p in enumerate(w):
        h = " ".join(f"{s[:-2]} {p['host_ms'][s]:.2f}" for s in HOST_STEPS)
        print(f"    w{k}: msgs sent {p['messages_sent']} recv {p['messages_received']} (direct "
              f"{p['direct_messages']}), rounds {p['rounds_with_work']}, staging {_mb(p['staging_bytes'])}, local "
              f"{p['local_bytes'] / 1e6:.1f} MB; profiled run {p['seconds'] * 1e3:.2f} ms; host ms: {h}", flush=True)
        t = p["timeline"]
        if t:
            f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
            clock = "gpu" if t["source"] == "cuda events" else "host"
            print(f"        {clock} ms: first round packed {f(t['first_packed_ms'])}, network done "
                  f"{f(t['last_done_ms'])}, stream end {f(t['end_ms'])}, local end "
                  f"{f(t['local_end_ms'])}; wire {f(t['net_ms'])} (idle {f(t['idle_ms'])}) = {f(t['net_GBps'])} "
                  f"GB/s; pack {f(t['pack_ms'])}, unpack {f(t['unpack_ms'])}, local {f(t['local_ms'])}", flush=True)
    for k, p in enumerate(w):
        rows = p.get("rounds") or []
        if not rows:
            continue
        print(f"    w{k} rounds (ms from start; net = done - max(packed, previous done)):", flush=True)
        print("      round   MB-out    MB-in msgs staged-MB  posted(host)  packed    done     net   GB/s  idle  "
              "pack unpack  local", flush=True)
        for row in rows[:MAX_ROWS]:
            g = lambda key: "-" if row.get(key) is None else f"{row[key]:.2f}"  # noqa: E731
            print(f"      {row['round']:>5} {row.get('send_bytes', 0) / 1e6:8.1f} "
                  f"{row.get('recv_bytes', 0) / 1e6:8.1f} {row.get('messages', 0):>4} "
                  f"{row.get('staged_bytes', 0) / 1e6:9.1f} {g('host_posted_ms'):>13} "
                  f"{g('packed_ms'):>7} {g('done_ms'):>7} {g('net_ms'):>7} {g('net_GBps'):>6} {g('idle_ms'):>5} "
                  f"{g('pack_ms'):>5} {g('unpack_ms'):>6} {g('local_ms'):>6}", flush=True)
        if len(rows) > MAX_ROWS:
            print(f"      ... {len(rows) - MAX_ROWS} more rounds in the JSON", flush=True)
