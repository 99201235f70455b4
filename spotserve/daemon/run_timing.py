"""Where one migration run's time goes: host seconds per step (always) and, opt-in, a per-round timeline.

Host steps (seconds, summed over the run): alloc (new tensors and staging not made by prepare),
pack (staging copies and views of sends, enqueued), post (batch_isend_irecv), wait (Work.wait:
a stream wait with NCCL, the transfer itself with gloo), unpack, local (keeps and checkpoint
reads), arrive (unit bookkeeping, event polls, on_arrival), drain (waiting at the end for the
last units and streams). With `detail`, every round this worker takes part in gets its bytes
and times in ms from the run's start: on CUDA from events on the executor's streams (packed =
its packs done, so NCCL may start it; done = NCCL finished it, as seen by the stream that then
unpacks), else host clocks. From them: net_ms = done - max(packed, previous done) (the wire time
of the round, NCCL running rounds one after another) and idle_ms = packed - previous done when
positive (the wire waited for this round: host late or packing slow).
"""
from __future__ import annotations

import time

import torch

HOST_KEYS = ("alloc_s", "pack_s", "post_s", "wait_s", "unpack_s", "local_s", "arrive_s", "drain_s")


class RunTimer:
    """Timers of one run. streams: (network stream, local stream) on CUDA, else None."""

    def __init__(self, streams, detail: bool):
        self.host = dict.fromkeys(HOST_KEYS, 0.0)
        self.detail, self.streams = detail, streams
        self.t0 = time.perf_counter()
        self.rows: dict[int, dict] = {}
        self.events: dict[int, dict] = {}
        self.start = self._event(0)
        self.end: dict[str, object] = {}

    def _event(self, which: int):
        if not self.detail or self.streams is None:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.streams[which])
        return ev

    def now_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3

    def add(self, key: str, since: float) -> float:
        """Adds perf_counter() - since to host step `key`; returns perf_counter()."""
        t = time.perf_counter()
        self.host[key] += t - since
        return t

    def round(self, k: int, **fields) -> None:
        """Opens (or updates) round k's row."""
        if self.detail:
            self.rows.setdefault(k, {"round": k}).update(fields)

    def mark(self, k: int, what: str, stream: int = 0) -> None:
        """Time point `what` of round k: a CUDA event on stream `stream` (0 network, 1 local), else the host clock."""
        if not self.detail:
            return
        if self.streams is None:
            self.rows.setdefault(k, {"round": k})[what + "_ms"] = self.now_ms()
        else:
            self.events.setdefault(k, {})[what] = self._event(stream)

    def finish(self) -> None:
        """End points: the network stream's and the local stream's last work (host clock without CUDA)."""
        if not self.detail:
            return
        if self.streams is None:
            self.end = {"end": self.now_ms()}
        else:
            self.end = {"end": self._event(0), "local_end": self._event(1)}

    def summary(self) -> dict:
        """Host steps, plus (detail) per-round rows and totals; synchronizes the streams on CUDA."""
        out = {k: round(v, 6) for k, v in self.host.items()}
        if not self.detail:
            return out
        if self.streams is not None:
            for s in self.streams:
                s.synchronize()
            for k, evs in self.events.items():
                row = self.rows.setdefault(k, {"round": k})
                for what, ev in evs.items():
                    row[what + "_ms"] = self.start.elapsed_time(ev)  # events of both streams, one clock
        ends = {k: (v if isinstance(v, float) else self.start.elapsed_time(v)) for k, v in self.end.items()}
        rows = [self.rows[k] for k in sorted(self.rows)]
        prev = 0.0
        for row in rows:
            if "packed_ms" in row and "done_ms" in row:
                row["idle_ms"] = max(0.0, row["packed_ms"] - prev)
                row["net_ms"] = row["done_ms"] - max(row["packed_ms"], prev)
                moved = max(row.get("send_bytes", 0), row.get("recv_bytes", 0))
                row["net_GBps"] = moved / row["net_ms"] / 1e6 if row["net_ms"] > 0 else None
                prev = row["done_ms"]
            for a, b, key in (("pack_start", "packed", "pack_ms"), ("done", "unpacked", "unpack_ms"),
                              ("local_start", "local_end", "local_ms")):
                if a + "_ms" in row and b + "_ms" in row:
                    row[key] = row[b + "_ms"] - row[a + "_ms"]
        net = [r for r in rows if "net_ms" in r]
        moved = sum(max(r.get("send_bytes", 0), r.get("recv_bytes", 0)) for r in net)
        wire = sum(r["net_ms"] for r in net)
        out["timeline"] = {
            "source": "cuda events" if self.streams is not None else "host clock",
            "end_ms": ends.get("end"), "local_end_ms": ends.get("local_end"),
            "rounds": len(net), "first_packed_ms": net[0]["packed_ms"] if net else None,
            "last_done_ms": prev if net else None, "net_ms": wire, "idle_ms": sum(r["idle_ms"] for r in net),
            "net_GBps": moved / wire / 1e6 if wire > 0 else None,
            "pack_ms": sum(r.get("pack_ms", 0.0) for r in rows),
            "unpack_ms": sum(r.get("unpack_ms", 0.0) for r in rows),
            "local_ms": sum(r.get("local_ms", 0.0) for r in rows)}
        out["rounds"] = rows
        return out
