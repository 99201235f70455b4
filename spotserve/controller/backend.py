"""The narrow interface between the controller (policy) and a backend (simulator or live cluster).

The controller sends commands; the backend executes them and reports back by calling the
controller's `on_*` handlers (BackendEvents) at the time things happen. A backend never decides
policy: which requests run where, when to stop and what to migrate all come from the controller.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from spotserve.planner.types import ParallelConfig, ReconfigurationPlan


@dataclass
class Progress:
    """What a batch did for one request: tokens made durable, when its first token came, when it finished."""

    request_id: int
    new_tokens: int
    first_token_t: float | None
    finish_t: float | None  # set when its last output token was produced


class Backend(ABC):
    """Commands a backend accepts. Times are seconds on the backend's clock."""

    #: Whether execute_plan honours `keep`: replicas a plan leaves unchanged (same shape, same GPU per
    #: position, nothing received) go on running their batch through the reconfiguration. A backend
    #: that rebuilds every replica at a plan leaves it False, and the controller then stops every
    #: batch before migrating (the behaviour before this switch existed).
    keeps_unchanged_replicas: bool = False

    @abstractmethod
    def now(self) -> float:
        """Current time."""

    @abstractmethod
    def call_at(self, t: float, fn: Callable[[], None]) -> None:
        """Run `fn` at time `t` (a timer; the simulator puts it on its event queue)."""

    @abstractmethod
    def start_batch(self, replica: int, shape: ParallelConfig, batch_id: int, requests: list) -> None:
        """Run `requests` (controller Request objects) as one batch on replica `replica`.

        Requests with `kv_ready` resume decoding from their cache; the others are prefilled
        (prompt + committed tokens). Reports `on_batch_done(replica, batch_id, progress)`.
        """

    @abstractmethod
    def stop_batch(self, replica: int, batch_id: int, at: float) -> None:
        """Stop the batch at the last decode-step boundary not after `at` (or at once if `at` is past).

        Reports `on_batch_done(replica, batch_id, progress, stopped=True)` at that boundary.
        """

    @abstractmethod
    def abort_batch(self, replica: int, batch_id: int) -> list[Progress]:
        """The replica lost a GPU: end the batch now, with no report; returns the tokens already streamed."""

    @abstractmethod
    def execute_plan(self, plan: ReconfigurationPlan, plan_id: int, stall_s: float,
                     keep: dict[int, int] | None = None) -> None:
        """Move context as `plan` says (weights and KV over the network, or from disk).

        `stall_s` is the controller's estimate of how long the affected replicas pause; the
        simulator takes it as the duration, a live cluster as a timeout hint. Reports
        `on_plan_done(plan_id)`. `keep` (passed only when `keeps_unchanged_replicas`): new replica
        index -> old index of the unchanged replicas; each keeps its engine and its running batch,
        which from now on is addressed (stop, abort, on_batch_done) by the new index. Every other
        replica has no batch running when the plan is executed.
        """

    def live_tokens(self, replica: int, batch_id: int) -> dict[int, int]:
        """Output tokens each request of the running batch `batch_id` has produced so far (durable:
        they survive the batch), by request id, for the plan made while it runs. A backend that reports
        a batch's tokens only when it ends and has no cheaper view returns {} (the default): the
        controller then counts the tokens committed at batch start. The simulator leaves it so."""
        return {}

    def kv_tokens(self, request_id: int) -> int | None:
        """KV positions the backend's cache holds now for a stopped request whose cache survives (what
        a migration moves), or None when it does not know (the default): the plan's sizes then stand."""
        return None

    @abstractmethod
    def load_replica(self, replica: int, shape: ParallelConfig, gpus: list[str], load_id: int,
                     seconds: float) -> None:
        """Start a replica's engine on `gpus`, weights from disk (baselines). Reports `on_plan_done(load_id)`."""


class BackendEvents(ABC):
    """What a backend reports to the controller."""

    @abstractmethod
    def on_batch_done(self, replica: int, batch_id: int, progress: list[Progress], stopped: bool = False) -> None:
        """A batch finished (or stopped at a step boundary)."""

    @abstractmethod
    def on_plan_done(self, plan_id: int) -> None:
        """A migration plan (or a replica's load from disk) finished."""
