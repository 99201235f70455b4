"""Test harness: a LiveService (+ HTTP API) running in its own event-loop thread, and greedy references."""
from __future__ import annotations

import asyncio
import random
import threading

from spotserve.live.service import LiveConfig, LiveService


def single_slot_profile(live_profile: str, path) -> str:
    """The measured profile with fixed, smooth step times (not this machine's noisy ones) and tensor and
    pipeline parallelism made costly, written to `path`: the optimizer then picks one single-slot
    replica per instance, the same shape for any number of them, however loaded the machine is."""
    import json

    prof = json.loads(open(live_profile).read())
    sizes = [int(k.split("-")[1]) for k in prof["tp-1"]]
    prof["tp-1"] = {f"bsz-{b}": {"init": 0.2 * (1 + b / 4), "incr": 0.1 * (1 + b / 8)} for b in sizes}
    prof["tp-2"] = {k: {n: 3 * v for n, v in t.items()} for k, t in prof["tp-1"].items()}
    prof["pp_init_comm"] = prof["pp_incr_comm"] = 50.0
    path.write_text(json.dumps(prof))
    return str(path)


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

    def wait_for(self, pred, timeout: float = 60, poll: float = 0.05, explain=None):
        """Poll `pred()` on the loop until true; TimeoutError otherwise, with `explain()` (called on the
        loop) in its message: what the test saw, so a failure in CI says why."""
        async def go():
            loop = asyncio.get_running_loop()
            end = loop.time() + timeout
            while not pred():
                if loop.time() > end:
                    raise TimeoutError("condition not reached" + (f": {explain()}" if explain else ""))
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


# --- the controller as a subprocess (`python -m spotserve.live`), for restart tests ---------------
def start_listening(cmd: list[str], what: str = "controller"):
    """Start `cmd` (a controller, alone or under mpirun); returns (process, its "listening" JSON line as
    a dict). The pipe is drained afterwards, so the process never blocks on its output."""
    import json
    import os
    import subprocess

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("{") and '"listening"' in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, json.loads(line)
    raise AssertionError(f"{what} exited with {proc.wait()} before listening:\n{''.join(seen)[-3000:]}")


def start_cli(args: list[str]):
    """Start `python -m spotserve.live ARGS`; returns (process, its "listening" JSON line as a dict)."""
    import sys

    return start_listening([sys.executable, "-m", "spotserve.live", *args])


def poll_request(url: str, rid: int, pred, timeout: float = 90.0) -> dict:
    """GET /v1/requests/RID until `pred(body)`; AssertionError after `timeout`."""
    import time

    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = httpx.get(f"{url}/v1/requests/{rid}", timeout=5)
        if r.status_code == 200 and pred(r.json()):
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"request {rid} did not reach the state in {timeout}s")


def post_completion(url: str, prompt: list[int], n: int) -> None:
    """POST a greedy completion, ignoring the answer (the controller may be killed under it)."""
    import httpx

    try:
        httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=60)
    except httpx.HTTPError:
        pass


def submit_in_order(url: str, reqs) -> None:
    """Submit (prompt, n) pairs from client threads, each admitted before the next (ids follow order)."""
    for rid, (p, n) in enumerate(reqs):
        threading.Thread(target=post_completion, args=(url, p, n), daemon=True).start()
        poll_request(url, rid, lambda r: True)


def stored_tokens(path, rid: int) -> list[int]:
    """Committed tokens of request `rid` in a state store file."""
    from spotserve.live.state import StateStore

    st = StateStore(path)
    try:
        return st.get(str(rid)).tokens
    finally:
        st.close()


def metric(url: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample `name` at URL/metrics."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no sample {name} at {url}/metrics")


def worker_pids(marker: str) -> set[int]:
    """Pids of live worker processes whose command line mentions `marker` (e.g. a test's tmp folder:
    a forked worker's command line is its fork server's, which names the launcher's log folder)."""
    from pathlib import Path

    from spotserve.live.forkserver import WORKER_COMM

    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                comm = (p / "comm").read_text().strip()
                state = (p / "stat").read_bytes().rsplit(b")", 1)[1].split()[0]
            except OSError:
                continue
            if comm == WORKER_COMM and marker in cmd and state != b"Z":
                out.add(int(p.name))
    return out
