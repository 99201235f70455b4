"""scripts/bench_live_gpu.py rehearsed on CPU (opt-tiny, fp32, gloo): the JSON's structure and invariants.

One run (about 45 s on 2 cores): p2p bandwidth, the spotserve service through the forced changes
(1,1,2) -> (2,1,1) -> (1,2,1) -> (1,1,2), the reparallelization baseline through the same changes, and a
fresh spotserve service during which one worker is SIGKILLed. Every request completes with the tokens of
the uninterrupted reference wave; weight bytes moved equal the plan's; KV moves with the requests under
spotserve and is recomputed under the baseline.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAIN = [("1,1,2", "2,1,1", "D2P1M1B8m1"), ("2,1,1", "1,2,1", "D1P2M1B8m1"), ("1,2,1", "1,1,2", "D1P1M2B8m1")]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-live-gpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_live_gpu.py"), "--device", "cpu",
                        "--output-len", "24", "--trigger", "6", "--work-dir", str(out / "work"),
                        "--json", str(out / "r.json"), "--deadline-s", "200"],
                       capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert (out / "r.json").is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "r.json").read_text())
    res["_stdout"], res["_rc"] = p.stdout, p.returncode
    return res


@pytest.mark.timeout(300)
def test_run_is_complete(result):
    assert result["_rc"] == 0 and result["errors"] == {} and result["skipped"] == [], result["_stdout"][-3000:]
    assert result["p2p"] and all(v > 0 for v in result["p2p"].values())
    assert set(result["approaches"]) == {"spotserve", "reparallelization"}
    assert result["approaches"]["spotserve"]["reference"]["step_s_median"] > 0  # the first service runs it
    assert "speed-up 1,1,2->2,1,1" in result["_stdout"]  # the table is printed
    for name, a in result["approaches"].items():
        assert a["start"]["optimizer_first"] == "D1P1M2B8m1"  # the profile's own first choice: (1,1,2)
        assert [(c["from"], c["to"], c["plan_config"]) for c in a["changes"]] == CHAIN, name
        for c in a["changes"]:
            assert c["completed"] == c["requests"] == 8 and c["tokens_identical"], (name, c)
            assert 0 < c["ttft_new_config_s"] <= c["every_next_token_s"]
            assert c["stall_s"] >= c["step_s_median"] > 0
            assert c["migration_s"] > 0 and c["configured"]["failed"] == []
    assert [s["change"] for s in result["speedup"]] == [f"{a}->{b}" for a, b, _ in CHAIN]


@pytest.mark.timeout(300)
def test_bytes_moved_are_the_planned_bytes(result):
    for name, a in result["approaches"].items():
        for c in a["changes"]:
            ex, m, plan = c["executor"], c["bytes_match"], c["plan"]
            assert ex is not None, "the configure replies carry no executor stats"
            assert m["weights"] and ex["weight_bytes"] == plan["net_bytes"] + plan["disk_bytes"], (name, c)
            assert m["kv_requests"] and (m["kv"] or m["kv_whole_blocks"]), (name, c)
            assert ex["checkpoint_bytes"] == plan["disk_bytes"]
    for c in result["approaches"]["spotserve"]["changes"]:  # context moves worker to worker, nothing recomputed
        assert c["executor"]["checkpoint_bytes"] == 0 and c["executor"]["received_bytes"] > 0
        assert c["resumes"]["kv"] > 0 and c["resumes"]["prefill"] == 0 and c["recomputed_tokens"] == 0
        assert c["implied_GBps"] > 0 and c["pct_of_p2p"] > 0
    for c in result["approaches"]["reparallelization"]["changes"]:  # from disk, requests recomputed
        assert c["executor"]["received_bytes"] == 0 and c["plan"]["disk_bytes"] > 0 and c["plan"]["kv_bytes"] == 0
        assert c["resumes"]["kv"] == 0 and c["recomputed_tokens"] > 0 and c["mismatched_recomputed"] == 0
        assert c["disk_GBps"] > 0 and c["implied_GBps"] is None
        assert c["cold_cache"].startswith("posix_fadvise")


@pytest.mark.timeout(300)
def test_sigkill_recovers_on_the_surviving_gpu(result):
    k = result["kill"]
    assert k["victim"] == "i1/g0" and k["affected"] > 0 and k["detect_s"] >= 0
    assert k["completed"] == k["requests"] and k["tokens_identical"]
    assert 0 < k["first_next_token_s"] <= k["every_next_token_s"]
    assert k["config_after"] == "D1P1M1B8m1"  # the surviving GPU alone, the whole model on it
    assert k["configure"]["checkpoint_bytes"] > 0  # the killed GPU's half is read from disk
    assert [e["event"] for e in k["events"]][:2] == ["worker_lost", "reclaim"]
