"""InstanceManager: instances and their GPUs, notices and deadlines, acquisitions, and what they cost.

Life of an instance: `starting` (acquired, billed, not usable until its start-up delay passes) ->
`ready` -> `noticed` (spot only: reclaim notice received; deadline = notice + grace) -> `gone`
(reclaimed) or `released` (given back by us). On-demand instances are never reclaimed. Every
instance-second from acquisition to the end is billed at the instance's price.
"""
from __future__ import annotations

from dataclasses import dataclass

SPOT, ONDEMAND = "spot", "ondemand"
STARTING, READY, NOTICED, GONE, RELEASED = "starting", "ready", "noticed", "gone", "released"


@dataclass(frozen=True)
class InstanceConfig:
    """Cloud parameters (paper: g4dn.12xlarge, 4 x T4 16 GB, 30 s grace, $1.9046 / $3.912 an hour).

    A T4's 16 GB of GDDR6 runs with ECC on (the default on AWS), which leaves 15 GiB (15360 MiB, as
    nvidia-smi reports) to CUDA; that is the memory a config must fit."""

    gpus_per_instance: int = 4
    gpu_memory_bytes: int = 15 * 1024**3
    grace_s: float = 30.0
    startup_s: float = 0.0
    spot_usd_per_hour: float = 1.9046
    ondemand_usd_per_hour: float = 3.912

    def __post_init__(self):
        if self.gpus_per_instance <= 0 or self.gpu_memory_bytes <= 0:
            raise ValueError("gpus_per_instance and gpu_memory_bytes must be positive")
        if self.grace_s < 0 or self.startup_s < 0:
            raise ValueError(f"grace_s and startup_s must be >= 0, got {self.grace_s}, {self.startup_s}")
        if self.spot_usd_per_hour < 0 or self.ondemand_usd_per_hour < 0:
            raise ValueError("prices must be >= 0")


class Instance:
    """One VM. `gpu_ids` are global GPU ids; the i-th is local index i."""

    __slots__ = ("name", "kind", "gpu_ids", "state", "acquired_t", "ready_t", "notice_t", "deadline", "end_t",
                 "usd_per_hour")

    def __init__(self, name: str, kind: str, gpu_ids: list[int], acquired_t: float, ready_t: float,
                 usd_per_hour: float):
        self.name = name
        self.kind = kind
        self.gpu_ids = gpu_ids
        self.state = STARTING
        self.acquired_t = acquired_t
        self.ready_t = ready_t
        self.notice_t: float | None = None
        self.deadline: float | None = None
        self.end_t: float | None = None
        self.usd_per_hour = usd_per_hour

    def cost(self, now: float) -> float:
        """USD billed from acquisition to the end (or `now` while it runs)."""
        end = self.end_t if self.end_t is not None else now
        return max(0.0, end - self.acquired_t) * self.usd_per_hour / 3600.0


class InstanceManager:
    """Tracks instances; hands out stable GPU ids; answers which GPUs are usable and what was spent."""

    def __init__(self, config: InstanceConfig | None = None):
        self.config = config or InstanceConfig()
        self.instances: dict[str, Instance] = {}
        self._next_gpu = 0
        self.gpu_owner: dict[int, str] = {}

    def acquire(self, name: str, now: float, kind: str = SPOT, startup_s: float | None = None) -> Instance:
        """Start an instance (billed from now); it becomes ready after the start-up delay."""
        if kind not in (SPOT, ONDEMAND):
            raise ValueError(f"instance kind must be spot or ondemand, got {kind!r}")
        if name in self.instances and self.instances[name].state not in (GONE, RELEASED):
            raise ValueError(f"instance {name} is already held")
        n = self.config.gpus_per_instance
        gpu_ids = list(range(self._next_gpu, self._next_gpu + n))
        self._next_gpu += n
        for g in gpu_ids:
            self.gpu_owner[g] = name
        price = self.config.spot_usd_per_hour if kind == SPOT else self.config.ondemand_usd_per_hour
        delay = self.config.startup_s if startup_s is None else startup_s
        inst = Instance(name, kind, gpu_ids, now, now + delay, price)
        self.instances[name] = inst
        return inst

    def mark_ready(self, name: str, now: float) -> Instance:
        """The instance finished starting up."""
        inst = self._get(name)
        if inst.state != STARTING:
            raise ValueError(f"instance {name} is {inst.state}, not starting")
        inst.state, inst.ready_t = READY, now
        return inst

    def notice(self, name: str, now: float, deadline: float | None = None) -> Instance:
        """Record a reclaim notice; the deadline is notice + grace unless given. On-demand: ValueError."""
        inst = self._get(name)
        if inst.kind == ONDEMAND:
            raise ValueError(f"instance {name} is on-demand and cannot be reclaimed")
        if inst.state in (GONE, RELEASED):
            raise ValueError(f"instance {name} is already {inst.state}")
        inst.notice_t = now
        inst.deadline = now + self.config.grace_s if deadline is None else deadline
        if inst.state == READY:
            inst.state = NOTICED
        return inst

    def reclaim(self, name: str, now: float) -> Instance:
        """The cloud took the instance back (at its deadline, or without notice)."""
        inst = self._get(name)
        if inst.kind == ONDEMAND:
            raise ValueError(f"instance {name} is on-demand and cannot be reclaimed")
        if inst.state in (GONE, RELEASED):
            raise ValueError(f"instance {name} is already {inst.state}")
        inst.state, inst.end_t = GONE, now
        return inst

    def release(self, name: str, now: float) -> Instance:
        """We give the instance back (stops billing)."""
        inst = self._get(name)
        if inst.state in (GONE, RELEASED):
            raise ValueError(f"instance {name} is already {inst.state}")
        inst.state, inst.end_t = RELEASED, now
        return inst

    def _get(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise ValueError(f"unknown instance {name!r}") from None

    # --- queries ------------------------------------------------------------------------------
    def ready(self, include_noticed: bool = False) -> list[Instance]:
        """Usable instances (optionally with those under notice), in acquisition order."""
        ok = (READY, NOTICED) if include_noticed else (READY,)
        return [i for i in self.instances.values() if i.state in ok]

    def noticed(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state == NOTICED]

    def usable_gpus(self, include_noticed: bool = False) -> list[int]:
        """GPU ids of ready instances (those that survive, unless include_noticed)."""
        return [g for i in self.ready(include_noticed) for g in i.gpu_ids]

    def cost(self, now: float) -> float:
        """Total USD spent up to `now`."""
        return sum(i.cost(now) for i in self.instances.values())

    def end_all(self, now: float) -> None:
        """Stop billing everything still held (end of a run)."""
        for inst in self.instances.values():
            if inst.end_t is None:
                inst.end_t = now
                inst.state = RELEASED
