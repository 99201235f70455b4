"""Approaches as switches on one controller: spotserve, the two baselines and the four ablations.

All of them run the same controller and planner code; a switch only turns one component off:
- `reparallelization`: same optimizer, but every change stops serving, reloads all weights from
  disk and restarts the interrupted requests from scratch; it acts when an instance is actually
  lost or ready, not on the notice.
- `rerouting`: replica shape fixed for the full pool; a replica that lost a GPU is dropped, its
  requests restart on other replicas, and free GPUs are built into new replicas from disk.
- ablations of spotserve: no optimizer (shape frozen), no migration planner (no overlap, no
  memory-aware order), no interruption arranger (no KV migration: interrupted requests restart),
  no device mapper (placement by rank).
"""
from __future__ import annotations

from dataclasses import dataclass

MODES = ("spotserve", "reparallelization", "rerouting")


@dataclass(frozen=True)
class Approach:
    """A named set of switches."""

    name: str
    mode: str = "spotserve"
    optimizer: bool = True
    migration_planner: bool = True
    arranger: bool = True
    mapper: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"approach mode must be one of {MODES}, got {self.mode!r}")

    @property
    def uses_notice(self) -> bool:
        """Whether the approach reacts to a notice (before the instance is gone)."""
        return self.mode == "spotserve"


APPROACHES = {
    "spotserve": Approach("spotserve"),
    "reparallelization": Approach("reparallelization", mode="reparallelization", migration_planner=False,
                                  arranger=False, mapper=False),
    "rerouting": Approach("rerouting", mode="rerouting", optimizer=False, migration_planner=False,
                          arranger=False, mapper=False),
    "no-optimizer": Approach("no-optimizer", optimizer=False),
    "no-migration-planner": Approach("no-migration-planner", migration_planner=False),
    "no-arranger": Approach("no-arranger", arranger=False),
    "no-mapper": Approach("no-mapper", mapper=False),
}
BASELINES = ("spotserve", "reparallelization", "rerouting")
ABLATIONS = ("spotserve", "no-optimizer", "no-migration-planner", "no-arranger", "no-mapper")


def get_approach(name: str) -> Approach:
    """Look an approach up by name; ValueError lists the known names."""
    try:
        return APPROACHES[name]
    except KeyError:
        raise ValueError(f"unknown approach {name!r}; known: {', '.join(APPROACHES)}") from None
