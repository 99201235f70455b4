"""Liveness of the workers of a job: heartbeat counters and exit marks in the rendezvous store.

Each worker bumps its counter from a daemon thread; after a failed collective a worker reads the
counters twice, a window apart, and names the peers whose counter stood still and that left no
exit mark. Store calls on that path are bounded, because a call to a frozen store host blocks
without a deadline of its own.
"""
from __future__ import annotations

import json
import threading
import time

import torch.distributed as dist


def _bounded(fn, limit_s: float):
    """fn() run in a helper thread, given up after limit_s (TimeoutError): a store call to a frozen
    host blocks without a deadline of its own, and diagnosis must never hang."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="spotserve-store-call", daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        raise TimeoutError(f"rendezvous store did not answer within {limit_s:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class PeerWatch:
    """Heartbeats of every rank, kept as counters in the rendezvous store by a daemon thread.

    call_limit_s bounds every store call made while diagnosing, exiting or lingering.
    """

    def __init__(self, store, rank: int, world_size: int, interval_s: float = 0.25, call_limit_s: float = 10.0):
        self.store = dist.PrefixStore("spotserve-watch/", store)
        self.rank = rank
        self.world_size = world_size
        self.interval_s = interval_s
        self.call_limit_s = call_limit_s
        self.store_down = False  # set once a bounded store call failed: later calls are skipped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="spotserve-heartbeat", daemon=True)

    def start(self) -> PeerWatch:
        self.store.add(f"hb/{self.rank}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.add(f"hb/{self.rank}", 1)
            except Exception:  # store host gone: diagnosis reports it, the beat just ends
                return

    def mark_exit(self, kind: str, reason: str = "") -> None:
        """Tell peers this rank stops on purpose, so it is not reported as lost.

        kind: 'done' (clean end), 'error' (this rank failed on its own; peers report it with the
        reason) or 'peer' (it stops because of another rank's failure; peers ignore it).
        """
        mark = json.dumps({"kind": kind, "reason": reason[:500]})
        if self.store_down:
            self.stop()
            return
        try:
            _bounded(lambda: self.store.set(f"exit/{self.rank}", mark), self.call_limit_s)
        except Exception:
            pass
        self.stop()

    def exit_reason(self, rank: int) -> dict | None:
        """The exit mark of `rank` ({'kind', 'reason'}) or None when it has not exited on purpose."""
        if not self.store.check([f"exit/{rank}"]):
            return None
        try:
            return json.loads(self.store.get(f"exit/{rank}"))
        except ValueError:
            return {"kind": "error", "reason": "unreadable exit mark"}

    def wait_others(self, limit_s: float, window_s: float | None = None) -> None:
        """Block until every other rank has exited on purpose or stopped heartbeating (at most limit_s).

        Rank 0 hosts the store, so it must outlive the others' diagnosis and exit marks.
        """
        window_s = max(1.5, 8 * self.interval_s) if window_s is None else window_s
        peers = [r for r in range(self.world_size) if r != self.rank]
        now = time.monotonic()
        deadline = now + limit_s
        seen: dict[int, tuple[int, float]] = {r: (-1, now) for r in peers}

        def pending() -> list[int]:
            now = time.monotonic()
            out = []
            for r in peers:
                if self.store.check([f"exit/{r}"]):
                    continue
                count = self.store.add(f"hb/{r}", 0)
                if count != seen[r][0]:
                    seen[r] = (count, now)
                if now - seen[r][1] < window_s:
                    out.append(r)
            return out

        try:
            while time.monotonic() < deadline and _bounded(pending, self.call_limit_s):
                time.sleep(self.interval_s)
        except Exception:
            return

    def lost_peers(self, window_s: float | None = None) -> dict[int, str]:
        """{world rank: why} of the peers that are gone: no heartbeat over `window_s` and no exit mark
        (crashed, killed or frozen), or exited after failing on their own.

        Rank 0 hosts the store: when the store is unreachable, rank 0 is the lost peer.
        """
        window_s = max(1.5, 8 * self.interval_s) if window_s is None else window_s
        peers = [r for r in range(self.world_size) if r != self.rank]

        def counters() -> dict[int, int]:
            return {r: self.store.add(f"hb/{r}", 0) for r in peers}

        def judge(before: dict[int, int]) -> dict[int, str]:
            lost = {}
            for r in peers:
                mark = self.exit_reason(r)
                if mark is None and self.store.add(f"hb/{r}", 0) == before[r]:
                    lost[r] = f"no heartbeat for {window_s:g}s"
                elif mark is not None and mark.get("kind") == "error":
                    lost[r] = f"failed: {mark.get('reason', '')}"
            return lost

        try:
            before = _bounded(counters, self.call_limit_s)
            time.sleep(window_s)
            return _bounded(lambda: judge(before), self.call_limit_s)
        except Exception:
            self.store_down = True
            return {0: "rendezvous store unreachable"} if self.rank != 0 else {}
