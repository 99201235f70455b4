"""Request arrivals: the artifact's arrival files and a Gamma renewal generator with a true CV.

Arrival file format (arrivals/query_*.txt): rows `id,arrival_s,input_len,byte_offset`, no header;
`arrival_s` is seconds from the start, `byte_offset` is ignored (it pointed into a token file that
was not published). Output length is not in the file; the paper used 128 for every request.
Availability traces are parsed by spotserve.cloud.availability (formats documented there).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Arrival:
    """One request of a workload: when it arrives and how many tokens go in and come out."""

    id: int
    t: float
    input_len: int
    output_len: int

    def __post_init__(self):
        if self.t < 0 or self.input_len <= 0 or self.output_len <= 0:
            raise ValueError(f"arrival {self.id}: t >= 0 and positive lengths needed, got {self}")


def parse_arrival_lines(lines, output_len: int = 128, source: str = "<arrivals>") -> list[Arrival]:
    """Parse `id,arrival_s,input_len,byte_offset` rows. Out: arrivals sorted by time.

    Raises ValueError naming `source:line` for a wrong column count, a non-number, a negative
    time, a non-positive input length or a repeated id.
    """
    out: list[Arrival] = []
    seen: set[int] = set()
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cols = line.split(",")
        where = f"{source}:{lineno}"
        if len(cols) not in (3, 4):
            raise ValueError(f"{where}: expected id,arrival_s,input_len[,byte_offset], got {len(cols)} columns")
        try:
            rid = int(cols[0])
            t = float(cols[1])
            n_in = int(float(cols[2]))
        except ValueError:
            raise ValueError(f"{where}: id, arrival_s and input_len must be numbers, got {line[:80]!r}") from None
        if not np.isfinite(t) or t < 0:
            raise ValueError(f"{where}: arrival_s must be a finite number >= 0, got {cols[1]}")
        if n_in <= 0:
            raise ValueError(f"{where}: input_len must be positive, got {cols[2]}")
        if rid in seen:
            raise ValueError(f"{where}: request id {rid} appears twice")
        seen.add(rid)
        out.append(Arrival(rid, t, n_in, output_len))
    out.sort(key=lambda a: (a.t, a.id))
    return out


def load_arrivals(path: str | Path, output_len: int = 128) -> list[Arrival]:
    """Read an arrival file (format in the module doc)."""
    path = Path(path)
    with path.open() as f:
        return parse_arrival_lines(f, output_len, str(path))


def gamma_gaps(rate: float, cv: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` inter-arrival gaps of a Gamma renewal process with mean 1/rate and coefficient of variation cv.

    A Gamma(shape k, scale s) gap has mean k*s and CV 1/sqrt(k); so k = 1/cv^2, s = 1/(rate*k).
    (The artifact's "cv6" files were drawn with the two parameters mixed up, hence CV ~0.05.)
    """
    if rate <= 0 or cv <= 0 or n < 0:
        raise ValueError(f"need rate > 0, cv > 0, n >= 0; got rate={rate}, cv={cv}, n={n}")
    k = 1.0 / (cv * cv)
    return rng.gamma(k, 1.0 / (rate * k), size=n)


def gamma_arrivals(rate: float, cv: float, duration: float, input_len: int = 512, output_len: int = 128,
                   seed: int = 0) -> list[Arrival]:
    """Arrivals of a Gamma renewal process over [0, duration): mean rate `rate` req/s, gap CV `cv`."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    rng = np.random.default_rng(seed)
    times: list[float] = []
    t = 0.0
    chunk = max(16, int(rate * duration * 1.2) + 16)
    while t < duration:
        for gap in gamma_gaps(rate, cv, chunk, rng):
            t += float(gap)
            if t >= duration:
                break
            times.append(t)
    return [Arrival(i, x, input_len, output_len) for i, x in enumerate(times)]


def modulated_arrivals(rates: list[float], period_s: float, cv: float, input_len: int = 512,
                       output_len: int = 128, seed: int = 0) -> list[Arrival]:
    """Arrivals whose rate follows `rates` (req/s), one value per `period_s`, with Gamma gaps of CV `cv`.

    Built by time rescaling: a unit-rate Gamma renewal process is mapped through the inverse of
    the cumulative rate, so the local rate follows the schedule and the gaps keep their shape.
    """
    if not rates or any(r <= 0 for r in rates) or period_s <= 0:
        raise ValueError("rates must be a non-empty list of positive numbers and period_s > 0")
    cum = np.concatenate([[0.0], np.cumsum(np.asarray(rates, dtype=float) * period_s)])
    edges = np.arange(len(rates) + 1) * period_s
    unit = gamma_arrivals(1.0, cv, float(cum[-1]), input_len, output_len, seed)
    ts = np.interp([a.t for a in unit], cum, edges)
    return [Arrival(i, float(t), input_len, output_len) for i, t in enumerate(ts)]


def measured_cv(arrivals: list[Arrival]) -> float:
    """Coefficient of variation of the inter-arrival gaps (std/mean)."""
    if len(arrivals) < 3:
        raise ValueError("need at least 3 arrivals to measure a CV")
    gaps = np.diff([a.t for a in arrivals])
    return float(gaps.std() / gaps.mean())
