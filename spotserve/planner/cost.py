"""CostModel: latency, throughput and per-GPU memory of a parallel config, from a measured profile.

Pipeline formulas (derived here, checked against a brute-force schedule in tests/planner)
---------------------------------------------------------------------------------------
A replica is a pipeline of ``pp`` stages; stage j holds n_j decoder layers (the first L mod pp
stages hold one more, so max n_j = ceil(L/pp)); stage 0 also runs the embedding. A batch of B
requests is cut into m equal micro-batches of b = B/m. With x(tp, b) the per-layer time of one
micro-batch, stage j needs t_j = n_j * x (+ embed on stage 0) per micro-batch, and a hop between
stages takes c (a latency on its own link; it does not occupy either stage).

Prefill (forward only; m identical jobs through a flow shop with lags): micro-batch i leaves stage j
at F(i, j) = max(F(i-1, j), F(i, j-1) + c) + t_j, which for identical jobs solves to

    T_prefill = sum_j t_j + (m - 1) * max_j t_j + (pp - 1) * c_init

(uniform stages: (m + pp - 1) stage slots of one micro-batch time, plus the hops). The per-micro-batch
time x is looked up at micro-batch size b; the SpotServe artifact divided the pipelined prefill by m
a second time, underestimating it by a factor m.

Decode (each micro-batch circulates: its next token needs all pp stages, pp - 1 forward hops and,
for pp > 1, one hop back from the last stage to the first, h = c_incr if pp > 1 else 0). Decoding
starts when the whole batch is prefilled. Stage times never increase along the pipeline (stage 0
has the most layers and the embedding), so with S = sum_j d_j + (pp - 1) c_incr, the steady-state
round in which every micro-batch produces one token is

    R = max(m * max_j d_j, S + h)

and by induction micro-batch i starts pass k on stage 0 at T_prefill + h + (k - 1) R + i * max_j d_j,
so a batch generating n >= 2 tokens (the first comes out of prefill) takes

    T_batch = T_prefill + h + (n - 2) R + (m - 1) max_j d_j + S     (= T_prefill + (n - 1) R + fill,
                                                                       0 <= fill = min(S + h - d_max, (m - 1) d_max) <= R)

All times are multiplied by the profile's final_fix_factor (the artifact's correction for work outside
the profiled layers). Prefill per-layer time scales linearly with the prompt length from the profile's
``init_tokens`` (512).

Memory per GPU (worst stage): weights (n_max layers / tp, plus the vocab-parallel embedding or LM
head share) + KV cache of B requests at prompt + output tokens over its layers / tp + prefill
activations of one micro-batch + a reserve for the CUDA context. A config is feasible when that fits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spotserve.models.spec import DTYPE_BYTES, ModelSpec, get_spec
from spotserve.planner.profiles import Profile, load_profile
from spotserve.planner.types import ParallelConfig

GiB = 2 ** 30
# g4dn.12xlarge defaults (the paper's cluster): 50 Gbps NIC per instance, PCIe between its GPUs.
DEFAULT_BANDWIDTH = {"intra_bytes_per_s": 8e9, "inter_bytes_per_s": 50e9 / 8, "disk_bytes_per_s": 1e9}


def stage_layer_ranges(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Layer range [lo, hi) of each stage: the first num_layers % pp stages take one extra layer."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp must be in 1..{num_layers}, got {pp}")
    base, extra = divmod(num_layers, pp)
    out, lo = [], 0
    for s in range(pp):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass(frozen=True)
class Workload:
    """Request shape the optimizer plans for (the paper: 512-token prompts, 128 output tokens)."""

    prompt_len: int = 512
    output_len: int = 128

    def __post_init__(self):
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"Workload: prompt_len and output_len must be >= 1, got {self}")


class CostModel:
    """Latency, throughput and memory of configs for one model spec on one GPU type."""

    def __init__(self, profile: Profile, spec: ModelSpec, gpu_memory_bytes: int | None = None,
                 reserved_bytes: int | None = None, bandwidth: dict[str, float] | None = None,
                 workload: Workload = Workload(), max_batch: int | None = None):
        """``max_batch`` caps the batch sizes the optimizer may choose (the artifact served at most 4);
        ValueError when it is below every profiled batch size."""
        self.profile, self.spec, self.workload = profile, spec, workload
        self.dtype_bytes = DTYPE_BYTES[profile.dtype]
        mem = gpu_memory_bytes or profile.gpu_memory_bytes
        if not mem or mem <= 0:
            raise ValueError(f"profile {profile.name}: gpu_memory_bytes not in the profile; pass it")
        self.gpu_memory_bytes = int(mem)
        self.reserved_bytes = int(reserved_bytes if reserved_bytes is not None else
                                  profile.reserved_bytes if profile.reserved_bytes is not None else GiB)
        self.bandwidth = {**DEFAULT_BANDWIDTH, **profile.bandwidth, **(bandwidth or {})}
        self.tps = [tp for tp in profile.tps if spec.valid_tp(tp)]
        if not self.tps:
            raise ValueError(f"profile {profile.name}: no profiled tp splits {spec.name}'s heads")
        profiled = profile.batches(self.tps[0])
        self.max_batch = max_batch
        self.batches = [b for b in profiled if max_batch is None or b <= max_batch]
        if not self.batches:
            raise ValueError(f"profile {profile.name}: max_batch {max_batch} is below every profiled batch size "
                             f"{profiled}")
        # per-tp interpolation tables (batch sizes, prefill s, decode s)
        self._tables = {}
        for tp in self.tps:
            bs = profile.batches(tp)
            self._tables[tp] = (np.array(bs, float), np.array([profile.layer_times[tp][b][0] for b in bs]),
                                np.array([profile.layer_times[tp][b][1] for b in bs]))
        mem_over = profile.memory
        d = self.dtype_bytes
        self.layer_bytes = int(mem_over.get("layer_bytes", spec.layer_params() * d))
        self.kv_bytes_per_token_layer = int(mem_over.get("kv_bytes_per_token_layer",
                                                         spec.kv_elems_per_token_layer() * d))
        pos = (spec.max_positions + 2) * spec.hidden if spec.family == "opt" else 0
        final_norm = spec.hidden * (2 if spec.norm == "layernorm" else 1)
        # a tied LM head still needs its own copy on the last stage when pp > 1
        self.embed_bytes = int(mem_over.get("embed_bytes", (spec.vocab * spec.hidden + pos) * d))
        self.head_bytes = int(mem_over.get("head_bytes", (spec.vocab * spec.hidden + final_norm) * d))
        # on a stage that is also the first (pp = 1) a tied LM head is the embedding already held
        self.first_head_bytes = final_norm * d if spec.tie_word_embeddings else self.head_bytes
        self.activation_bytes_per_token = mem_over.get("activation_bytes_per_token")

    @classmethod
    def from_profile(cls, path: str | Path, spec: ModelSpec | str | None = None, **kwargs) -> "CostModel":
        """Load a profile JSON; ``spec`` defaults to the profile's model (artifact names are mapped)."""
        profile = load_profile(path)
        if spec is None:
            if profile.model is None:
                raise ValueError(f"{path}: profile names no model; pass spec=")
            spec = profile.model
        if isinstance(spec, str):
            spec = get_spec(spec)
        return cls(profile, spec, **kwargs)

    # --- per-layer lookups -------------------------------------------------------------------
    def layer_seconds(self, tp, micro_batch, phase: str, prompt_len=None):
        """Per-layer time of one micro-batch (vectorised over tp and micro_batch); phase 'prefill'|'decode'."""
        tp = np.asarray(tp)
        b = np.asarray(micro_batch, float)
        out = np.zeros(np.broadcast(tp, b).shape)
        tpb, bb = np.broadcast_arrays(tp, b)
        col = 1 if phase == "prefill" else 2
        for t in np.unique(tpb):
            if int(t) not in self._tables:
                raise ValueError(f"tp {int(t)} is not profiled for {self.spec.name} (have {self.tps})")
            tab = self._tables[int(t)]
            xs, ys = tab[0], tab[col]
            sel = tpb == t
            val = np.interp(bb[sel], xs, ys)
            if len(xs) > 1:  # linear extrapolation past the largest profiled batch
                slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
                big = bb[sel] > xs[-1]
                val = np.where(big, ys[-1] + slope * (bb[sel] - xs[-1]), val)
            out[sel] = val
        if phase == "prefill":
            out = out * (self.workload.prompt_len if prompt_len is None else np.asarray(prompt_len)) \
                / self.profile.init_tokens
        return out

    def embed_seconds(self, micro_batch):
        emb = self.profile.embed
        if not emb:
            return np.zeros(np.shape(micro_batch))
        return np.interp(np.log2(np.asarray(micro_batch, float)), np.arange(len(emb)), emb)

    # --- pipeline formulas (vectorised over pp, tp, batch, micro_batches) ------------------------
    def _stage_times(self, pp, phase, tp, batch, m, prompt_len=None):
        pp = np.asarray(pp)
        b = np.asarray(batch) / np.asarray(m)
        x = self.layer_seconds(tp, b, phase, prompt_len)
        e = self.embed_seconds(b)
        L = self.spec.num_layers
        n_max = -(-L // pp)
        return n_max * x + e, L * x + e  # bottleneck stage (stage 0: most layers + embed), sum of stages

    def prefill_seconds(self, pp, tp, batch, micro_batches=1, prompt_len=None):
        """Time to prefill one batch of ``batch`` prompts through the pipeline (formula above)."""
        t_max, t_sum = self._stage_times(pp, "prefill", tp, batch, micro_batches, prompt_len)
        m = np.asarray(micro_batches)
        return (t_sum + (m - 1) * t_max + (np.asarray(pp) - 1) * self.profile.pp_init_comm) \
            * self.profile.final_fix_factor

    def decode_round_seconds(self, pp, tp, batch, micro_batches=1):
        """Time for every request of the batch to get one more token (steady-state round R)."""
        d_max, d_sum = self._stage_times(pp, "decode", tp, batch, micro_batches)
        pp = np.asarray(pp)
        hops = np.where(pp > 1, pp, 0) * self.profile.pp_incr_comm
        return np.maximum(np.asarray(micro_batches) * d_max, d_sum + hops) * self.profile.final_fix_factor

    def decode_seconds(self, pp, tp, batch, micro_batches=1, output_len=None):
        """Time from the end of prefill to the last token of the batch (formula above)."""
        n = np.asarray(self.workload.output_len if output_len is None else output_len)
        d_max, d_sum = self._stage_times(pp, "decode", tp, batch, micro_batches)
        pp, m = np.asarray(pp), np.asarray(micro_batches)
        c = self.profile.pp_incr_comm
        h = np.where(pp > 1, c, 0.0)
        s = d_sum + (pp - 1) * c
        r = np.maximum(m * d_max, s + h)
        total = h + (n - 2) * r + (m - 1) * d_max + s
        return np.where(n >= 2, total, 0.0) * self.profile.final_fix_factor

    def batch_seconds(self, pp, tp, batch, micro_batches=1, prompt_len=None, output_len=None):
        """Execution time of one batch: prefill, then decode until its output_len-th token."""
        return self.prefill_seconds(pp, tp, batch, micro_batches, prompt_len) + \
            self.decode_seconds(pp, tp, batch, micro_batches, output_len)

    def replica_throughput(self, pp, tp, batch, micro_batches=1):
        """Requests/s of one replica under static batching (batch requests per batch time)."""
        return np.asarray(batch) / self.batch_seconds(pp, tp, batch, micro_batches)

    # --- memory ----------------------------------------------------------------------------
    def kv_bytes(self, tokens, layers=None) -> int:
        """KV cache bytes (K and V, all heads) of ``tokens`` tokens over ``layers`` (default all)."""
        return int(tokens) * self.kv_bytes_per_token_layer * (self.spec.num_layers if layers is None else layers)

    def memory_bytes(self, pp, tp, batch, micro_batches=1):
        """Peak bytes per GPU on the worst stage (vectorised); compare with gpu_memory_bytes."""
        pp, tp, batch = np.asarray(pp), np.asarray(tp), np.asarray(batch)
        L, s = self.spec.num_layers, self.spec
        n_max, n_min = -(-L // pp), L // pp
        first = n_max * self.layer_bytes + self.embed_bytes + np.where(pp == 1, self.first_head_bytes, 0)
        last = n_min * self.layer_bytes + self.head_bytes
        weights = np.maximum(first, np.where(pp == 1, first, last)) / tp
        tokens = self.workload.prompt_len + self.workload.output_len
        kv = batch * tokens * n_max * self.kv_bytes_per_token_layer / tp
        b = batch / np.asarray(micro_batches)
        p = self.workload.prompt_len
        if self.activation_bytes_per_token is not None:
            act = b * p * self.activation_bytes_per_token / tp
        else:  # hidden states + the tp share of the MLP and of the attention scores of one micro-batch
            act = self.dtype_bytes * b * (p * (4 * s.hidden + 2 * s.ffn / tp) + s.num_heads / tp * p * p)
        return weights + kv + act + self.reserved_bytes

    def feasible(self, pp, tp, batch, micro_batches=1, gpu_memory_bytes=None):
        """Whether the config's worst stage fits in GPU memory and pp does not exceed the layers."""
        mem = self.gpu_memory_bytes if gpu_memory_bytes is None else gpu_memory_bytes
        pp = np.asarray(pp)
        return (self.memory_bytes(np.minimum(pp, self.spec.num_layers), tp, batch, micro_batches) <= mem) & \
            (pp <= self.spec.num_layers)

    def context_budget(self, gpu_memory_bytes: int) -> int:
        """Bytes of weights + KV a GPU may hold during a migration."""
        return int(gpu_memory_bytes) - self.reserved_bytes

    # --- whole configs -----------------------------------------------------------------------
    def min_gpus(self) -> int:
        """Fewest GPUs of any feasible profiled shape (pp * tp); math.inf as int if none."""
        best = math.inf
        for tp in self.tps:
            for pp in range(1, self.spec.num_layers + 1):
                if pp * tp < best and bool(self.feasible(pp, tp, min(self.batches))):
                    best = pp * tp
                    break
        return best

    def config_latency(self, config: ParallelConfig) -> float:
        """Execution time of one batch of ``config`` (s)."""
        c = config
        return float(self.batch_seconds(c.pp, c.tp, c.batch, c.micro_batches))

    def config_throughput(self, config: ParallelConfig) -> float:
        """Requests/s of all dp replicas."""
        c = config
        return float(c.dp * self.replica_throughput(c.pp, c.tp, c.batch, c.micro_batches))
