"""The live-path calibration: runs inside a running event loop, and is cached per model in the run dir."""
from __future__ import annotations

import asyncio
import json

import pytest

from spotserve.live import calibrate
from spotserve.planner.cost import CostModel


@pytest.mark.timeout(150)
def test_calibration_runs_in_a_running_loop_and_is_reused(live_ckpt, tmp_path):
    async def go():
        loop_alive = asyncio.get_running_loop()  # the CLI calls it from its own loop
        path = await calibrate.cached_profile(live_ckpt, tmp_path, gpus_per_instance=2, say=lambda m: None)
        assert asyncio.get_running_loop() is loop_alive
        stamp = (tmp_path / "profile.json").stat().st_mtime_ns
        again = await calibrate.cached_profile(live_ckpt, tmp_path, gpus_per_instance=2, say=lambda m: None)
        return path, stamp, again

    path, stamp, again = asyncio.run(go())
    assert again == path and (tmp_path / "profile.json").stat().st_mtime_ns == stamp  # reused, not measured
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["measured"] == calibrate.measured_key(live_ckpt, 2, 16)
    for tp in ("tp-1", "tp-2"):
        assert all(prof[tp][f"bsz-{b}"]["incr"] > 0 and prof[tp][f"bsz-{b}"]["init"] > 0 for b in (1, 2, 4, 8))
    # measured through worker processes: a tp=2 step pays the collectives between them
    assert prof["tp-2"]["bsz-1"]["incr"] > prof["tp-1"]["bsz-1"]["incr"]
    cost = CostModel.from_profile(path)
    assert cost.profile.gpus_per_instance == 2


def test_cached_profile_is_measured_again_for_another_key(live_ckpt, tmp_path, monkeypatch):
    calls = []

    async def fake(model_dir, prompt_len, gpus_per_instance=2):
        calls.append((prompt_len, gpus_per_instance))
        return {"measured": calibrate.measured_key(model_dir, gpus_per_instance, prompt_len), "layer_num": 2}

    monkeypatch.setattr(calibrate, "measure_live_async", fake)
    (tmp_path / "profile.json").write_text("not json")
    run = lambda **kw: asyncio.run(calibrate.cached_profile(live_ckpt, tmp_path, say=lambda m: None, **kw))  # noqa: E731
    run(gpus_per_instance=2)  # unreadable: measured
    run(gpus_per_instance=2)  # same key: reused
    run(gpus_per_instance=1)  # other slots per instance: measured
    run(gpus_per_instance=1, prompt_len=32)
    assert calls == [(16, 2), (16, 1), (32, 1)]
