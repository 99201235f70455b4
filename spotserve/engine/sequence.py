"""Request state inside the engine: prompt, generated tokens, sampling parameters, committed count."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request.

    temperature 0 means greedy; otherwise tokens are drawn from softmax(logits / temperature)
    restricted to the top-p nucleus, with randomness derived from (seed, token index) only, so a
    request samples the same tokens whatever batch it runs in and wherever it is resumed.
    The request finishes after max_new_tokens tokens or right after emitting a stop token.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"SamplingParams.seed must be an int in [0, 2^63), got {self.seed!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # needs a prefill (new, preempted or resumed without KV)
    RUNNING = "running"  # has KV for all but its last token
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler looks requests up in lists every step
class Sequence:
    """One request. tokens = prompt + output; KV exists for the first num_cached tokens.

    num_committed counts output tokens the controller has made durable; a resume on another
    config restarts from prompt + output[:num_committed].
    """

    req_id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output: list[int] = field(default_factory=list)
    num_committed: int = 0
    num_cached: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None

    def __post_init__(self):
        if not self.req_id or not isinstance(self.req_id, str):
            raise ValueError(f"request id must be a non-empty str, got {self.req_id!r}")
        if not self.prompt:
            raise ValueError(f"request {self.req_id}: empty prompt")
        self.prompt = [int(t) for t in self.prompt]
        self.output = [int(t) for t in self.output]
        if not 0 <= self.num_committed <= len(self.output):
            raise ValueError(f"request {self.req_id}: {self.num_committed} committed of {len(self.output)} outputs")
        if len(self.output) >= self.params.max_new_tokens or (
                self.output and self.output[-1] in self.params.stop_token_ids):
            self._finish()

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> list[int]:
        """Tokens the next step feeds: those without KV (the whole prefix after a preemption)."""
        skip = self.num_cached - len(self.prompt)
        if skip >= 0:  # decode: only output tokens are pending (no copy of the whole prefix)
            return self.output[skip:]
        return self.tokens[self.num_cached:]

    @property
    def finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def append(self, token: int) -> None:
        """Record a generated token; marks the request finished at max tokens or a stop token."""
        if self.finished:
            raise ValueError(f"request {self.req_id} already finished ({self.finish_reason})")
        self.num_cached = self.num_tokens  # the step computed KV for every fed token
        self.output.append(int(token))
        if len(self.output) >= self.params.max_new_tokens or token in self.params.stop_token_ids:
            self._finish()

    def commit(self, n: int) -> None:
        """Mark the first n output tokens durable (monotone)."""
        if not self.num_committed <= n <= len(self.output):
            raise ValueError(f"request {self.req_id}: cannot commit {n} (committed {self.num_committed}, "
                             f"generated {len(self.output)})")
        self.num_committed = n

    def _finish(self) -> None:
        self.status = SeqStatus.FINISHED
        stop = self.output and self.output[-1] in self.params.stop_token_ids
        self.finish_reason = "stop" if stop else "length"
