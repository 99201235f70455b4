"""Spot availability traces: parse the artifact's JSON-lines and g4dn CSV formats into events.

JSON-lines format (availability/trace_*.txt): one JSON array per line,
`[t_ms, op, {"nodes": [names...], "required_tpt": float?, "ondemand": bool?}]`, op one of
`add`, `remove`, `DONE` (end of the run) or `other` (only changes `required_tpt`); lines starting
with `#` and blank lines are ignored. A `remove` at t means the instance is reclaimed at t; its
notice comes one grace period earlier. `ondemand` is spotserve's own optional extension.

CSV format (availability/g4dn.csv): no header, rows `t_ms,op,node_id`, op `add` or `remove`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OPS = ("add", "remove", "done", "other")


@dataclass(frozen=True)
class AvailabilityEvent:
    """One change of the instance pool at time `t` (seconds from the start of the trace)."""

    t: float
    op: str  # add | remove | done | other
    instances: tuple[str, ...] = ()
    required_tpt: float | None = None
    ondemand: bool = False  # only meaningful for `add`

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"availability op must be one of {OPS}, got {self.op!r}")
        if self.t < 0:
            raise ValueError(f"availability event time must be >= 0, got {self.t}")


@dataclass
class AvailabilityTrace:
    """A validated, time-ordered list of availability events; `duration` is the DONE time."""

    events: list[AvailabilityEvent]
    duration: float
    name: str = "trace"
    ondemand: frozenset[str] = field(default_factory=frozenset)

    def counts(self) -> list[tuple[float, int]]:
        """(time, instances held after the events at that time), one row per distinct time."""
        live: set[str] = set()
        rows: list[tuple[float, int]] = []
        for ev in self.events:
            if ev.op == "add":
                live.update(ev.instances)
            elif ev.op == "remove":
                live.difference_update(ev.instances)
            if rows and rows[-1][0] == ev.t:
                rows[-1] = (ev.t, len(live))
            else:
                rows.append((ev.t, len(live)))
        return rows

    def max_instances(self) -> int:
        """Most instances held at once."""
        return max((c for _, c in self.counts()), default=0)

    def instance_seconds(self) -> float:
        """Integral of the instance count over [0, duration] (what a full pool would cost)."""
        total, prev_t, prev_c = 0.0, 0.0, 0
        for t, c in self.counts():
            total += (min(t, self.duration) - prev_t) * prev_c
            prev_t, prev_c = min(t, self.duration), c
        return total + (self.duration - prev_t) * prev_c


def _check_pool(events: list[AvailabilityEvent], source: str, lines: list[int]) -> None:
    """Raise ValueError naming the line when an add/remove does not match the pool or time goes back."""
    live: set[str] = set()
    prev_t = 0.0
    for ev, lineno in zip(events, lines):
        if ev.t < prev_t:
            raise ValueError(f"{source}:{lineno}: time {ev.t * 1e3:.0f} ms goes back (previous {prev_t * 1e3:.0f} ms)")
        prev_t = ev.t
        if ev.op == "add":
            dup = live.intersection(ev.instances)
            if dup or len(set(ev.instances)) != len(ev.instances):
                raise ValueError(f"{source}:{lineno}: instance added twice: {sorted(dup) or list(ev.instances)}")
            live.update(ev.instances)
        elif ev.op == "remove":
            missing = set(ev.instances) - live
            if missing:
                raise ValueError(f"{source}:{lineno}: removing instances that are not held: {sorted(missing)}")
            live.difference_update(ev.instances)


def parse_availability_lines(lines, source: str = "<trace>") -> AvailabilityTrace:
    """Parse the JSON-lines format (see module doc). In: an iterable of text lines.

    Out: AvailabilityTrace ending at the DONE event (or the last event if there is none).
    Raises ValueError naming `source:line` for malformed JSON, unknown ops, bad fields or an
    add/remove that does not match the pool.
    """
    events: list[AvailabilityEvent] = []
    linenos: list[int] = []
    duration = None
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, list) or len(row) != 3 or not isinstance(row[2], dict):
            raise ValueError(f"{where}: expected [t_ms, op, {{\"nodes\": [...]}}], got {line[:80]!r}")
        t_ms, op, body = row
        if not isinstance(t_ms, (int, float)) or isinstance(t_ms, bool) or t_ms < 0:
            raise ValueError(f"{where}: t_ms must be a non-negative number, got {t_ms!r}")
        if not isinstance(op, str) or op.lower() not in OPS:
            raise ValueError(f"{where}: op must be add, remove, DONE or other, got {op!r}")
        nodes = body.get("nodes", [])
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise ValueError(f"{where}: 'nodes' must be a list of names, got {nodes!r}")
        tpt = body.get("required_tpt")
        if tpt is not None and (not isinstance(tpt, (int, float)) or tpt < 0):
            raise ValueError(f"{where}: 'required_tpt' must be a non-negative number, got {tpt!r}")
        op = op.lower()
        if op in ("add", "remove") and not nodes:
            raise ValueError(f"{where}: {op} with no nodes")
        ev = AvailabilityEvent(t_ms / 1000.0, op, tuple(nodes) if op in ("add", "remove") else (),
                               None if tpt is None else float(tpt), bool(body.get("ondemand", False)))
        if op == "done":
            duration = ev.t
            events.append(ev)
            linenos.append(lineno)
            break
        events.append(ev)
        linenos.append(lineno)
    if not events:
        raise ValueError(f"{source}: no events")
    _check_pool(events, source, linenos)
    if duration is None:
        duration = events[-1].t
    od = frozenset(n for ev in events if ev.op == "add" and ev.ondemand for n in ev.instances)
    return AvailabilityTrace(events, duration, source, od)


def parse_g4dn_csv_lines(lines, source: str = "<csv>") -> AvailabilityTrace:
    """Parse the `t_ms,op,node_id` CSV (g4dn.csv). Same-time rows of one op are merged.

    Raises ValueError naming `source:line` for a wrong column count, a bad number or op, or an
    add/remove that does not match the pool.
    """
    events: list[AvailabilityEvent] = []
    linenos: list[int] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        cols = [c.strip() for c in line.split(",")]
        if len(cols) != 3:
            raise ValueError(f"{where}: expected 3 columns t_ms,op,node_id, got {len(cols)}")
        try:
            t_ms = float(cols[0])
        except ValueError:
            raise ValueError(f"{where}: t_ms {cols[0]!r} is not a number") from None
        if t_ms < 0:
            raise ValueError(f"{where}: t_ms must be >= 0, got {cols[0]}")
        if cols[1] not in ("add", "remove"):
            raise ValueError(f"{where}: op must be add or remove, got {cols[1]!r}")
        if not cols[2]:
            raise ValueError(f"{where}: empty node_id")
        t = t_ms / 1000.0
        if events and events[-1].t == t and events[-1].op == cols[1]:
            prev = events[-1]
            events[-1] = AvailabilityEvent(t, prev.op, prev.instances + (cols[2],))
            continue
        events.append(AvailabilityEvent(t, cols[1], (cols[2],)))
        linenos.append(lineno)
    if not events:
        raise ValueError(f"{source}: no events")
    _check_pool(events, source, linenos)
    return AvailabilityTrace(events, events[-1].t, source)


def load_availability(path: str | Path) -> AvailabilityTrace:
    """Read an availability trace file, choosing the parser by extension (.csv or JSON lines)."""
    path = Path(path)
    with path.open() as f:
        lines = f.readlines()
    if path.suffix == ".csv":
        trace = parse_g4dn_csv_lines(lines, str(path))
    else:
        trace = parse_availability_lines(lines, str(path))
    trace.name = path.stem
    return trace


def label_ondemand_replacements(trace: AvailabilityTrace, delay_s: float = 90.0) -> AvailabilityTrace:
    """Mark as on-demand the instances added exactly `delay_s` after a removal, up to the count removed.

    The artifact's `*_ondemand.txt` traces do not say which adds are on-demand; in them every
    removal is answered by as many adds exactly 90 s later (the on-demand start-up), so that
    pattern identifies the on-demand replacements. Out: a new trace with `ondemand` set.
    """
    removed_at: dict[float, int] = {}
    for ev in trace.events:
        if ev.op == "remove":
            removed_at[round(ev.t, 3)] = removed_at.get(round(ev.t, 3), 0) + len(ev.instances)
    events, od = [], set(trace.ondemand)
    for ev in trace.events:
        key = round(ev.t - delay_s, 3)
        if ev.op == "add" and removed_at.get(key, 0) > 0:
            n = min(removed_at[key], len(ev.instances))
            removed_at[key] -= n
            od.update(ev.instances[:n])
            if n == len(ev.instances):
                events.append(AvailabilityEvent(ev.t, "add", ev.instances, ev.required_tpt, True))
            else:  # split: the first n are on-demand replacements, the rest spot
                events.append(AvailabilityEvent(ev.t, "add", ev.instances[:n], ev.required_tpt, True))
                events.append(AvailabilityEvent(ev.t, "add", ev.instances[n:], None, False))
            continue
        events.append(ev)
    return AvailabilityTrace(events, trace.duration, trace.name, frozenset(od))
