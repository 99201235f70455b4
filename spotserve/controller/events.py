"""Structured run log: JSON-lines events (instances, notices, plans, interruptions), kept in memory."""
from __future__ import annotations

import json
from pathlib import Path


class EventLog:
    """Append-only list of event dicts `{"t": seconds, "event": name, ...}`; written as JSON lines."""

    def __init__(self):
        self.events: list[dict] = []

    def emit(self, t: float, event: str, **fields) -> None:
        """Record one event at time t."""
        row = {"t": round(float(t), 6), "event": event}
        row.update(fields)
        self.events.append(row)

    def of(self, event: str) -> list[dict]:
        """Every event with this name, in order."""
        return [e for e in self.events if e["event"] == event]

    def write(self, path: str | Path) -> None:
        """Write one JSON object per line."""
        with Path(path).open("w") as f:
            for e in self.events:
                f.write(json.dumps(e, separators=(",", ":")) + "\n")
