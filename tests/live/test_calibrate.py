"""The live-path calibration: runs inside a running event loop, and is cached per model in the run dir."""
from __future__ import annotations

import asyncio
import json
import statistics

import pytest

from spotserve.live import calibrate
from spotserve.planner.cost import CostModel
from spotserve.sim.jitter import StepJitter


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
    # the measured spread the simulator replays: one (prefill, decode) ratio pair per timed run
    # (3 layouts x 4 batch sizes x 4 rounds x cold + warm), each cell's median ratio 1
    jit = StepJitter.from_profile(path)
    assert len(jit.samples) == 3 * 4 * 4 * 2 and jit.idle_s == calibrate.IDLE_S
    assert jit.cold_prefill > 0 and jit.cold_decode > 0
    assert statistics.median(d for _, d in jit.samples) == pytest.approx(1.0, abs=0.15)


def test_jitter_record_takes_ratios_to_each_cells_median():
    runs = {(1, 1, 1): {"cold": [(3.0, 1.0), (6.0, 2.0), (9.0, 3.0)], "warm": [(1.0, 1.0), (2.0, 1.0), (4.0, 1.0)]},
            (1, 1, 2): {"cold": [(2.0, 4.0)], "warm": [(2.0, 2.0)]}}
    rec = calibrate.jitter_record(runs, 0.2)
    assert rec["samples"] == [[0.5, 0.5], [1.0, 1.0], [1.5, 1.5], [0.5, 1.0], [1.0, 1.0], [2.0, 1.0],
                              [1.0, 1.0], [1.0, 1.0]]
    # cold / warm medians per cell: (6/2, 2/1) and (2/2, 4/2); the median over cells
    assert rec["cold"] == {"prefill": 2.0, "decode": 2.0} and rec["idle_s"] == 0.2
    assert StepJitter.from_dict(rec).samples[0] == (0.5, 0.5)


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
