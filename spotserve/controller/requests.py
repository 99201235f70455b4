"""RequestManager: the request table, FIFO queue, batching and committed tokens; never drops a request.

Every arrived request ends in exactly one fate: `completed`, `rejected` (with a reason) or
`unfinished` (still queued or running when the run stopped). Interrupted requests go back to the
front of the queue, keeping their committed tokens when their context survives (or is recomputed
from them) and losing them when the approach restarts requests from scratch.
"""
from __future__ import annotations

from collections import deque

QUEUED, RUNNING, COMPLETED, REJECTED, UNFINISHED = "queued", "running", "completed", "rejected", "unfinished"
FATES = (COMPLETED, REJECTED, UNFINISHED)


class Request:
    """Per-request state. `committed` counts output tokens durable at the controller."""

    __slots__ = ("id", "arrival", "input_len", "output_len", "state", "committed", "first_token_t",
                 "finish_t", "reason", "replica", "kv_ready", "interruptions", "recomputed_tokens",
                 "start_t")

    def __init__(self, rid: int, arrival: float, input_len: int, output_len: int):
        self.id = rid
        self.arrival = arrival
        self.input_len = input_len
        self.output_len = output_len
        self.state = QUEUED
        self.committed = 0
        self.first_token_t: float | None = None
        self.finish_t: float | None = None
        self.reason = ""
        self.replica: int | None = None
        self.kv_ready = False  # its KV cache (prompt + committed) survives, so no prefill is needed
        self.interruptions = 0
        self.recomputed_tokens = 0  # generated tokens that were lost and produced again
        self.start_t: float | None = None

    @property
    def remaining(self) -> int:
        return self.output_len - self.committed

    @property
    def latency(self) -> float | None:
        return None if self.finish_t is None else self.finish_t - self.arrival

    def record(self) -> dict:
        """One row of the per-request output."""
        return {"id": self.id, "fate": self.state, "arrival_s": round(self.arrival, 6),
                "finish_s": None if self.finish_t is None else round(self.finish_t, 6),
                "latency_s": None if self.latency is None else round(self.latency, 6),
                "first_token_s": None if self.first_token_t is None else round(self.first_token_t, 6),
                "input_len": self.input_len, "output_len": self.output_len, "committed": self.committed,
                "interruptions": self.interruptions, "recomputed_tokens": self.recomputed_tokens,
                "reason": self.reason}


class RequestManager:
    """Owns every request from arrival to its fate. In: arrivals, batch results; out: batches."""

    def __init__(self, max_seq_len: int | None = None):
        if max_seq_len is not None and max_seq_len <= 0:
            raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
        self.max_seq_len = max_seq_len
        self.requests: dict[int, Request] = {}
        self.queue: deque[int] = deque()
        self.n_running = 0
        self.n_completed = 0
        self.tokens_out = 0  # output tokens delivered by completed requests

    # --- intake -------------------------------------------------------------------------------
    def arrive(self, rid: int, now: float, input_len: int, output_len: int) -> Request:
        """Register a request; reject it (never silently drop) when it cannot be served at all."""
        if rid in self.requests:
            raise ValueError(f"request id {rid} arrived twice")
        req = Request(rid, now, input_len, output_len)
        self.requests[rid] = req
        if self.max_seq_len is not None and input_len + output_len > self.max_seq_len:
            self.reject(rid, f"input {input_len} + output {output_len} tokens exceed the model's {self.max_seq_len}")
        else:
            self.queue.append(rid)
        return req

    def restore(self, rid: int, now: float, input_len: int, output_len: int, committed: int) -> Request:
        """Re-register a request that had `committed` output tokens durable before a controller restart;
        it queues like an arrival at `now` and resumes from its committed tokens (its KV cache is gone).
        ValueError unless 0 <= committed < output_len (a fully committed request is already done)."""
        if not 0 <= committed < output_len:
            raise ValueError(f"request {rid}: restoring {committed} committed of {output_len} output tokens")
        req = self.arrive(rid, now, input_len, output_len)
        if req.state == QUEUED:
            req.committed = committed
            if committed:
                req.first_token_t = now  # its first token came before the restart; no earlier time is known
        return req

    def reject(self, rid: int, reason: str) -> None:
        """Give a request the fate `rejected`, with a reason."""
        req = self.requests[rid]
        if req.state in FATES:
            raise ValueError(f"request {rid} already has fate {req.state}")
        if req.state == QUEUED and rid in self.queue:
            self.queue.remove(rid)
        elif req.state == RUNNING:
            self.n_running -= 1
        req.state, req.reason = REJECTED, reason

    # --- batching -----------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self.queue)

    def take_batch(self, max_batch: int, replica: int, now: float, accept=None) -> list[Request]:
        """Pop up to `max_batch` requests in FIFO order (interrupted ones first) and mark them running.

        `accept(req) -> bool`, if given, skips the requests this replica must not take (a resumable
        KV cache that lives on another replica); they keep their place in the queue.
        """
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        out, skipped = [], []
        q = self.queue
        while q and len(out) < max_batch:
            req = self.requests[q.popleft()]
            if accept is not None and not accept(req):
                skipped.append(req.id)
                continue
            req.state, req.replica = RUNNING, replica
            if req.start_t is None:
                req.start_t = now
            out.append(req)
        q.extendleft(reversed(skipped))
        self.n_running += len(out)
        return out

    # --- progress -----------------------------------------------------------------------------
    def commit(self, req: Request, tokens: int, now: float) -> None:
        """Make `tokens` more output tokens of a running request durable."""
        if req.state != RUNNING:
            raise ValueError(f"request {req.id} is {req.state}, cannot commit tokens")
        if tokens < 0 or req.committed + tokens > req.output_len:
            raise ValueError(f"request {req.id}: committing {tokens} tokens to {req.committed}/{req.output_len}")
        if tokens and req.first_token_t is None:
            req.first_token_t = now
        req.committed += tokens

    def complete(self, req: Request, now: float) -> None:
        """Finish a request whose every output token is committed."""
        if req.state != RUNNING or req.committed != req.output_len:
            raise ValueError(f"request {req.id} cannot complete: {req.state}, {req.committed}/{req.output_len}")
        req.state, req.finish_t, req.replica = COMPLETED, now, None
        self.n_running -= 1
        self.n_completed += 1
        self.tokens_out += req.output_len

    def interrupt(self, req: Request, keep: str) -> None:
        """Put a running request back at the front of the queue.

        keep: "kv" (its KV cache moved with it: resume without prefill), "tokens" (KV lost:
        re-prefill prompt + committed tokens) or "none" (restart from scratch: the committed
        tokens are generated again and counted in `recomputed_tokens`).
        """
        if req.state != RUNNING:
            raise ValueError(f"request {req.id} is {req.state}, cannot be interrupted")
        if keep not in ("kv", "tokens", "none"):
            raise ValueError(f"keep must be kv, tokens or none, got {keep!r}")
        req.interruptions += 1
        req.kv_ready = keep == "kv" and req.committed > 0
        if keep == "none":
            req.recomputed_tokens += req.committed
            req.committed = 0
        req.state, req.replica = QUEUED, None
        self.n_running -= 1
        self.queue.appendleft(req.id)

    def requeue_front(self, reqs: list[Request]) -> None:
        """Return untouched requests (taken but never started) to the front, in their order."""
        for req in reversed(reqs):
            req.state, req.replica = QUEUED, None
            self.n_running -= 1
            self.queue.appendleft(req.id)

    # --- end of run ---------------------------------------------------------------------------
    def finalize(self) -> None:
        """Give every request still queued or running the fate `unfinished`."""
        for req in self.requests.values():
            if req.state in (QUEUED, RUNNING):
                req.state, req.reason = UNFINISHED, "run ended"
        self.queue.clear()
        self.n_running = 0

    def counts(self) -> dict[str, int]:
        """arrived, completed, rejected, unfinished (after finalize: arrived = the other three)."""
        c = {"arrived": len(self.requests), COMPLETED: 0, REJECTED: 0, UNFINISHED: 0, QUEUED: 0, RUNNING: 0}
        for req in self.requests.values():
            c[req.state] += 1
        return c
