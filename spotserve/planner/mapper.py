"""DeviceMapper: assign the new config's positions to GPUs so that the most context stays in place.

Weight of (new position p, GPU g) = bytes g already holds that p needs: for every decoder layer both
cover, the layer's tp-split weight bytes times the overlap of their tensor-parallel fractions plus
its replicated tensors (norms, row-parallel biases) whole; the same for the embedding (first stages)
and the LM head (last stages), a tied embedding counted once (planner/exact.py); plus, when p's replica inherits g's old
replica, the KV cache bytes (K and V) of the inherited requests over the same layers and fraction.
The assignment maximising the total is a maximum-weight bipartite matching, solved exactly with
scipy.optimize.linear_sum_assignment on the rows and columns that have any weight. Positions left
with zero reuse are then filled instance by instance so that a tensor-parallel group stays inside
one instance where it can; this cannot lower the total (see ``_fill``).

Switch (the no-mapper ablation): ``by_rank=True`` places positions on GPUs in rank order (the GPUs'
given order: instance acquisition order, then index), ignoring what they hold.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from spotserve.planner.cost import CostModel, stage_layer_ranges
from spotserve.planner.exact import unit_bytes
from spotserve.planner.types import GPU, ParallelConfig, Position, ReconfigurationPlan, RunningRequest


@dataclass(frozen=True)
class Mapping:
    """The mapper's result: placement, replica inheritance and context bytes kept in place."""

    placement: dict[Position, str]
    inherits: dict[int, int]
    reused_bytes: float


def replica_shapes(config: ParallelConfig, extra: ParallelConfig | None) -> list[ParallelConfig]:
    """Shape (as a dp=1 config) of every replica index, extra last."""
    one = ParallelConfig(1, config.pp, config.tp, config.batch, config.micro_batches)
    return [one] * config.dp + ([extra] if extra is not None else [])


class PositionTable:
    """Per-position descriptors as arrays: layer range, tp fraction (units of 1/den), first/last, replica."""

    def __init__(self, shapes: list[ParallelConfig], num_layers: int, den: int):
        lay_lo, lay_hi, f_lo, f_hi, first, last, rep, stage, shard, tps = ([] for _ in range(10))
        for r, sh in enumerate(shapes):
            ranges = stage_layer_ranges(num_layers, sh.pp)
            unit = den // sh.tp
            for s, (lo, hi) in enumerate(ranges):
                for k in range(sh.tp):
                    lay_lo.append(lo), lay_hi.append(hi), f_lo.append(k * unit), f_hi.append((k + 1) * unit)
                    first.append(s == 0), last.append(s == sh.pp - 1), rep.append(r)
                    stage.append(s), shard.append(k), tps.append(sh.tp)
        self.lay_lo, self.lay_hi = np.array(lay_lo, np.int64), np.array(lay_hi, np.int64)
        self.f_lo, self.f_hi = np.array(f_lo, np.int64), np.array(f_hi, np.int64)
        self.first, self.last = np.array(first, bool), np.array(last, bool)
        self.rep, self.stage, self.shard = np.array(rep, np.int64), np.array(stage), np.array(shard)
        self.tp = np.array(tps, np.int64)
        self.positions = [Position(int(r), int(s), int(k)) for r, s, k in zip(rep, stage, shard)]

    def __len__(self) -> int:
        return len(self.positions)


def common_den(*tps: int) -> int:
    return math.lcm(*tps)


def kv_per_layer_by_replica(cost: CostModel, requests: list[RunningRequest], capacity: dict[int, int] | None = None
                            ) -> dict[int, float]:
    """KV bytes per layer of each old replica's requests (largest ``capacity[r]`` requests only)."""
    by_rep: dict[int, list[int]] = defaultdict(list)
    for q in requests:
        by_rep[q.replica].append(q.tokens)
    out = {}
    for r, toks in by_rep.items():
        toks.sort(reverse=True)
        if capacity is not None and r in capacity:
            toks = toks[:capacity[r]]
        out[r] = float(sum(toks) * cost.kv_bytes_per_token_layer)
    return out


class DeviceMapper:
    """Maximum-context-reuse placement of a new config onto GPUs."""

    def __init__(self, cost: CostModel, by_rank: bool = False):
        self.cost, self.by_rank = cost, by_rank

    def choose_inherits(self, config: ParallelConfig, extra: ParallelConfig | None, current: ReconfigurationPlan | None,
                        gpus: list[GPU], requests: list[RunningRequest]) -> dict[int, int]:
        """new replica -> old replica whose requests it continues. New main replicas are identical, so
        only which old replicas are continued matters: those with the most KV on surviving GPUs."""
        if current is None or current.config is None:
            return {}
        alive = {g.id for g in gpus}
        kv = kv_per_layer_by_replica(self.cost, requests)
        held: dict[int, list[str]] = defaultdict(list)
        for p, g in current.placement.items():
            held[p.replica].append(g)
        olds = []
        for r in range(len(replica_shapes(current.config, current.extra))):
            surv = sum(g in alive for g in held[r]) / len(held[r])
            olds.append((-kv.get(r, 0.0) * surv, -surv, r))
        olds.sort()
        n_new = config.dp + (1 if extra is not None else 0)
        return {new: olds[new][2] for new in range(min(n_new, len(olds)))}

    def weight_matrix(self, config: ParallelConfig, extra: ParallelConfig | None, gpus: list[GPU],
                      current: ReconfigurationPlan | None, requests: list[RunningRequest] = (),
                      inherits: dict[int, int] | None = None) -> tuple[np.ndarray, PositionTable]:
        """(positions x GPUs) matrix of context bytes already in place, rows in plan.positions() order."""
        L = self.cost.spec.num_layers
        new_shapes = replica_shapes(config, extra)
        old_shapes = replica_shapes(current.config, current.extra) if current and current.config else []
        den = common_den(*(s.tp for s in new_shapes + old_shapes))
        new = PositionTable(new_shapes, L, den)
        W = np.zeros((len(new), len(gpus)))
        if not old_shapes:
            return W, new
        old = PositionTable(old_shapes, L, den)
        old_index = {p: i for i, p in enumerate(old.positions)}
        col_of = {g.id: j for j, g in enumerate(gpus)}
        cols, rows_old = [], []
        for p, gid in current.placement.items():
            if gid in col_of:
                cols.append(col_of[gid]), rows_old.append(old_index[p])
        if not cols:
            return W, new
        cols, ro = np.array(cols), np.array(rows_old)
        if inherits is None:
            inherits = self.choose_inherits(config, extra, current, gpus, requests)
        capacity = {o: new_shapes[n].batch for n, o in inherits.items()}
        kvl = kv_per_layer_by_replica(self.cost, list(requests), capacity)
        # overlaps (new positions x surviving old positions)
        ov_l = np.clip(np.minimum(new.lay_hi[:, None], old.lay_hi[ro][None, :]) -
                       np.maximum(new.lay_lo[:, None], old.lay_lo[ro][None, :]), 0, None)
        ov_f = np.clip(np.minimum(new.f_hi[:, None], old.f_hi[ro][None, :]) -
                       np.maximum(new.f_lo[:, None], old.f_lo[ro][None, :]), 0, None) / den
        ub = unit_bytes(self.cost.spec, self.cost.dtype_bytes)
        lay, emb, head = ub["layer"], ub["embed"], ub["head"]
        nf, nl, of, ol = new.first[:, None], new.last[:, None], old.first[ro][None, :], old.last[ro][None, :]
        # tp-split bytes (scaled by the shard overlap below) and replicated bytes (whole on every shard)
        base = ov_l * float(lay.even + lay.n * lay.per_elem)
        if self.cost.spec.tie_word_embeddings:  # one vocab tensor on first and last stages, held once
            base += ((nf | nl) & (of | ol)) * float(emb.n * emb.per_elem)
        else:
            base += (nf & of) * float(emb.n * emb.per_elem) + (nl & ol) * float(head.n * head.per_elem)
        whole = ov_l * float(lay.replicated) + (nf & of) * float(emb.replicated) + (nl & ol) * float(head.replicated)
        old_rep = old.rep[ro]
        for n_rep, o_rep in inherits.items():
            if kvl.get(o_rep, 0.0) <= 0:
                continue
            rows = np.nonzero(new.rep == n_rep)[0]
            cs = np.nonzero(old_rep == o_rep)[0]
            base[np.ix_(rows, cs)] += ov_l[np.ix_(rows, cs)] * kvl[o_rep]
        # Replicated tensors stay whole wherever the layer (or stage role) is kept; they are added only
        # where the shards overlap too: they are a tiny share of a layer, and keeping the matrix as
        # sparse as the shard overlaps keeps the matching split into small components (see assign).
        W[:, cols] = base * ov_f + np.where(ov_f > 0, whole, 0.0)
        return W, new

    def assign(self, config: ParallelConfig, extra: ParallelConfig | None, gpus: list[GPU],
               current: ReconfigurationPlan | None = None, requests: list[RunningRequest] = ()) -> Mapping:
        """Place every position of (config, extra) on a distinct GPU of ``gpus``, maximising the
        context kept in place; raises ValueError when there are fewer GPUs than positions."""
        n_pos = config.world_size + (extra.world_size if extra else 0)
        if n_pos > len(gpus):
            raise ValueError(f"assign: {n_pos} positions but only {len(gpus)} GPUs")
        if len({g.id for g in gpus}) != len(gpus):
            raise ValueError("assign: duplicate GPU ids")
        inherits = self.choose_inherits(config, extra, current, gpus, list(requests))
        W, table = self.weight_matrix(config, extra, gpus, current, requests, inherits)
        if self.by_rank:
            reused = float(W[np.arange(len(table)), np.arange(len(table))].sum()) if len(table) else 0.0
            return Mapping({p: gpus[i].id for i, p in enumerate(table.positions)}, inherits, reused)
        assigned = np.full(len(table), -1)
        rows = np.nonzero(W.max(axis=1, initial=0) > 0)[0]
        cols = np.nonzero(W.max(axis=0, initial=0) > 0)[0]
        total = 0.0
        if len(rows) and len(cols):
            sub = W[np.ix_(rows, cols)]
            # Rows and columns of different connected components (positive entries as edges) never
            # share a positive pair, so each component is an independent matching: solving them apart
            # is exact and much faster (dp identical replicas split into tp x pp small blocks).
            nz_r, nz_c = np.nonzero(sub)
            n_r = len(rows)
            graph = coo_matrix((np.ones(len(nz_r)), (nz_r, n_r + nz_c)), shape=(n_r + len(cols),) * 2)
            _, label = connected_components(graph, directed=False)
            for comp in np.unique(label[:n_r]):
                rr = np.nonzero(label[:n_r] == comp)[0]
                cc = np.nonzero(label[n_r:] == comp)[0]
                r, c = linear_sum_assignment(sub[np.ix_(rr, cc)], maximize=True)
                r, c = rr[r], cc[c]
                keep = sub[r, c] > 0
                assigned[rows[r[keep]]] = cols[c[keep]]
                total += float(sub[r[keep], c[keep]].sum())
        self._fill(assigned, table, gpus)
        placement = {table.positions[i]: gpus[j].id for i, j in enumerate(assigned)}
        return Mapping(placement, inherits, total)

    @staticmethod
    def _fill(assigned: np.ndarray, table: PositionTable, gpus: list[GPU]) -> None:
        """Give GPUs to positions without reuse, keeping tp groups inside one instance where possible.

        In an optimal matching every (unfilled position, free GPU) pair has zero weight (else swapping
        would gain), so any fill keeps the optimum; only locality is chosen here."""
        used = set(assigned[assigned >= 0].tolist())
        free: dict[str, list[int]] = defaultdict(list)
        for j, g in enumerate(gpus):
            if j not in used:
                free[g.instance].append(j)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in np.nonzero(assigned < 0)[0]:
            groups[(int(table.rep[i]), int(table.stage[i]))].append(int(i))
        for key in sorted(groups, key=lambda k: (-len(groups[k]), k)):
            todo = groups[key]
            mates = np.nonzero((table.rep == key[0]) & (table.stage == key[1]) & (assigned >= 0))[0]
            prefer = [inst for inst, _ in Counter(gpus[assigned[m]].instance for m in mates).most_common()]
            while todo:
                inst = next((i for i in prefer if free.get(i)), None)
                if inst is None:
                    need = len(todo)
                    fitting = [i for i, fl in free.items() if len(fl) >= need]
                    inst = min(fitting, key=lambda i: (len(free[i]), i)) if fitting else \
                        min(free, key=lambda i: (-len(free[i]), i))
                    prefer = [inst]
                take = free[inst][:len(todo)]
                free[inst] = free[inst][len(take):]
                if not free[inst]:
                    del free[inst]
                for pos, j in zip(todo, take):
                    assigned[pos] = j
                todo = todo[len(take):]
