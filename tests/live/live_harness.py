"""Test harness: a LiveService (+ HTTP API) running in its own event-loop thread, and greedy references."""
from __future__ import annotations

import asyncio
import random
import threading

from spotserve.live.service import LiveConfig, LiveService


def reference(model_dir: str, reqs: list[tuple[list[int], int]]) -> list[list[int]]:
    """Greedy outputs of an uninterrupted single-process engine for (prompt, max_tokens) pairs."""
    from spotserve.engine.config import EngineConfig
    from spotserve.engine.engine import Engine
    from spotserve.engine.sequence import SamplingParams

    eng = Engine(EngineConfig(model_dir, max_batch=64, num_blocks=2048))
    for i, (p, n) in enumerate(reqs):
        eng.add_request(str(i), p, SamplingParams(max_new_tokens=n))
    out = eng.run()
    return [out[str(i)] for i in range(len(reqs))]


def random_requests(n: int, seed: int, vocab: int = 160, out: tuple[int, int] = (20, 40)):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(3, 16))], rng.randint(*out)) for _ in range(n)]


class ServiceThread:
    """Runs a LiveService and its HTTP API on a private loop; `call` runs a function on that loop."""

    def __init__(self, config: LiveConfig, instances: list[str], http: bool = True, api_key: str | None = None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.svc: LiveService = self.run(self._make(config))
        self.run(self.svc.start(instances))
        self.port = None
        if http:
            from spotserve.api.app import create_app
            from spotserve.live.__main__ import serve_http

            self.server, self.port = self.run(serve_http(create_app(self.svc, api_key=api_key), "127.0.0.1", 0))

    @staticmethod
    async def _make(config):
        return LiveService(config)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        async def go():
            return fn(*args)
        return self.run(go())

    def wait_all(self, lrs, timeout: float = 120) -> list[list[int]]:
        async def go():
            return await asyncio.wait_for(asyncio.gather(*(lr.wait() for lr in lrs)), timeout)
        return self.run(go(), timeout + 5)

    def wait_for(self, pred, timeout: float = 60, poll: float = 0.05):
        """Poll `pred()` on the loop until true; TimeoutError otherwise."""
        async def go():
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while not pred():
                if loop.time() > end:
                    raise TimeoutError("condition not reached")
                await asyncio.sleep(poll)
        return self.run(go(), timeout + 5)

    def close(self) -> None:
        try:
            if self.port is not None:
                self.server.should_exit = True
            self.run(self.svc.close(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
