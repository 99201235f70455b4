"""Measured batch-to-batch variability of step times, which the simulator can replay with a seeded RNG.

A profile's ``tp-<n>`` tables hold one (median) prefill and decode-step time per batch size, so a
simulated batch always takes the same time. A live replica does not: on a shared machine whole
batches run slower while other processes hold the cores (step times inside one batch are strongly
correlated: the spread of batch means is ~3x what independent steps would give), and a replica
that sat idle pays a colder first batch (caches and the worker's wake-up). The live-path
calibration (spotserve/live/calibrate.py) records both in an optional profile field that the
planner ignores:

    "step_jitter": {
        "samples": [[prefill_ratio, decode_ratio], ...],  # one pair per timed batch: its prefill and
                                                         # mean decode step / the median of its cell
        "idle_s": 0.2,                                   # idle time before a "cold" batch
        "cold": {"prefill": 1.4, "decode": 1.05}         # cold median / warm median
    }

`StepJitter.draw` resamples one measured batch (the pair keeps the measured correlation of prefill
and decode) and applies the cold factors when the replica was idle for at least ``idle_s``.
Without the field the simulator stays deterministic, exactly as before.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StepJitter:
    """Empirical per-batch speed ratios (prefill, decode) and the cold-batch factors."""

    samples: tuple[tuple[float, float], ...]
    idle_s: float | None = None  # None: no cold-batch factors
    cold_prefill: float = 1.0
    cold_decode: float = 1.0

    def __post_init__(self):
        if not self.samples:
            raise ValueError("step_jitter: samples must not be empty")
        for i, s in enumerate(self.samples):
            if len(s) != 2 or not (s[0] > 0 and s[1] > 0):
                raise ValueError(f"step_jitter: samples[{i}] must be two positive ratios, got {s!r}")
        if self.idle_s is not None and self.idle_s < 0:
            raise ValueError(f"step_jitter: idle_s must be >= 0, got {self.idle_s}")
        if not (self.cold_prefill > 0 and self.cold_decode > 0):
            raise ValueError("step_jitter: cold factors must be positive")

    def draw(self, rng: random.Random, idle_for: float) -> tuple[float, float]:
        """(prefill factor, decode-step factor) of one batch; `idle_for`: seconds its replica was idle."""
        fp, fd = self.samples[rng.randrange(len(self.samples))]
        if self.idle_s is not None and idle_for >= self.idle_s:
            fp, fd = fp * self.cold_prefill, fd * self.cold_decode
        return fp, fd

    @classmethod
    def from_dict(cls, rec: dict, where: str = "step_jitter") -> "StepJitter":
        """Parse the profile's ``step_jitter`` object; ValueError naming `where` and the bad field."""
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: must be an object")
        raw = rec.get("samples")
        if not isinstance(raw, list) or not all(isinstance(s, (list, tuple)) and len(s) == 2 and
                                                all(isinstance(x, (int, float)) for x in s) for s in raw):
            raise ValueError(f"{where}: field 'samples' must be a list of [prefill_ratio, decode_ratio] pairs")
        cold = rec.get("cold", {})
        if not isinstance(cold, dict):
            raise ValueError(f"{where}: field 'cold' must be an object")
        idle = rec.get("idle_s")
        try:
            return cls(tuple((float(a), float(b)) for a, b in raw), None if idle is None else float(idle),
                       float(cold.get("prefill", 1.0)), float(cold.get("decode", 1.0)))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from exc

    @classmethod
    def from_profile(cls, path: str | Path) -> "StepJitter | None":
        """The ``step_jitter`` of a profile JSON file, or None when it has none (e.g. the T4 profiles)."""
        data = json.loads(Path(path).read_text())
        rec = data.get("step_jitter") if isinstance(data, dict) else None
        return None if rec is None else cls.from_dict(rec, f"{path}: step_jitter")
