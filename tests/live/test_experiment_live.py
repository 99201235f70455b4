"""The experiment driver's live parts: the demo's live run and `e2e --backend live`."""
import csv
import json
from pathlib import Path

import pytest

from spotserve.experiment.__main__ import main


def _procs_mentioning(text: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if text in (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@pytest.mark.timeout(240)
def test_demo_live_part_survives_notice_and_kill_and_leaves_no_process(tmp_path):
    from spotserve.live.demo import run_live_demo

    said = []
    rows = run_live_demo(str(tmp_path), say=said.append, n_requests=10)
    text = "\n".join(said)
    assert "notice for" in text and "SIGKILL" in text and "worker_lost" in text
    assert len(rows) == 10 and all(r["identical"] for r in rows)
    assert sum(1 for r in rows if r["interruptions"]) >= 2
    assert sum(r["recomputed"] for r in rows) == 0
    assert _procs_mentioning(str(tmp_path)) == []  # every worker process is gone


@pytest.mark.timeout(60)
def test_demo_live_part_cleans_up_after_a_timeout(tmp_path):
    from spotserve.live.demo import run_live_demo

    with pytest.raises(TimeoutError):
        run_live_demo(str(tmp_path), say=lambda s: None, n_requests=4, timeout_s=0.5)
    assert _procs_mentioning(str(tmp_path)) == []


@pytest.mark.timeout(300)
def test_e2e_backend_live_writes_the_simulators_outputs(tmp_path, live_ckpt, live_profile, capsys):
    out = tmp_path / "out"
    assert main(["e2e", "--backend", "live", "--trace", "Bs+o", "--approach", "spotserve", "--out", str(out),
                 "--no-progress", "--live-duration", "10", "--live-requests", "8", "--live-output-len", "8",
                 "--live-model-dir", live_ckpt, "--live-profile", live_profile]) == 0
    cell = out / "e2e_20B_Bs+o_live"
    summ = json.loads((cell / "summary.json").read_text())
    assert set(summ) == {"spotserve", "spotserve@sim", "spotserve@sim-refit", "_meta"}
    assert summ["_meta"]["backend"] == "live" and summ["_meta"]["model"] == "opt-tiny"
    live = summ["spotserve"]
    assert live["arrived"] == 8 == live["completed"] + live["rejected"] + live["unfinished"]
    assert live["completed"] >= 7 and live["p50_s"] > 0 and live["p99_s"] >= live["p50_s"]
    with (cell / "requests_spotserve.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and sum(r["fate"] == "completed" for r in rows) == live["completed"]
    events = [json.loads(x) for x in (cell / "events_spotserve.jsonl").read_text().splitlines()]
    assert {"notice", "reclaim"} <= {e["event"] for e in events}
    backend = [json.loads(x) for x in (cell / "backend_spotserve.jsonl").read_text().splitlines()]
    configured = [e for e in backend if e["event"] == "configured"]
    assert live["checkpoint_bytes_per_reconfiguration"] == [e["loaded_bytes"] for e in configured[1:]]
    assert configured[0]["loaded_bytes"] > 0  # the start set read its weights
    # the re-fitted simulation used this run's timed batches
    timed = [e for e in backend if e["event"] == "batch_done"]
    refit = json.loads((cell / "profile_refit_spotserve.json").read_text())
    assert timed and refit["refit"]["batches"] == len(timed)
    assert live["live_over_sim_refit"]["p50"] == pytest.approx(live["p50_s"] / summ["spotserve@sim-refit"]["p50_s"],
                                                               rel=1e-3)
    assert "live:" in capsys.readouterr().out
    assert _procs_mentioning(str(tmp_path)) == []
