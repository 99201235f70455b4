"""MigrationPlanner: the ordered transfers that build a new layout from the context GPUs hold now.

A piece of context is (tensor, layer, request) over a tensor-parallel interval [lo, hi) in units of
1/den of the tensor's sharded dimension (den = lcm of every tp involved). Each GPU of the new layout
needs the pieces of its position; what it already holds stays; each missing interval is cut at the
holders' boundaries and every part gets exactly one source: a live holder on the same instance if
any, else the holder with the least send time so far (load balance), else the disk (weights only;
KV with no live holder is lost and its request must re-prefill or be re-queued).

Bytes are exact (planner/pieces.py, planner/exact.py): sources are chosen in tp fractions, which are
exact for head-split tensors; ffn / vocab splits follow sharding.partition element by element (gaps at
uneven boundaries get their own transfer); replicated tensors travel whole, once per destination.

Order: by the destination's stage, then layer (embedding first, LM head last), weights before KV,
so stage 0 can start as soon as its layers land. Memory rule, shared with the backends: a GPU's
old piece is dropped right after the last transfer that reads it, unless its new position keeps
it; old pieces nobody reads and nobody keeps are dropped before the first transfer. Transfers that
would overflow a destination's context budget wait until sources free memory; if nothing can
proceed, the full destination's unneeded pieces are dropped early and their remaining reads
redirected to another holder or the disk. The duration estimate is the busiest link: per-instance
NIC in/out at inter-instance bandwidth, per-GPU intra-instance traffic, per-instance disk reads.

Switch (the no-migration-planner ablation): ``memory_aware=False`` plans without the memory-aware
order. A GPU that cannot hold its old and its new context at once then frees its old context before
anything moves (nobody orders reads around it), so it cannot serve as a source: what only it held
comes from another holder or the disk (KV: lost). Transfers are listed by destination.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from spotserve.planner.cost import CostModel
from spotserve.planner.exact import unit_bytes as unit_bytes_of
from spotserve.planner.mapper import PositionTable, common_den, replica_shapes
from spotserve.planner.pieces import ExactPieces
from spotserve.planner.types import GPU, ParallelConfig, Position, ReconfigurationPlan, RunningRequest, Transfer

KIND_ORDER = {"embed": 0, "layer": 1, "head": 2, "kv": 3}


@dataclass
class MigrationResult:
    """Ordered transfers, their estimated duration and what could not be moved."""

    transfers: list[Transfer]
    est_seconds: float
    disk_bytes: int
    lost_kv: set[str] = field(default_factory=set)  # requests whose KV has no live holder
    continued: dict[str, int] = field(default_factory=dict)  # request id -> new replica (lost KV included)


def continued_requests(inherits: dict[int, int], shapes: list[ParallelConfig],
                       requests: list[RunningRequest]) -> dict[str, int]:
    """request id -> new replica, for the (at most batch) largest requests of each inherited replica."""
    by_rep: dict[int, list[RunningRequest]] = defaultdict(list)
    for q in requests:
        by_rep[q.replica].append(q)
    out = {}
    for new, old in inherits.items():
        for q in sorted(by_rep.get(old, []), key=lambda q: (-q.tokens, q.request_id))[:shapes[new].batch]:
            out[q.request_id] = new
    return out


def estimate_seconds(transfers: list[Transfer], instance_of: dict[str, str], bandwidth: dict[str, float]) -> float:
    """Busiest-link duration of a set of transfers (they overlap perfectly otherwise)."""
    nic_out, nic_in, pcie_out, pcie_in, disk = (defaultdict(float) for _ in range(5))
    for t in transfers:
        dst_inst = instance_of[t.dst]
        if t.src is None:
            disk[dst_inst] += t.nbytes
        elif instance_of[t.src] == dst_inst:
            pcie_out[t.src] += t.nbytes
            pcie_in[t.dst] += t.nbytes
        else:
            nic_out[instance_of[t.src]] += t.nbytes
            nic_in[dst_inst] += t.nbytes
    inter, intra, dsk = bandwidth["inter_bytes_per_s"], bandwidth["intra_bytes_per_s"], bandwidth["disk_bytes_per_s"]
    loads = [max(d.values(), default=0.0) / bw for d, bw in
             ((nic_out, inter), (nic_in, inter), (pcie_out, intra), (pcie_in, intra), (disk, dsk))]
    return max(loads)


def _covers(need: tuple[int, int] | None, lo: int, hi: int) -> bool:
    """Whether a GPU's new position keeps the whole held interval [lo, hi)."""
    return need is not None and need[0] <= lo and hi <= need[1]


def _subtract(a: int, b: int, c: int, d: int) -> list[tuple[int, int]]:
    """[a, b) minus [c, d)."""
    if d <= a or c >= b:
        return [(a, b)]
    return [iv for iv in ((a, c), (d, b)) if iv[0] < iv[1]]


class MigrationPlanner:
    """Builds the migration plan between the current layout and a new placement."""

    def __init__(self, cost: CostModel, memory_aware: bool = True):
        self.cost, self.memory_aware = cost, memory_aware

    def migrate(self, config: ParallelConfig, extra: ParallelConfig | None, placement: dict[Position, str],
                inherits: dict[int, int], gpus: list[GPU], current: ReconfigurationPlan | None = None,
                requests: list[RunningRequest] = (), leaving: dict[str, str] | None = None) -> MigrationResult:
        """Transfers from the current layout to ``placement``.

        ``gpus``: GPUs of the new layout (with memory); ``leaving``: gpu id -> instance id of GPUs
        that still hold context until their deadline (sources only); GPUs of ``current`` in neither
        are gone. Raises ValueError when a placement GPU is unknown.
        """
        c, L = self.cost, self.cost.spec.num_layers
        leaving = dict(leaving or {})
        instance_of = {g.id: g.instance for g in gpus} | leaving
        budget = {g.id: c.context_budget(g.memory_bytes) for g in gpus}
        for gid in placement.values():
            if gid not in budget:
                raise ValueError(f"migrate: placement GPU {gid} is not among the usable GPUs")
        new_shapes = replica_shapes(config, extra)
        old_shapes = replica_shapes(current.config, current.extra) if current and current.config else []
        den = common_den(*(s.tp for s in new_shapes + old_shapes))
        new = PositionTable(new_shapes, L, den)
        req_by_id = {q.request_id: q for q in requests}
        cont = continued_requests(inherits, new_shapes, list(requests))
        ub = unit_bytes_of(c.spec, c.dtype_bytes)
        tied = c.spec.tie_word_embeddings
        unit = {k: (ub[k].even + ub[k].n * ub[k].per_elem) / den for k in ("layer", "embed", "head")}

        def unit_bytes(key):  # tp-split bytes per 1/den (memory accounting; a tied pp=1 head counts its vocab)
            return unit[key[0]] if key[0] != "kv" else req_by_id[key[2]].tokens * c.kv_bytes_per_token_layer / den

        def rep_bytes(key):  # replicated bytes, whole on every shard
            return 0 if key[0] == "kv" else ub[key[0]].replicated

        reqs_of_rep = defaultdict(list)
        for q in requests:
            reqs_of_rep[q.replica].append(q.request_id)
        conts_of_rep = defaultdict(list)
        for rid, rep in cont.items():
            conts_of_rep[rep].append(rid)
        old = PositionTable(old_shapes, L, den) if old_shapes else None
        old_at: dict[str, int] = {}  # live GPU -> its old position index
        if old is not None:
            for i, pos in enumerate(old.positions):
                gid = current.placement[pos]
                if gid in instance_of:  # GPUs lost without notice hold nothing any more
                    old_at[gid] = i
        new_at = {placement[pos]: i for i, pos in enumerate(new.positions)}

        def keys_of(table, i, rids):
            lo, hi = int(table.lay_lo[i]), int(table.lay_hi[i])
            keys = [("layer", layer, None) for layer in range(lo, hi)]
            keys += [("embed", -1, None)] if table.first[i] else []
            keys += [("head", L, None)] if table.last[i] else []
            keys += [("kv", layer, rid) for rid in rids for layer in range(lo, hi)]
            iv = (int(table.f_lo[i]), int(table.f_hi[i]))
            return {k: iv for k in keys}

        held_cache: dict[str, dict] = {}
        needs_cache: dict[str, tuple[dict, int]] = {}

        def held_of(gid):  # pieces a live GPU holds now
            if gid not in held_cache:
                i = old_at.get(gid)
                held_cache[gid] = {} if i is None else keys_of(old, i, reqs_of_rep.get(int(old.rep[i]), []))
            return held_cache[gid]

        def needs_of(gid):  # pieces a GPU's new position needs, and its stage
            if gid not in needs_cache:
                i = new_at.get(gid)
                needs_cache[gid] = ({}, 0) if i is None else \
                    (keys_of(new, i, sorted(conts_of_rep.get(int(new.rep[i]), []))), int(new.stage[i]))
            return needs_cache[gid]

        def complete(gid, i):  # its old position already holds everything the new one needs
            j = old_at.get(gid)
            if j is None:
                return False
            same = (old.lay_lo[j] == new.lay_lo[i] and old.lay_hi[j] == new.lay_hi[i] and old.f_lo[j] == new.f_lo[i]
                    and old.f_hi[j] == new.f_hi[i] and old.first[j] == new.first[i] and old.last[j] == new.last[i])
            rep = int(new.rep[i])
            return bool(same) and (not conts_of_rep.get(rep) or inherits.get(rep) == int(old.rep[j]))

        holder_cache: dict[tuple, list] = {}
        live_idx = np.array(sorted(old_at.values()), dtype=np.int64)
        gid_of_old = {i: g for g, i in old_at.items()}
        rep_of_req = {q.request_id: q.replica for q in requests}

        def holders_of(key):  # live (gid, lo, hi) holding the key's tp-split part (a tied vocab: both roles)
            if key not in holder_cache:
                out = []
                if old is not None and len(live_idx):
                    kind, layer, rid = key
                    if kind in ("embed", "head") and tied:
                        mask = old.first[live_idx] | old.last[live_idx]
                    elif kind == "embed":
                        mask = old.first[live_idx]
                    elif kind == "head":
                        mask = old.last[live_idx]
                    else:
                        mask = (old.lay_lo[live_idx] <= layer) & (layer < old.lay_hi[live_idx])
                        if kind == "kv":
                            mask &= old.rep[live_idx] == rep_of_req[rid]
                    out = [(gid_of_old[int(i)], int(old.f_lo[i]), int(old.f_hi[i])) for i in live_idx[mask]]
                holder_cache[key] = out
            return holder_cache[key]

        drop_first = set() if self.memory_aware else \
            self._drop_first(new_at, complete, held_of, needs_of, unit_bytes, rep_bytes, budget)

        def sources_of(key):
            hs = holders_of(key)
            if not drop_first:
                return hs
            return [h for h in hs if h[0] not in drop_first or _covers(needs_of(h[0])[0].get(key), h[1], h[2])]

        send_time: dict[str, float] = defaultdict(float)
        pending = []  # (order key, src, dst, key, slice, nbytes, elems)
        lost_kv: set[str] = set()
        bw = c.bandwidth

        def charge(src, dst, nbytes):
            if src is not None:
                same = instance_of[src] == instance_of[dst]
                send_time[src] += nbytes / (bw["intra_bytes_per_s"] if same else bw["inter_bytes_per_s"])

        exact = ExactPieces(old, new, old_at, den, tied, instance_of, send_time, self._sources)
        for dst, i in new_at.items():
            if complete(dst, i):
                continue
            keys, stage = needs_of(dst)
            mine = held_of(dst)
            for key, (a, b) in keys.items():
                base = (stage, KIND_ORDER[key[0]] == 3, key[1], KIND_ORDER[key[0]], dst, key[2] or "")
                if key[0] != "kv":
                    for rank, (src, slc, nbytes, elems) in enumerate(exact.weights(dst, i, key, a, b, mine,
                                                                                     sources_of(key), ub)):
                        charge(src, dst, nbytes)
                        pending.append((base + (rank,), src, dst, key, slc, nbytes, elems))
                    continue
                have = mine.get(key)
                missing = [(a, b)] if have is None else _subtract(a, b, *have)
                for lo, hi in missing:
                    for s_lo, s_hi, src in self._sources(key, lo, hi, sources_of(key), dst, instance_of, send_time):
                        if src is None:
                            lost_kv.add(key[2])
                            continue
                        nbytes = int(round((s_hi - s_lo) * unit_bytes(key)))
                        charge(src, dst, nbytes)
                        pending.append((base + (s_lo,), src, dst, key, (s_lo, s_hi, den), nbytes, None))
        if lost_kv:  # a request whose KV is partly lost re-prefills anyway: do not ship the rest
            pending = [p for p in pending if not (p[3][0] == "kv" and p[3][2] in lost_kv)]
        if self.memory_aware:
            pending.sort(key=lambda p: p[0])
            transfers = self._order(pending, held_of, needs_of, budget, unit_bytes, rep_bytes, lost_kv)
        else:  # old context of full GPUs was freed first, so every transfer fits as it comes
            pending.sort(key=lambda p: (p[2], p[0]))
            transfers = [self._transfer(*p[1:]) for p in pending if not (p[3][0] == "kv" and p[3][2] in lost_kv)]
        disk = sum(t.nbytes for t in transfers if t.src is None)
        est = estimate_seconds(transfers, instance_of, bw)
        return MigrationResult(transfers, est, disk, lost_kv, cont)

    @staticmethod
    def _drop_first(new_at, complete, held_of, needs_of, unit_bytes, rep_bytes, budget) -> set[str]:
        """GPUs whose old context plus what they must receive exceeds their budget (naive plan only)."""
        out = set()
        for dst, i in new_at.items():
            if complete(dst, i):
                continue
            held = held_of(dst)
            total = sum((b - a) * unit_bytes(k) + rep_bytes(k) for k, (a, b) in held.items())
            for key, (a, b) in needs_of(dst)[0].items():
                have = held.get(key)
                kept = 0 if have is None else max(0, min(b, have[1]) - max(a, have[0]))
                total += (b - a - kept) * unit_bytes(key) + (rep_bytes(key) if have is None else 0)
            if total > budget[dst] + 1e-6:
                out.add(dst)
        return out

    @staticmethod
    def _sources(key, lo, hi, holders, dst, instance_of, send_time):
        """Split [lo, hi) at holder boundaries; one source per part (None = disk / lost)."""
        hs = [h for h in holders if h[1] < hi and h[2] > lo and h[0] != dst]
        cuts = sorted({lo, hi} | {x for _, a, b in hs for x in (a, b) if lo < x < hi})
        out = []
        for a, b in zip(cuts, cuts[1:]):
            cand = [g for g, ha, hb in hs if ha <= a and hb >= b]
            if not cand:
                out.append((a, b, None))
                continue
            local = [g for g in cand if instance_of[g] == instance_of[dst]]
            pool = local or cand
            out.append((a, b, min(pool, key=lambda g: (send_time[g], g))))
        return out

    def _order(self, pending, held_of, needs_of, budget, unit_bytes, rep_bytes, lost_kv: set[str]) -> list[Transfer]:
        """Emit transfers in priority order without exceeding any destination's budget; requests whose
        KV had to be abandoned are added to ``lost_kv`` and their KV transfers removed."""
        incoming: dict[str, float] = defaultdict(float)
        for p in pending:
            incoming[p[2]] += p[5]
        # Fast path: a destination that fits its old context and everything it receives at once can
        # never wait, so when all do the priority order is the answer.
        if all(sum((b - a) * unit_bytes(k) + rep_bytes(k) for k, (a, b) in held_of(d).items()) + inc
               <= budget[d] + 1e-6 for d, inc in incoming.items()):
            return [self._transfer(*p[1:]) for p in pending]
        reads: dict[tuple[str, tuple], int] = defaultdict(int)
        for _, src, _, key, *_ in pending:
            if src is not None:
                reads[(src, key)] += 1
        usage: dict[str, float] = defaultdict(float)
        droppable: dict[tuple[str, tuple], float] = {}  # old bytes a GPU frees after its last read
        # only GPUs that send or receive change their memory; the rest keep what they hold
        touched = {p[1] for p in pending if p[1] is not None} | {p[2] for p in pending}
        for gid in touched:
            kept_keys = needs_of(gid)[0]
            for key, (a, b) in held_of(gid).items():
                ub, rep = unit_bytes(key), rep_bytes(key)
                usage[gid] += (b - a) * ub + rep
                need = kept_keys.get(key)
                kept = 0 if need is None else max(0, min(b, need[1]) - max(a, need[0]))
                extra = (b - a - kept) * ub + (rep if need is None else 0)
                if extra > 0:
                    if reads[(gid, key)] == 0:
                        usage[gid] -= extra
                    else:
                        droppable[(gid, key)] = extra
        out: list[Transfer] = []
        queue = list(pending)
        while queue:
            progressed, rest = False, []
            for item in queue:
                _, src, dst, key, slc, nbytes, elems = item
                if usage[dst] + nbytes > budget[dst] + 1e-6:
                    rest.append(item)
                    continue
                usage[dst] += nbytes
                out.append(self._transfer(src, dst, key, slc, nbytes, elems))
                progressed = True
                if src is not None:
                    reads[(src, key)] -= 1
                    if reads[(src, key)] == 0 and (src, key) in droppable:
                        usage[src] -= droppable.pop((src, key))
            queue = rest
            if queue and not progressed:
                queue = self._unblock(queue, usage, reads, droppable, lost_kv)
        if lost_kv:  # dropping transfers only lowers memory use, so the bound still holds
            out = [t for t in out if not (t.tensor == "kv" and t.request in lost_kv)]
        return out

    @staticmethod
    def _unblock(queue, usage, reads, droppable, lost_kv):
        """Deadlock: the first waiting transfer's destination drops its unneeded pieces now; their
        remaining reads go to the disk (weights) or are abandoned (KV of that request)."""
        dst = queue[0][2]
        drop = [k for k in list(droppable) if k[0] == dst]
        if not drop:
            raise ValueError(f"migrate: GPU {dst} cannot fit its new context within its memory budget")
        dropped_keys = set()
        for k in drop:
            usage[dst] -= droppable.pop(k)
            dropped_keys.add(k[1])
        new_queue = []
        for order, src, d, key, slc, nbytes, elems in queue:
            if src == dst and key in dropped_keys:
                reads[(src, key)] -= 1
                if key[0] == "kv":
                    lost_kv.add(key[2])
                    continue
                src = None
            new_queue.append((order, src, d, key, slc, nbytes, elems))
        return new_queue

    @staticmethod
    def _transfer(src, dst, key, slc, nbytes, elems=None) -> Transfer:
        """A Transfer built without re-validation: every field here is valid by construction (the
        plan's invariants are checked by tests/planner/test_migration.py), and validating thousands
        of them was a third of a 48-GPU plan's time."""
        kind, layer, rid = key
        t = object.__new__(Transfer)
        t.__dict__.update(src=src, dst=dst, tensor=kind, layer=None if kind in ("embed", "head") else int(layer),
                          slice=None if slc is None or slc[0] == 0 and slc[1] == slc[2] else slc, nbytes=int(nbytes),
                          request=rid, elems=elems)
        return t
