"""The controller's durable state: requests and their committed tokens in SQLite (WAL mode).

A controller killed and restarted with the same path reloads every unfinished request with the
tokens committed so far and resumes it. Besides requests, a small key/value table (`meta`, JSON
values) keeps what a restarted controller needs to adopt the workers that outlived it: the worker
server's address, the token file, and the instances held with their slots (the layout itself is
re-derived from what the workers say at hello). Commits are idempotent: re-committing a token at an index that
already holds the same token is a no-op, a different token is an error (it would mean two
workers disagree about a greedy sequence).
"""
from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
import time
from dataclasses import dataclass, field
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    prompt TEXT NOT NULL,          -- JSON list of token ids
    params TEXT NOT NULL,          -- JSON sampling parameters
    status TEXT NOT NULL,          -- queued | running | completed | rejected
    tokens TEXT NOT NULL,          -- JSON list of committed output token ids
    reason TEXT,                   -- why a request was rejected or how it finished
    arrived_at REAL NOT NULL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL            -- JSON
);
"""
STATUSES = ("queued", "running", "completed", "rejected")


@dataclass
class StoredRequest:
    id: str
    prompt: list[int]
    params: dict
    status: str
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    arrived_at: float = 0.0
    finished_at: float | None = None


class StateStore:
    """One SQLite file; safe to call from several threads of one process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.RLock()  # re-entered by commit() inside transaction()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a process kill
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self):
        """Group the writes of the block into one SQLite transaction (one WAL write per decode step
        instead of one per request); rolled back if the block raises."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, rid: str, prompt: list[int], params: dict, arrived_at: float | None = None) -> None:
        """Record an arrived request (idempotent for the same id and prompt)."""
        with self._lock:
            row = self._db.execute("SELECT prompt FROM requests WHERE id=?", (rid,)).fetchone()
            if row is not None:
                if json.loads(row[0]) != list(prompt):
                    raise ValueError(f"request {rid!r} already stored with a different prompt")
                return
            self._db.execute(
                "INSERT INTO requests (id, prompt, params, status, tokens, arrived_at) VALUES (?,?,?,?,?,?)",
                (rid, json.dumps(list(prompt)), json.dumps(params), "queued", "[]",
                 time.time() if arrived_at is None else arrived_at),
            )

    def commit(self, rid: str, start: int, tokens: list[int]) -> int:
        """Commit `tokens` as output positions start.. of request `rid`; returns the committed count.

        Raises KeyError for an unknown request, ValueError for a gap or a conflicting token.
        """
        with self._lock:
            row = self._db.execute("SELECT tokens FROM requests WHERE id=?", (rid,)).fetchone()
            if row is None:
                raise KeyError(f"unknown request {rid!r}")
            have = json.loads(row[0])
            if start > len(have):
                raise ValueError(f"request {rid!r}: commit at {start} leaves a gap after {len(have)} tokens")
            overlap = have[start:start + len(tokens)]
            if overlap != list(tokens[:len(overlap)]):
                raise ValueError(f"request {rid!r}: commit at {start} conflicts with committed tokens")
            new = have + list(tokens[len(overlap):]) if start + len(tokens) > len(have) else have
            if len(new) != len(have):
                self._db.execute("UPDATE requests SET tokens=?, status='running' WHERE id=?",
                                 (json.dumps(new), rid))
            return len(new)

    def finish(self, rid: str, status: str, reason: str | None = None) -> None:
        if status not in ("completed", "rejected"):
            raise ValueError(f"finish status must be completed or rejected, got {status!r}")
        with self._lock:
            cur = self._db.execute("UPDATE requests SET status=?, reason=?, finished_at=? WHERE id=?",
                                   (status, reason, time.time(), rid))
            if cur.rowcount == 0:
                raise KeyError(f"unknown request {rid!r}")

    def set_meta(self, key: str, value) -> None:
        """Store a JSON-serialisable value under `key` (replacing any earlier one)."""
        with self._lock:
            self._db.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                             "value=excluded.value", (key, json.dumps(value)))

    def get_meta(self, key: str, default=None):
        """The value stored under `key`, or `default`."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def get(self, rid: str) -> StoredRequest:
        with self._lock:
            row = self._db.execute("SELECT * FROM requests WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise KeyError(f"unknown request {rid!r}")
        return _row(row)

    def unfinished(self) -> list[StoredRequest]:
        """Requests to resume after a restart, in arrival order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM requests WHERE status IN ('queued','running') ORDER BY arrived_at, id").fetchall()
        return [_row(r) for r in rows]

    def all(self) -> list[StoredRequest]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM requests ORDER BY arrived_at, id").fetchall()
        return [_row(r) for r in rows]


def _row(r: tuple) -> StoredRequest:
    return StoredRequest(r[0], json.loads(r[1]), json.loads(r[2]), r[3], json.loads(r[4]), r[5], r[6], r[7])
