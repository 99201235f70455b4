"""`python -m spotserve.profile` on the CPU (tiny model): the file it writes is a profile the planner's CostModel reads."""
from __future__ import annotations

import json
import subprocess

import pytest

from engine_helpers import PYTHON, ROOT
from spotserve.planner.cost import CostModel
from spotserve.planner.types import ParallelConfig


@pytest.mark.timeout(120)
def test_profile_cli_writes_a_profile_the_cost_model_reads(tmp_path):
    out = tmp_path / "opt-tiny.json"
    run = subprocess.run([PYTHON, "-m", "spotserve.profile", "--model", "opt-tiny", "--out", str(out), "--device",
                          "cpu", "--batches", "1,2,4", "--prefill-batches", "1,2", "--prompt-len", "12",
                          "--decode-steps", "3"], cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stderr
    data = json.loads(out.read_text())
    assert (data["layer_num"], data["hidden_size"], data["model"], data["init_tokens"]) == (5, 48, "opt-tiny", 12)
    assert sorted(data["tp-1"]) == ["bsz-1", "bsz-2", "bsz-4"] and len(data["embed"]) == 3
    assert "pp_init_comm" not in data and "pp_init_comm" in data["absent"]
    assert data["detail"]["tp-1"]["bsz-4"]["init_scaled_from"] == 2  # batch 4 was not prefilled
    # kv bytes per token and layer: K and V x 6 heads x 8 dims x 4 bytes (fp32)
    assert data["memory"]["kv_bytes_per_token_layer"] == 2 * 48 * 4
    cost = CostModel.from_profile(out)
    assert cost.spec.name == "opt-tiny" and cost.tps == [1] and cost.kv_bytes_per_token_layer == 384
    for b in (1, 2, 4):
        row = data["tp-1"][f"bsz-{b}"]
        assert cost.layer_seconds(1, b, "decode") == pytest.approx(row["incr"] / 1e3)
        assert cost.layer_seconds(1, b, "prefill", prompt_len=12) == pytest.approx(row["init"] / 1e3)
    assert cost.config_latency(ParallelConfig(dp=1, pp=1, tp=1, batch=2, micro_batches=1)) > 0


def test_profile_rejects_bad_batches(tmp_path):
    run = subprocess.run([PYTHON, "-m", "spotserve.profile", "--model", "opt-tiny", "--out", str(tmp_path / "x.json"),
                          "--device", "cpu", "--batches", "1,3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "powers of two" in run.stderr
    run = subprocess.run([PYTHON, "-m", "spotserve.profile", "--model", "nope", "--out", str(tmp_path / "x.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown model" in run.stderr
