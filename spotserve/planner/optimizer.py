"""ConfigOptimizer: choose (dp, pp, tp, batch, micro-batches) and an optional extra replica for the GPUs now.

Search space: every profiled shape S = (pp, tp, batch, micro_batches) that fits GPU memory, run as
dp = floor(N / (pp * tp)) replicas (for a fixed shape more replicas never raise the expected latency,
so smaller dp is dominated), plus optionally one extra replica of any feasible shape E built from
the N - dp * pp * tp leftover GPUs. Requests spread over replicas in proportion to throughput, so

    latency(S, E) = mean batch time weighted by throughput * queue_factor(rate / throughput)

Rule: among candidates whose throughput >= headroom * rate, minimise latency + migration penalty;
if none, maximise throughput (then minimise latency). The migration penalty amortises the stall of
moving from the current config: requests arriving during a stall of M seconds wait M/2 on average,
so over a horizon H the per-request cost is M^2 / (2 H). Hysteresis: the current config is kept
while it still fits and meets the rate within the SLO, or when the best candidate gains less than
``min_gain`` (relative). With no feasible shape the result is an explicit cannot-serve choice.
Everything is vectorised with numpy over the whole space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from spotserve.planner.cost import CostModel, queue_factor
from spotserve.planner.types import ParallelConfig


@dataclass(frozen=True)
class Choice:
    """The optimizer's answer; ``config`` None with ``cannot_serve`` set when nothing fits."""

    config: ParallelConfig | None
    extra: ParallelConfig | None
    latency: float  # expected request latency (s), inf when the rate is not met
    exec_latency: float  # throughput-weighted batch execution time (s)
    throughput: float  # requests/s
    meets_rate: bool
    migration_seconds: float = 0.0  # the optimizer's quick estimate, not the migration plan's
    kept_current: bool = False
    cannot_serve: str | None = None


@dataclass
class Shapes:
    """Feasible replica shapes as parallel arrays."""

    pp: np.ndarray
    tp: np.ndarray
    batch: np.ndarray
    micro: np.ndarray
    seconds: np.ndarray  # batch execution time
    phi: np.ndarray  # requests/s of one replica

    @property
    def size(self) -> np.ndarray:
        return self.pp * self.tp

    def __len__(self) -> int:
        return len(self.pp)


class ConfigOptimizer:
    """Chooses the config for the GPUs available now, the arrival rate and the current config."""

    def __init__(self, cost: CostModel, headroom: float = 1.0, min_gain: float = 0.05,
                 horizon_s: float = 300.0, allow_extra: bool = True):
        if headroom < 1 or not 0 <= min_gain < 1 or horizon_s <= 0:
            raise ValueError("ConfigOptimizer: need headroom >= 1, 0 <= min_gain < 1, horizon_s > 0")
        self.cost, self.headroom, self.min_gain = cost, headroom, min_gain
        self.horizon_s, self.allow_extra = horizon_s, allow_extra
        self._shape_cache: dict[tuple[int, int], Shapes] = {}

    def shapes(self, n_gpus: int, gpu_memory_bytes: int) -> Shapes:
        """All memory-feasible profiled shapes of at most n_gpus GPUs."""
        key = (min(n_gpus, self.cost.spec.num_layers * max(self.cost.tps)), gpu_memory_bytes)
        if key in self._shape_cache:
            return self._shape_cache[key]
        rows = [(pp, tp, b, m) for tp in self.cost.tps for pp in range(1, self.cost.spec.num_layers + 1)
                if pp * tp <= n_gpus for b in self.cost.batches for m in range(1, b + 1) if b % m == 0]
        a = np.array(rows, dtype=np.int64).reshape(-1, 4)
        pp, tp, b, m = a.T
        ok = self.cost.feasible(pp, tp, b, m, gpu_memory_bytes) if len(a) else np.zeros(0, bool)
        pp, tp, b, m = pp[ok], tp[ok], b[ok], m[ok]
        secs = np.asarray(self.cost.batch_seconds(pp, tp, b, m) if len(pp) else np.zeros(0), float)
        # For a fixed (pp, tp, batch) the micro-batch count changes only the batch time, and a shorter
        # batch time is better for every objective here (latency and throughput; the migration cost
        # does not depend on it), so keep the fastest micro-batching per (pp, tp, batch).
        order = np.lexsort((secs, b, tp, pp))
        pp, tp, b, m, secs = pp[order], tp[order], b[order], m[order], secs[order]
        first = np.ones(len(pp), bool)
        first[1:] = (pp[1:] != pp[:-1]) | (tp[1:] != tp[:-1]) | (b[1:] != b[:-1])
        pp, tp, b, m, secs = pp[first], tp[first], b[first], m[first], secs[first]
        shapes = Shapes(pp, tp, b, m, secs, b / secs)
        self._shape_cache[key] = shapes
        return shapes

    def _weight_bytes(self, pp, tp):
        L = self.cost.spec.num_layers
        return (-(-L // pp) * self.cost.layer_bytes + self.cost.embed_bytes) / tp

    def _migration_seconds(self, pp, tp, world, current: ParallelConfig | None, kept: int):
        """Quick per-candidate migration estimate (vectorised): the bytes a GPU must receive over the
        inter-instance link, assuming the best overlap with the old layout a GPU can have."""
        need = self._weight_bytes(pp, tp)
        if current is None:
            return need / self.cost.bandwidth["disk_bytes_per_s"]
        same = (pp == current.pp) & (tp == current.tp) & (world <= kept)
        reuse = np.minimum(1.0, pp / current.pp) * np.minimum(1.0, tp / current.tp)
        reuse = np.where(world <= kept, reuse, 0.0)  # fresh GPUs get everything over the network
        return np.where(same, 0.0, need * (1 - reuse) / self.cost.bandwidth["inter_bytes_per_s"])

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
            need = self.cost.min_gpus()
            return Choice(None, None, math.inf, math.inf, 0.0, False, cannot_serve=(
                f"{self.cost.spec.name} needs at least {need} GPUs of {mem / 2**30:.1f} GiB; have {n_gpus}"))
        cur_main = None
        if current is not None:
            cur_main = current[0]
            if kept_gpus is None:
                kept_gpus = min(n_gpus, cur_main.world_size + (current[1].world_size if current[1] else 0))
        kept = kept_gpus or 0
        size = sh.size
        dp = n_gpus // size
        left = n_gpus - dp * size
        phi_m = dp * sh.phi
        a_m = phi_m * sh.seconds
        mig_m = self._migration_seconds(sh.pp, sh.tp, dp * size, cur_main, kept)
        # column 0: no extra replica; columns 1..: extra shape j where it fits the leftover
        phi = phi_m[:, None]
        a = a_m[:, None]
        mig = mig_m[:, None]
        if self.allow_extra and len(sh) > 0:
            fits = size[None, :] <= left[:, None]
            phi = np.concatenate([phi, phi_m[:, None] + np.where(fits, sh.phi[None, :], 0.0)], axis=1)
            a = np.concatenate([a, a_m[:, None] + np.where(fits, (sh.phi * sh.seconds)[None, :], 0.0)], axis=1)
            mig_e = self._migration_seconds(sh.pp, sh.tp, dp[:, None] * size[:, None] + size[None, :],
                                            cur_main, kept)
            mig = np.concatenate([mig, np.maximum(mig_m[:, None], mig_e)], axis=1)
            valid = np.concatenate([np.ones((len(sh), 1), bool), fits], axis=1)
        else:
            valid = np.ones_like(phi, bool)
        mean_t = a / phi
        lat = mean_t * queue_factor(arrival_rate / phi)
        meets = valid & (phi >= self.headroom * arrival_rate) & np.isfinite(lat)
        penalty = mig ** 2 / (2 * self.horizon_s)
        if meets.any():
            score = np.where(meets, lat + penalty, np.inf)
            i, j = np.unravel_index(np.argmin(score), score.shape)
        else:
            # max throughput first, then the shorter batch time
            key = np.where(valid, phi, -np.inf)
            best = key.max()
            score = np.where(valid & (key >= best * (1 - 1e-12)), mean_t + penalty, np.inf)
            i, j = np.unravel_index(np.argmin(score), score.shape)
        config = ParallelConfig(int(dp[i]), int(sh.pp[i]), int(sh.tp[i]), int(sh.batch[i]), int(sh.micro[i]))
        extra = None
        if j > 0:
            e = j - 1
            extra = ParallelConfig(1, int(sh.pp[e]), int(sh.tp[e]), int(sh.batch[e]), int(sh.micro[e]))
        best = Choice(config, extra, float(lat[i, j]), float(mean_t[i, j]), float(phi[i, j]),
                      bool(meets[i, j]), float(mig[i, j]))
        if current is not None:
            kept_choice = self._keep_current(current, n_gpus, mem, arrival_rate, best, slo)
            if kept_choice is not None:
                return kept_choice
        return best

    def evaluate(self, config: ParallelConfig, extra: ParallelConfig | None, arrival_rate: float) -> Choice:
        """Latency and throughput of a given (config, extra) at ``arrival_rate``."""
        reps = [config] + ([extra] if extra else [])
        secs = [float(self.cost.batch_seconds(c.pp, c.tp, c.batch, c.micro_batches)) for c in reps]
        phis = [c.dp * c.batch / s for c, s in zip(reps, secs)]
        phi = sum(phis)
        mean_t = sum(p * s for p, s in zip(phis, secs)) / phi
        lat = float(mean_t * queue_factor(arrival_rate / phi))
        return Choice(config, extra, lat, mean_t, phi, phi >= self.headroom * arrival_rate and math.isfinite(lat))

    def _keep_current(self, current, n_gpus, mem, rate, best: Choice, slo) -> Choice | None:
        config, extra = current
        world = config.world_size + (extra.world_size if extra else 0)
        fits = world <= n_gpus and all(bool(self.cost.feasible(c.pp, c.tp, c.batch, c.micro_batches, mem))
                                       for c in ([config] + ([extra] if extra else [])))
        if not fits:
            return None
        cur = self.evaluate(config, extra, rate)
        kept = Choice(cur.config, cur.extra, cur.latency, cur.exec_latency, cur.throughput, cur.meets_rate,
                      0.0, kept_current=True)
        if cur.meets_rate and slo is not None and cur.latency <= slo:
            return kept
        if best.meets_rate and not cur.meets_rate:
            return None
        if best.meets_rate:
            gain = best.latency + best.migration_seconds ** 2 / (2 * self.horizon_s)
            return kept if gain >= (1 - self.min_gain) * cur.latency else None
        return kept if best.throughput <= (1 + self.min_gain) * cur.throughput else None
