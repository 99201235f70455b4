"""The controller is SIGKILLed mid-run and restarted with the same state path: every unfinished
request finishes, token-identical to an uninterrupted run (it resumes from the committed tokens),
served by the same worker processes, which kept their weights through the outage."""
from __future__ import annotations

import os
import signal

import pytest

from live_harness import (metric, poll_request, random_requests, reference, start_cli, stored_tokens,
                          submit_in_order, worker_pids)


def _args(live_ckpt, live_profile, tmp_path, instances: str, gpi: int) -> list[str]:
    profile = ["--profile", live_profile] if live_profile else []  # none: measured through the live path
    return ["--model-dir", live_ckpt, *profile, "--run-dir", str(tmp_path / "run"),
            "--state", str(tmp_path / "state.sqlite"), "--instances", instances, "--gpus-per-instance", str(gpi),
            "--port", "0", "--rate", "200", "--step-pause-s", "0.02"]


def _kill_mid_generation(proc, url, reqs, tmp_path) -> list[int]:
    try:
        submit_in_order(url, reqs)  # admitted durably before the connection is even answered
        poll_request(url, len(reqs) - 1, lambda r: len(r["tokens"]) >= 3)
        assert metric(url, "spotserve_checkpoint_bytes_total") > 0  # the first workers read their slices
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    before = [len(stored_tokens(tmp_path / "state.sqlite", i)) for i in range(len(reqs))]
    assert any(0 < b < n for b, (_, n) in zip(before, reqs)), before  # killed mid-generation
    return before


@pytest.mark.timeout(200)
def test_controller_sigkill_and_restart_adopts_workers_and_finishes_every_request(live_ckpt, live_profile,
                                                                                  tmp_path):
    reqs = random_requests(6, seed=6, out=(60, 80))
    want = reference(live_ckpt, reqs)
    args = _args(live_ckpt, None, tmp_path, "i0,i1", 1)
    proc, first = start_cli(args)
    profile = tmp_path / "run" / "profile.json"  # the CLI's default: the live-path calibration, cached
    measured = profile.stat().st_mtime_ns
    url = first["http"]
    pids = first["worker_pids"]
    assert sorted(pids) == ["i0/g0", "i1/g0"] and first["adopted"] == []
    _kill_mid_generation(proc, url, reqs, tmp_path)
    assert worker_pids(str(tmp_path)) == set(pids.values())  # the workers outlived their controller
    proc, second = start_cli(args)
    url = second["http"]
    try:
        assert second["adopted"] == ["i0", "i1"] and second["worker_pids"] == pids
        got = [poll_request(url, rid, lambda r: r["status"] == "completed")["tokens"] for rid in range(len(reqs))]
        assert metric(url, "spotserve_checkpoint_bytes_total") == 0  # adopted workers kept their weights
        assert metric(url, "spotserve_tokens_total") > 0  # and served after the restart
        assert worker_pids(str(tmp_path)) == set(pids.values())  # no other worker was started
        assert profile.stat().st_mtime_ns == measured  # the restart planned with the cached profile
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert got == want
    assert worker_pids(str(tmp_path)) == set()  # a clean stop kills them


@pytest.mark.timeout(200)
def test_restart_after_the_workers_gave_up_spawns_new_ones(live_ckpt, live_profile, tmp_path):
    reqs = random_requests(3, seed=7, out=(50, 60))
    want = reference(live_ckpt, reqs)
    args = _args(live_ckpt, live_profile, tmp_path, "i0", 1) + ["--reconnect-s", "0"]
    proc, first = start_cli(args)
    _kill_mid_generation(proc, first["http"], reqs, tmp_path)
    proc, second = start_cli(args)
    try:
        assert second["adopted"] == [] and set(second["worker_pids"].values()).isdisjoint(first["worker_pids"].values())
        got = [poll_request(second["http"], rid, lambda r: r["status"] == "completed")["tokens"]
               for rid in range(len(reqs))]
        assert metric(second["http"], "spotserve_checkpoint_bytes_total") > 0  # new workers read their slices
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert got == want
