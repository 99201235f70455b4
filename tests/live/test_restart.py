"""The controller is SIGKILLed mid-run and restarted with the same state path: every unfinished
request finishes, token-identical to an uninterrupted run (it resumes from the committed tokens)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from live_harness import random_requests, reference


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "spotserve.live", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:
        if line.startswith("{") and '"listening"' in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, json.loads(line)["http"]
    raise AssertionError(f"controller exited with {proc.wait()} before listening")


def _poll(url: str, rid: int, pred, timeout: float = 90.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = httpx.get(f"{url}/v1/requests/{rid}", timeout=5)
        if r.status_code == 200 and pred(r.json()):
            return r.json()
        time.sleep(0.05)
    raise AssertionError(f"request {rid} did not reach the state in {timeout}s")


@pytest.mark.timeout(200)
def test_controller_sigkill_and_restart_finishes_every_request(live_ckpt, live_profile, tmp_path):
    reqs = random_requests(5, seed=6, out=(60, 80))
    want = reference(live_ckpt, reqs)
    args = ["--model-dir", live_ckpt, "--profile", live_profile, "--run-dir", str(tmp_path / "run"),
            "--state", str(tmp_path / "state.sqlite"), "--instances", "i0", "--port", "0", "--rate", "200",
            "--step-pause-s", "0.02"]
    proc, url = _start(args)
    try:
        for rid, (p, n) in enumerate(reqs):  # admitted durably before the connection is even answered
            threading.Thread(target=lambda p=p, n=n: _post(url, p, n), daemon=True).start()
            _poll(url, rid, lambda r: True)  # ids follow submission order
        _poll(url, len(reqs) - 1, lambda r: len(r["tokens"]) >= 3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    before = [len(_sqlite_tokens(tmp_path / "state.sqlite", i)) for i in range(len(reqs))]
    assert any(0 < b < n for b, (_, n) in zip(before, reqs)), before  # killed mid-generation
    proc, url = _start(args)
    try:
        got = [_poll(url, rid, lambda r: r["status"] == "completed")["tokens"] for rid in range(len(reqs))]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert got == want


def _post(url: str, prompt: list[int], n: int) -> None:
    try:
        httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0}, timeout=60)
    except httpx.HTTPError:
        pass  # the controller is killed under this client


def _sqlite_tokens(path, rid: int) -> list[int]:
    from spotserve.live.state import StateStore

    st = StateStore(path)
    try:
        return st.get(str(rid)).tokens
    finally:
        st.close()
