"""ConfigOptimizer: choose (dp, pp, tp, batch, micro-batches) and an optional extra replica for the GPUs now.

Search space: every profiled shape S = (pp, tp, batch, micro_batches; micro-batches only with pp > 1,
where they fill the pipeline) that fits GPU memory, run as
dp = floor(N / (pp * tp)) replicas (for a fixed shape more replicas never raise the expected latency,
so smaller dp is dominated), plus optionally one extra replica of any feasible shape E built from
the N - dp * pp * tp leftover GPUs. ``latency(S, E)`` is the expected request latency under dynamic
batching (planner/queueing.py: batch time at the batch size the load forces, the wait for a busy
replica, and the overflow wait near capacity), requests spread over the groups by capacity.

Rule: among candidates whose full-batch throughput >= headroom * rate, minimise latency + migration
penalty; if none, maximise throughput (then minimise the batch time). The migration penalty amortises
the stall of moving from the current config: requests arriving during a stall of M seconds wait M/2
on average, so over a horizon H the per-request cost is M^2 / (2 H). Hysteresis: the current config
is kept while it still fits and meets the rate within the SLO, or when the best candidate gains less
than ``min_gain`` (relative), unless the candidate only adds replicas to the current ones (same
shape, more of them): that disrupts no running replica, so any gain is taken. With no feasible shape the result is an explicit cannot-serve choice.

Switch (the no-optimizer ablation and the rerouting baseline): ``fixed_shape`` restricts the space to
that one replica shape (dp still follows the GPUs; no extra replica). Vectorised with numpy throughout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spotserve.planner.cost import CostModel
from spotserve.planner.queueing import batch_table, group_capacity, group_latency, mixed_latency
from spotserve.planner.types import ParallelConfig


@dataclass(frozen=True)
class Choice:
    """The optimizer's answer; ``config`` None with ``cannot_serve`` set when nothing fits."""

    config: ParallelConfig | None
    extra: ParallelConfig | None
    latency: float  # expected request latency (s), inf when the rate is not met
    exec_latency: float  # capacity-weighted full-batch execution time (s)
    throughput: float  # requests/s at full batches
    meets_rate: bool
    migration_seconds: float = 0.0  # the optimizer's quick estimate, not the migration plan's
    kept_current: bool = False
    cannot_serve: str | None = None


@dataclass
class Shapes:
    """Feasible replica shapes as parallel arrays, with their batch-time table T(b) (queueing.batch_table)."""

    pp: np.ndarray
    tp: np.ndarray
    batch: np.ndarray
    micro: np.ndarray
    seconds: np.ndarray  # full-batch execution time
    phi: np.ndarray  # requests/s of one replica at full batches
    table: np.ndarray  # (shapes, max batch) batch seconds at b = 1..

    @property
    def size(self) -> np.ndarray:
        return self.pp * self.tp

    def __len__(self) -> int:
        return len(self.pp)


class ConfigOptimizer:
    """Chooses the config for the GPUs available now, the arrival rate and the current config."""

    def __init__(self, cost: CostModel, headroom: float = 1.0, min_gain: float = 0.05,
                 horizon_s: float = 300.0, allow_extra: bool = True, fixed_shape: ParallelConfig | None = None):
        if headroom < 1 or not 0 <= min_gain < 1 or horizon_s <= 0:
            raise ValueError("ConfigOptimizer: need headroom >= 1, 0 <= min_gain < 1, horizon_s > 0")
        self.cost, self.headroom, self.min_gain = cost, headroom, min_gain
        self.horizon_s = horizon_s
        self.fixed_shape = None if fixed_shape is None else \
            ParallelConfig(1, fixed_shape.pp, fixed_shape.tp, fixed_shape.batch, fixed_shape.micro_batches)
        self.allow_extra = allow_extra and fixed_shape is None
        self._shape_cache: dict[tuple[int, int], Shapes] = {}

    def shapes(self, n_gpus: int, gpu_memory_bytes: int) -> Shapes:
        """All memory-feasible profiled shapes of at most n_gpus GPUs (only the fixed shape if set)."""
        key = (min(n_gpus, self.cost.spec.num_layers * max(self.cost.tps)), gpu_memory_bytes)
        if key in self._shape_cache:
            return self._shape_cache[key]
        if self.fixed_shape is not None:
            f = self.fixed_shape
            rows = [(f.pp, f.tp, f.batch, f.micro_batches)] if f.pp * f.tp <= n_gpus else []
        else:
            # micro-batches fill a pipeline: with one stage they only run a batch in sequential parts,
            # never faster in fact, so a profile's noise must not pick them (and flip shapes between plans)
            rows = [(pp, tp, b, m) for tp in self.cost.tps for pp in range(1, self.cost.spec.num_layers + 1)
                    if pp * tp <= n_gpus for b in self.cost.batches for m in range(1, b + 1)
                    if b % m == 0 and (m == 1 or pp > 1)]
        a = np.array(rows, dtype=np.int64).reshape(-1, 4)
        pp, tp, b, m = a.T
        ok = self.cost.feasible(pp, tp, b, m, gpu_memory_bytes) if len(a) else np.zeros(0, bool)
        pp, tp, b, m = pp[ok], tp[ok], b[ok], m[ok]
        secs = np.asarray(self.cost.batch_seconds(pp, tp, b, m) if len(pp) else np.zeros(0), float)
        table = batch_table(self.cost, pp, tp, b, m) if len(pp) else np.zeros((0, 1))
        # Every micro-batching stays a separate shape: it changes T(b) differently at each batch size
        # (and so the load share of an extra replica), so none dominates another in general.
        shapes = Shapes(pp, tp, b, m, secs, b / secs, table)
        self._shape_cache[key] = shapes
        return shapes

    def _weight_bytes(self, pp, tp):
        L = self.cost.spec.num_layers
        return (-(-L // pp) * self.cost.layer_bytes + self.cost.embed_bytes) / tp

    def _migration_seconds(self, pp, tp, world, current: ParallelConfig | None, kept: int, cur_world: int = 0):
        """Quick per-candidate migration estimate (vectorised): the bytes a GPU must receive over the
        inter-instance link, assuming the best overlap with the old layout a GPU can have. The same
        shape on all the current GPUs plus new ones costs nothing: the existing replicas keep serving
        unchanged while the added ones load (no stall)."""
        need = self._weight_bytes(pp, tp)
        if current is None:
            return need / self.cost.bandwidth["disk_bytes_per_s"]
        same = (pp == current.pp) & (tp == current.tp) & ((world <= kept) | (kept >= max(cur_world, current.world_size)))
        reuse = np.minimum(1.0, pp / current.pp) * np.minimum(1.0, tp / current.tp)
        reuse = np.where(world <= kept, reuse, 0.0)  # fresh GPUs get everything over the network
        return np.where(same, 0.0, need * (1 - reuse) / self.cost.bandwidth["inter_bytes_per_s"])

    def _cannot_serve(self, n_gpus: int, mem: int) -> Choice:
        if self.fixed_shape is not None:
            f = self.fixed_shape
            why = f"fixed shape {f.short()} needs {f.pp * f.tp} GPUs of {mem / 2**30:.1f} GiB; have {n_gpus}"
        else:
            why = f"{self.cost.spec.name} needs at least {self.cost.min_gpus()} GPUs of {mem / 2**30:.1f} GiB; " \
                  f"have {n_gpus}"
        return Choice(None, None, math.inf, math.inf, 0.0, False, cannot_serve=why)

    def choose(self, n_gpus: int, arrival_rate: float, gpu_memory_bytes: int | None = None,
               current: tuple[ParallelConfig, ParallelConfig | None] | None = None,
               kept_gpus: int | None = None, slo: float | None = None) -> Choice:
        """Pick a config for ``n_gpus`` GPUs at ``arrival_rate`` req/s.

        ``current`` is the (config, extra) now served, ``kept_gpus`` how many of the n_gpus GPUs hold
        its context (default all of its GPUs that fit), ``slo`` a latency bound (s) under which the
        current config is kept. Returns a Choice (``cannot_serve`` set when no shape fits).
        """
        if n_gpus < 0 or arrival_rate < 0:
            raise ValueError(f"choose: n_gpus and arrival_rate must be >= 0, got {n_gpus}, {arrival_rate}")
        mem = self.cost.gpu_memory_bytes if gpu_memory_bytes is None else gpu_memory_bytes
        sh = self.shapes(n_gpus, mem) if n_gpus > 0 else None
        if sh is None or len(sh) == 0:
            return self._cannot_serve(n_gpus, mem)
        cur_main = None
        if current is not None:
            cur_main = current[0]
            if kept_gpus is None:
                kept_gpus = min(n_gpus, cur_main.world_size + (current[1].world_size if current[1] else 0))
        kept = kept_gpus or 0
        cur_world = 0 if current is None else current[0].world_size + (current[1].world_size if current[1] else 0)
        size, rows = sh.size, np.arange(len(sh))
        dp = n_gpus // size
        left = n_gpus - dp * size
        cap_m = dp * sh.phi  # requests/s of the dp main replicas at full batches
        mig_m = self._migration_seconds(sh.pp, sh.tp, dp * size, cur_main, kept, cur_world)
        pen_m = mig_m ** 2 / (2 * self.horizon_s)
        t1 = sh.table[:, 0]  # one-request batch time: no request of a group is faster
        ok_m = cap_m >= self.headroom * arrival_rate

        def latency(i, j):
            """Expected latency of candidates (main shape i, extra shape j or -1), arrays."""
            has = j >= 0
            je = np.where(has, j, 0)
            cap_e = np.where(has, sh.phi[je], 0.0)
            share = arrival_rate * cap_m[i] / (cap_m[i] + cap_e)
            return mixed_latency(group_latency(sh.table, i, sh.batch[i], dp[i], share), cap_m[i],
                                 group_latency(sh.table, je, sh.batch[je], 1, arrival_rate - share), cap_e)

        # candidates: shape i alone, and shape i plus an extra replica of a shape j that fits its leftover
        lat_m = np.full(len(sh), np.inf)
        lat_m[ok_m] = latency(rows[ok_m], np.full(int(ok_m.sum()), -1))
        ii, jj = np.zeros(0, np.int64), np.zeros(0, np.int64)
        if self.allow_extra:
            by_size = np.argsort(size, kind="stable")
            counts = np.searchsorted(size[by_size], left, side="right")
            ii = np.repeat(rows, counts)
            starts = np.repeat(np.cumsum(counts) - counts, counts)
            jj = by_size[np.arange(len(ii)) - starts]
        phi_p = cap_m[ii] + sh.phi[jj]
        ok_p = phi_p >= self.headroom * arrival_rate
        meets_m = ok_m & np.isfinite(lat_m)
        if meets_m.any() or ok_p.any():
            # Exact pruning: a group's latency is at least its one-request batch time T(1), so a pair's is
            # at least the capacity-weighted T(1) of its groups (and its penalty at least the main one's):
            # pairs are evaluated only where that bound beats the best single-shape candidate.
            bound = np.min(np.where(meets_m, lat_m + pen_m, np.inf), initial=np.inf)
            lower = (cap_m[ii] * t1[ii] + sh.phi[jj] * t1[jj]) / phi_p + pen_m[ii]
            sel = np.nonzero(ok_p & (lower < bound))[0]
        else:  # nothing meets the rate: maximise throughput, then minimise the batch time
            top = max(cap_m.max(), phi_p.max(initial=0.0)) * (1 - 1e-12)
            sel = np.nonzero(phi_p >= top)[0]
        ci = np.concatenate([rows, ii[sel]])
        cj = np.concatenate([np.full(len(sh), -1), jj[sel]])
        phi = np.concatenate([cap_m, phi_p[sel]])
        has_e = cj >= 0
        je = np.where(has_e, cj, 0)
        mig = mig_m[ci]
        if has_e.any():
            mig_e = self._migration_seconds(sh.pp[je], sh.tp[je], dp[ci] * size[ci] + size[je], cur_main, kept,
                                            cur_world)
            mig = np.where(has_e, np.maximum(mig, mig_e), mig)
        penalty = mig ** 2 / (2 * self.horizon_s)
        mean_t = (dp[ci] * sh.batch[ci] + np.where(has_e, sh.batch[je], 0)) / phi
        lat = np.concatenate([lat_m, latency(ii[sel], jj[sel]) if len(sel) else np.zeros(0)])
        meets = (phi >= self.headroom * arrival_rate) & np.isfinite(lat)
        if meets.any():
            k = int(np.argmin(np.where(meets, lat + penalty, np.inf)))
        else:
            top = phi.max() * (1 - 1e-12)
            k = int(np.argmin(np.where(phi >= top, mean_t + penalty, np.inf)))
            if not np.isfinite(lat[k]):
                lat[k] = latency(ci[k:k + 1], cj[k:k + 1])[0]
        ii, jj = ci, cj
        i, j = int(ii[k]), int(jj[k])
        config = ParallelConfig(int(dp[i]), int(sh.pp[i]), int(sh.tp[i]), int(sh.batch[i]), int(sh.micro[i]))
        extra = None if j < 0 else ParallelConfig(1, int(sh.pp[j]), int(sh.tp[j]), int(sh.batch[j]), int(sh.micro[j]))
        best = Choice(config, extra, float(lat[k]), float(mean_t[k]), float(phi[k]), bool(meets[k]), float(mig[k]))
        if current is not None:
            kept_choice = self._keep_current(current, n_gpus, mem, arrival_rate, best, slo)
            if kept_choice is not None:
                return kept_choice
        return best

    def evaluate(self, config: ParallelConfig, extra: ParallelConfig | None, arrival_rate: float) -> Choice:
        """Latency and throughput of a given (config, extra) at ``arrival_rate`` (same model as choose)."""
        reps = [config] + ([extra] if extra else [])
        table = batch_table(self.cost, [c.pp for c in reps], [c.tp for c in reps], [c.batch for c in reps],
                            [c.micro_batches for c in reps])
        caps = [float(group_capacity(table, r, c.batch, c.dp)) for r, c in enumerate(reps)]
        phi = sum(caps)
        share = arrival_rate * caps[0] / phi
        lat_e, cap_e = (group_latency(table, 1, extra.batch, 1, arrival_rate - share), caps[1]) if extra else (0.0, 0.0)
        lat = float(mixed_latency(group_latency(table, 0, config.batch, config.dp, share), caps[0], lat_e, cap_e))
        mean_t = sum(c.dp * c.batch for c in reps) / phi
        return Choice(config, extra, lat, mean_t, phi, phi >= self.headroom * arrival_rate and math.isfinite(lat))

    @staticmethod
    def adds_only(current: tuple[ParallelConfig, ParallelConfig | None], best: Choice) -> bool:
        """Whether ``best`` keeps every current replica as it is and only adds replicas: the same main
        shape with more dp, and the current extra replica unchanged (or a new one). Replicas that lost
        GPUs are rebuilt whether or not replicas are added, so the surviving ones are untouched either way."""
        config, extra = current
        if best.config is None:
            return False
        b = best.config
        if (b.pp, b.tp, b.batch, b.micro_batches) != (config.pp, config.tp, config.batch, config.micro_batches) \
                or b.dp < config.dp:
            return False
        if extra is not None:
            return best.extra == extra and b.dp > config.dp
        return b.dp > config.dp or best.extra is not None

    def _keep_current(self, current, n_gpus, mem, rate, best: Choice, slo) -> Choice | None:
        config, extra = current
        world = config.world_size + (extra.world_size if extra else 0)
        fits = world <= n_gpus and all(bool(self.cost.feasible(c.pp, c.tp, c.batch, c.micro_batches, mem))
                                       for c in ([config] + ([extra] if extra else [])))
        if self.fixed_shape is not None:
            f = self.fixed_shape
            fits = fits and extra is None and (config.pp, config.tp, config.batch, config.micro_batches) == \
                (f.pp, f.tp, f.batch, f.micro_batches)
        if not fits:
            return None
        cur = self.evaluate(config, extra, rate)
        keep = Choice(cur.config, cur.extra, cur.latency, cur.exec_latency, cur.throughput, cur.meets_rate,
                      0.0, kept_current=True)
        if cur.meets_rate and slo is not None and cur.latency <= slo:
            return keep
        if best.meets_rate and not cur.meets_rate:
            return None
        # Hysteresis guards running replicas against a disruptive move for a small gain; a plan that
        # only adds replicas disrupts none of them, so any gain is taken.
        threshold = 0.0 if self.adds_only(current, best) else self.min_gain
        if best.meets_rate:
            gain = best.latency + best.migration_seconds ** 2 / (2 * self.horizon_s)
            return keep if gain >= (1 - threshold) * cur.latency else None
        return keep if best.throughput <= (1 + threshold) * cur.throughput else None
