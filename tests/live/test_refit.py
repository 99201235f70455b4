"""The in-run refit of a live-path profile (spotserve/live/refit.py): from a run's batch_done events
back to the speed factors, cold factors and spread that produced them."""
import json
import random
from pathlib import Path

import pytest

from spotserve.live.refit import batch_ratios, refit_profile
from spotserve.planner.cost import CostModel

PROFILE = Path(__file__).parents[2] / "spotserve" / "data" / "profiles" / "h100" / "opt-6.7b.json"


def _cost(profile: dict, tmp_path: Path, name: str) -> CostModel:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(profile))
    return CostModel.from_profile(path, spec="opt-6.7b")


def _events(cost: CostModel, n: int, seed: int, speed=(1.5, 1.2), cold=(1.4, 1.1)) -> list[dict]:
    """batch_done events of a machine `speed` times slower than `cost` (cold batches `cold` slower
    again), each batch with +-5% noise; one in four batches idle long enough to be cold."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pp, tp, size = rng.choice([(1, 1, 1), (1, 1, 4), (2, 1, 2), (1, 1, 8)])
        is_cold = i % 4 == 0
        fp = speed[0] * (cold[0] if is_cold else 1.0) * rng.uniform(0.95, 1.05)
        fd = speed[1] * (cold[1] if is_cold else 1.0) * rng.uniform(0.95, 1.05)
        steps = rng.randint(5, 30)
        out.append({"event": "batch_done", "pp": pp, "tp": tp, "m": 1, "size": size, "fresh": True, "prompt": 512,
                    "idle_s": 1.0 if is_cold else 0.01,
                    "prefill_s": fp * float(cost.prefill_seconds(pp, tp, size, 1, 512)), "decode_steps": steps,
                    "decode_s": steps * fd * float(cost.decode_round_seconds(pp, tp, size, 1))})
    return out


def test_refit_recovers_the_runs_speed_cold_factors_and_spread(tmp_path):
    profile = json.loads(PROFILE.read_text())
    cost = _cost(profile, tmp_path, "base")
    events = _events(cost, 200, seed=0)
    configured = [{"event": "configured", "seconds": x} for x in (2.5, 0.2, 0.3)]  # the first loads weights
    refit = refit_profile(profile, configured[:1] + events + configured[1:], cost)
    assert refit["configure_s"] == [0.2, 0.3]
    assert refit["refit"]["scale"]["prefill"] == pytest.approx(1.5, rel=0.03)
    assert refit["refit"]["scale"]["decode"] == pytest.approx(1.2, rel=0.03)
    assert refit["step_jitter"]["cold"]["prefill"] == pytest.approx(1.4, rel=0.04)
    assert refit["step_jitter"]["cold"]["decode"] == pytest.approx(1.1, rel=0.04)
    samples = refit["step_jitter"]["samples"]
    assert len(samples) == 200 and all(0.9 < a < 1.1 and 0.9 < b < 1.1 for a, b in samples)
    # the re-fitted cost model predicts the slower machine, pipeline hops included
    new = _cost(refit, tmp_path, "refit")
    for pp, tp, b in [(1, 1, 1), (2, 1, 4), (1, 1, 8)]:
        assert float(new.prefill_seconds(pp, tp, b, 1, 512)) == pytest.approx(
            1.5 * float(cost.prefill_seconds(pp, tp, b, 1, 512)), rel=0.03)
        assert float(new.decode_round_seconds(pp, tp, b, 1)) == pytest.approx(
            1.2 * float(cost.decode_round_seconds(pp, tp, b, 1)), rel=0.03)
    assert profile == json.loads(PROFILE.read_text())  # the input is not modified


def test_refit_keeps_calibrated_cold_factors_when_every_batch_was_cold(tmp_path):
    profile = json.loads(PROFILE.read_text())
    profile["step_jitter"] = {"samples": [[1.0, 1.0]], "idle_s": 0.5, "cold": {"prefill": 2.0, "decode": 1.25}}
    cost = _cost(profile, tmp_path, "base")
    events = [e for e in _events(cost, 80, seed=1, cold=(2.0, 1.25)) if e["idle_s"] == 1.0]  # cold only
    refit = refit_profile(profile, events, cost)
    # tables are warm times: the cold medians are divided by the calibration's cold factors
    assert refit["refit"]["scale"]["prefill"] == pytest.approx(1.5, rel=0.04)
    assert refit["refit"]["scale"]["decode"] == pytest.approx(1.2, rel=0.04)
    assert refit["step_jitter"]["cold"] == {"prefill": 2.0, "decode": 1.25}
    assert refit["step_jitter"]["idle_s"] == 0.5 and refit["refit"]["warm"] == 0


def test_resumed_batches_time_decode_only_and_no_timed_batch_is_an_error(tmp_path):
    profile = json.loads(PROFILE.read_text())
    cost = _cost(profile, tmp_path, "base")
    ev = _events(cost, 4, seed=2)
    ev[1] = {**ev[1], "fresh": False, "prefill_s": 1e-9}
    rows = batch_ratios(ev, cost)
    assert rows[1]["prefill"] is None and rows[1]["decode"] is not None and rows[0]["prefill"] is not None
    with pytest.raises(ValueError, match="no fresh batch"):
        refit_profile(profile, [{"event": "batch_done", **{**e, "fresh": False}} for e in ev], cost)
    with pytest.raises(ValueError, match="no fresh batch"):
        refit_profile(profile, [], cost)
