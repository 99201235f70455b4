"""Shared vocabulary of the planner: configs, positions, GPUs, transfers, plans and request decisions.

Every type here is a frozen dataclass validated in ``__post_init__`` (ValueError), plain data with
no torch, so the simulator (spotserve/sim) and the live backend build on the same objects.

Intended call sequence (controller side)
----------------------------------------
1. Once per run::

       cost = CostModel.from_profile("spotserve/data/profiles-t4/T4-4x/megatron_h6144_profile.json",
                                     spec=get_spec("20B"), gpu_memory_bytes=16 * 2**30)
       planner = Planner(cost)

2. On every availability change (instance added, notice received, instance lost) or arrival-rate
   change, with the GPUs that will exist after the change::

       plan = planner.plan(gpus, arrival_rate, current=last_plan, requests=running,
                           leaving=gpu_ids_under_notice, slo=None)

   ``gpus`` are the GPUs the new layout may use; ``leaving`` are GPUs that still hold context and
   may serve as migration sources until their deadline but must not get a position; ``current`` is
   the plan now being served (None at start); ``requests`` are ``RunningRequest`` views of the
   requests in flight (their KV cache is context the device mapper tries to keep in place).
   ``plan.cannot_serve`` is a reason string when no config fits (then ``plan.config`` is None,
   nothing moves and the controller keeps requests queued). Otherwise ``plan.placement`` maps each
   ``Position`` to a GPU id, ``plan.transfers`` is the ordered migration plan (stage 0 first, layer
   by layer; ``src=None`` means load from disk) and ``plan.est_seconds`` its estimated duration.
   ``plan.inherits`` tells which old replica's requests each new replica continues.

3. When a notice arrives (absolute ``deadline``), at every decode step until migration starts::

       decision = InterruptionArranger(cost).arrange(now, deadline, running, plan)

   ``decision.requests`` holds one ``RequestDecision`` per running request: ``extra_steps`` decode
   steps still allowed before its context must start moving, and ``action`` ("finish", "move_kv",
   "reprefill" or "requeue"). ``decision.migrate_at`` is the absolute time migration must start.

Planner stages behind ``plan``: ``ConfigOptimizer.choose`` -> ``DeviceMapper.assign`` ->
``MigrationPlanner.migrate``; each can be called alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# finish: completes within its extra steps; move_kv: ship its KV cache; reprefill: drop the cache and
# prefill prompt + committed tokens on the destination; requeue: back to the queue with its commit.
ACTIONS = ("finish", "move_kv", "reprefill", "requeue")
Action = Literal["finish", "move_kv", "reprefill", "requeue"]


def _check_int(owner: str, name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True, order=True)
class Position:
    """Where a GPU sits in a config: replica (data-parallel index), pipeline stage, tensor shard."""

    replica: int
    stage: int
    shard: int

    def __post_init__(self):
        for name in ("replica", "stage", "shard"):
            _check_int("Position", name, getattr(self, name), 0)


@dataclass(frozen=True, order=True)
class ParallelConfig:
    """dp replicas, each a pipeline of pp stages of tp shards, serving ``batch`` requests per replica
    in ``micro_batches`` equal pipeline micro-batches (batch must be a multiple of micro_batches)."""

    dp: int
    pp: int
    tp: int
    batch: int
    micro_batches: int = 1

    def __post_init__(self):
        for name in ("dp", "pp", "tp", "batch", "micro_batches"):
            _check_int("ParallelConfig", name, getattr(self, name), 1)
        if self.batch % self.micro_batches:
            raise ValueError(f"ParallelConfig: batch {self.batch} is not a multiple of micro_batches "
                             f"{self.micro_batches}")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def replica_size(self) -> int:
        """GPUs of one replica (pp * tp)."""
        return self.pp * self.tp

    def positions(self, first_replica: int = 0) -> list[Position]:
        """All positions in (replica, stage, shard) order; replicas numbered from ``first_replica``."""
        return [Position(first_replica + r, s, k)
                for r in range(self.dp) for s in range(self.pp) for k in range(self.tp)]

    def short(self) -> str:
        return f"D{self.dp}P{self.pp}M{self.tp}B{self.batch}m{self.micro_batches}"


@dataclass(frozen=True)
class Instance:
    """A cloud VM holding ``gpus`` GPUs; spot or on-demand."""

    id: str
    gpus: int
    spot: bool = True
    price_per_hour: float = 0.0

    def __post_init__(self):
        if not self.id:
            raise ValueError("Instance: id must be a non-empty string")
        _check_int(f"Instance {self.id}", "gpus", self.gpus, 1)
        if self.price_per_hour < 0:
            raise ValueError(f"Instance {self.id}: price_per_hour must be >= 0")


@dataclass(frozen=True)
class GPU:
    """One GPU: unique id (e.g. "i3/g1"), its instance id, its index in the instance, its memory."""

    id: str
    instance: str
    index: int
    memory_bytes: int

    def __post_init__(self):
        if not self.id or not self.instance:
            raise ValueError(f"GPU: id and instance must be non-empty, got {self.id!r}, {self.instance!r}")
        _check_int(f"GPU {self.id}", "index", self.index, 0)
        _check_int(f"GPU {self.id}", "memory_bytes", self.memory_bytes, 1)


def gpus_of(instances: list[Instance], memory_bytes: int) -> list[GPU]:
    """GPUs of the instances, ids "<instance>/g<index>", each with ``memory_bytes``."""
    return [GPU(f"{inst.id}/g{i}", inst.id, i, memory_bytes) for inst in instances for i in range(inst.gpus)]


@dataclass(frozen=True)
class Transfer:
    """One step of a migration plan.

    ``tensor`` is "layer" (decoder layer ``layer``'s weights), "embed" (token/position embeddings,
    first stage), "head" (final norm + LM head, last stage) or "kv" (KV cache of ``request`` at
    ``layer``). ``slice = (lo, hi, den)`` is the fraction [lo/den, hi/den) of the tensor's
    tensor-parallel dimension (heads / ffn columns / vocab rows); None means the whole tensor.
    ``src`` None means load from disk (weights only).

    Exact meaning (planner/exact.py): ``dst`` gets from ``src`` the part of its new shard that
    ``src``'s old shard holds, within the fraction (each dimension split by heads is split evenly,
    so the fraction is exact there). Dimensions split unevenly by ``sharding.partition`` (ffn,
    vocab) are named exactly by ``elems``: the element ranges [lo, hi) of that dimension this
    transfer carries (None: none of it, or a KV transfer). Replicated tensors (norms, row-parallel
    biases, learned positions, final norm) travel whole, once per destination, in the first
    transfer of that destination and unit whose source holds them (or the first disk read).
    ``nbytes`` is the exact sum. A transfer that only fills elements at uneven split boundaries has
    ``slice = (lo, hi, n)`` over the n elements of that dimension (lo, hi = its first and last
    elements), and comes after the unit's other transfers to that destination.
    """

    src: str | None
    dst: str
    tensor: str
    layer: int | None
    slice: tuple[int, int, int] | None
    nbytes: int
    request: str | None = None
    elems: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        if self.tensor not in ("layer", "embed", "head", "kv"):
            raise ValueError(f"Transfer: unknown tensor {self.tensor!r}")
        if self.tensor in ("layer", "kv") and self.layer is None:
            raise ValueError(f"Transfer: tensor {self.tensor!r} needs a layer")
        if self.tensor == "kv" and (self.request is None or self.src is None):
            raise ValueError("Transfer: a kv transfer needs a request and a source GPU")
        if self.slice is not None:
            lo, hi, den = self.slice
            if not (0 <= lo < hi <= den):
                raise ValueError(f"Transfer: bad slice {self.slice}")
        _check_int("Transfer", "nbytes", self.nbytes, 0)
        if self.src == self.dst:
            raise ValueError(f"Transfer: src equals dst ({self.dst})")


@dataclass(frozen=True)
class RunningRequest:
    """What the planner needs to know of a request in flight.

    ``tokens``: tokens whose KV is in the cache now (prompt + generated); ``committed``: generated
    tokens durable at the controller; ``remaining``: tokens still to generate.
    """

    request_id: str
    replica: int
    prompt_len: int
    tokens: int
    committed: int
    remaining: int

    def __post_init__(self):
        _check_int(f"RunningRequest {self.request_id}", "replica", self.replica, 0)
        _check_int(f"RunningRequest {self.request_id}", "prompt_len", self.prompt_len, 1)
        _check_int(f"RunningRequest {self.request_id}", "tokens", self.tokens, 0)
        _check_int(f"RunningRequest {self.request_id}", "committed", self.committed, 0)
        _check_int(f"RunningRequest {self.request_id}", "remaining", self.remaining, 0)


@dataclass(frozen=True)
class ReconfigurationPlan:
    """The planner's decision: the new config, where each position runs, and how context moves there.

    ``extra`` is an optional additional replica (dp == 1, another shape) built from leftover GPUs;
    its positions use replica index ``config.dp``. ``inherits[new_replica] = old_replica`` whose
    running requests (and KV cache) the new replica continues; old replicas absent from it lose
    their requests to the queue (or re-prefill, see InterruptionArranger).
    """

    config: ParallelConfig | None
    placement: dict[Position, str]
    transfers: list[Transfer]
    est_seconds: float
    cannot_serve: str | None = None
    extra: ParallelConfig | None = None
    inherits: dict[int, int] = field(default_factory=dict)
    est_latency: float | None = None  # expected request latency (s) under the arrival rate
    est_throughput: float | None = None  # requests/s
    reused_bytes: int = 0  # context bytes kept in place
    disk_bytes: int = 0  # bytes loaded from disk
    weights_seconds: float = 0.0  # estimated duration of the weight transfers alone
    continued: dict[str, int] = field(default_factory=dict)  # request id -> new replica continuing it
    kv_moved: dict[str, float] = field(default_factory=dict)  # request id -> fraction of its KV to ship
    lost_kv: frozenset[str] = frozenset()  # continued requests whose KV has no live holder: re-prefill

    def __post_init__(self):
        if self.config is None:
            if not self.cannot_serve:
                raise ValueError("ReconfigurationPlan: config None needs a cannot_serve reason")
            if self.placement or self.transfers or self.extra is not None:
                raise ValueError("ReconfigurationPlan: a cannot-serve plan carries no placement")
            return
        if self.extra is not None and self.extra.dp != 1:
            raise ValueError(f"ReconfigurationPlan: extra replica must have dp 1, got {self.extra}")
        expected = set(self.positions())
        if set(self.placement) != expected:
            raise ValueError("ReconfigurationPlan: placement must cover exactly the config's positions")
        if len(set(self.placement.values())) != len(self.placement):
            raise ValueError("ReconfigurationPlan: a GPU holds two positions")
        if self.est_seconds < 0:
            raise ValueError("ReconfigurationPlan: est_seconds must be >= 0")

    @property
    def serving(self) -> bool:
        return self.config is not None

    def replica_configs(self) -> list[tuple[int, ParallelConfig]]:
        """(replica index, its shape as a dp=1 config) for every replica, extra included."""
        if self.config is None:
            return []
        c = self.config
        one = ParallelConfig(1, c.pp, c.tp, c.batch, c.micro_batches)
        out = [(r, one) for r in range(c.dp)]
        if self.extra is not None:
            out.append((c.dp, self.extra))
        return out

    def positions(self) -> list[Position]:
        """Every position of the config and of the extra replica."""
        if self.config is None:
            return []
        out = self.config.positions()
        if self.extra is not None:
            out += self.extra.positions(first_replica=self.config.dp)
        return out


@dataclass(frozen=True)
class RequestDecision:
    """How one running request survives a notice: ``extra_steps`` more decode steps, then ``action``."""

    request_id: str
    extra_steps: int
    action: Action
    est_seconds: float = 0.0  # time its context needs to be ready on the destination

    def __post_init__(self):
        _check_int(f"RequestDecision {self.request_id}", "extra_steps", self.extra_steps, 0)
        if self.action not in ACTIONS:
            raise ValueError(f"RequestDecision {self.request_id}: action must be one of {ACTIONS}")


@dataclass(frozen=True)
class InterruptionDecision:
    """The arranger's answer: per-request decisions and when (absolute time) migration must start."""

    requests: list[RequestDecision]
    migrate_at: float
    weights_seconds: float  # estimated time to move the weights part of the plan

    def by_id(self) -> dict[str, RequestDecision]:
        return {d.request_id: d for d in self.requests}
