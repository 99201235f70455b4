"""A live request's payload and its committed token stream (what clients read, in order, exactly once).

The controller's RequestManager keeps the policy view of a request (lengths, committed count,
state); this keeps what only the live cluster needs: prompt ids, sampling parameters, the
committed output tokens themselves, where its KV pieces wait between a stop and a resume (the
workers of one replica hold them; only the token count is known here), and waiters. A token is streamed only once it is committed to the StateStore; a token
produced again after a restart from scratch (a baseline) is checked against the committed one and
counted as recomputed, never streamed twice.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class LiveRequest:
    """Payload + committed tokens of one request (`rid` is the controller's int id)."""

    rid: int
    prompt: list[int]
    params: dict  # SamplingParams fields: max_new_tokens, temperature, top_p, seed
    arrived_wall: float = field(default_factory=time.time)
    tokens: list[int] = field(default_factory=list)
    token_wall: list[float] = field(default_factory=list)  # wall time each token was committed
    done: bool = False
    kv_home: object = None  # the backend's replica whose workers hold this request's KV pieces, or None
    kv_tokens: int = 0  # cached positions of those pieces
    kv_at: int = 0  # committed tokens when the KV was parked
    recomputed: int = 0  # tokens generated again after a restart from scratch
    reprefilled: int = 0  # prompt + committed tokens prefilled again after losing the KV
    kv_moved_bytes: int = 0  # KV bytes its new workers received from other workers (migration executor)
    resumes: list[dict] = field(default_factory=list)  # {"how": kv|prefill|restart, "at": committed count}
    mismatches: int = 0  # regenerated tokens that differ from the committed ones (non-determinism)

    def __post_init__(self):
        self._event = asyncio.Event()

    @property
    def sid(self) -> str:
        return str(self.rid)

    @property
    def max_tokens(self) -> int:
        return int(self.params["max_new_tokens"])

    def accept(self, index: int, token: int) -> bool:
        """Record output token `index`; True when it is new (to commit and stream), False when it
        repeats a committed one (recomputed)."""
        if index < len(self.tokens):
            self.recomputed += 1
            if self.tokens[index] != token:
                self.mismatches += 1
            return False
        if index != len(self.tokens):
            raise ValueError(f"request {self.rid}: token {index} after {len(self.tokens)} committed")
        self.tokens.append(int(token))
        self.token_wall.append(time.time())
        if len(self.tokens) >= self.max_tokens:
            self.done = True
        self._notify()
        return True

    def finish(self) -> None:
        self.done = True
        self._notify()

    def _notify(self) -> None:
        ev, self._event = self._event, asyncio.Event()
        ev.set()

    async def stream(self):
        """Yield every committed token in order, waiting for new ones until the request is done."""
        i = 0
        while True:
            ev = self._event
            while i < len(self.tokens):
                yield self.tokens[i]
                i += 1
            if self.done:
                return
            await ev.wait()

    async def wait(self, timeout: float | None = None) -> list[int]:
        """The full output once done."""
        async for _ in self.stream():
            pass
        return list(self.tokens)

    def max_gap(self) -> float:
        """Longest wall-clock gap between consecutive committed tokens (s)."""
        t = self.token_wall
        return max((b - a for a, b in zip(t, t[1:])), default=0.0)
