"""`python -m spotserve.experiment`: subcommands, outputs, summary accounting and figures."""
import csv
import json
import subprocess
import sys

import pytest

from spotserve.experiment.__main__ import SUBCOMMANDS, main

SUMMARY_KEYS = {"arrived", "completed", "rejected", "unfinished", "avg_s", "p50_s", "p90_s", "p99_s", "cost_usd",
                "usd_per_token"}


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "spotserve.experiment", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for name in ("demo", "e2e", "cost", "workload", "ablation", "plot"):
        assert name in out
    assert set(SUBCOMMANDS) == {"demo", "e2e", "cost", "workload", "ablation", "plot"}


def test_demo_writes_outputs_and_figures(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--no-progress", "--no-live"]) == 0
    printed = capsys.readouterr().out
    cell = tmp_path / "e2e_20B_Bs"
    assert str(cell / "latency_percentiles.png") in printed
    summ = json.loads((cell / "summary.json").read_text())
    assert set(summ) == {"spotserve", "reparallelization", "rerouting", "_meta"}
    assert "48 x 7168" in summ["_meta"]["note"]
    for name in ("spotserve", "reparallelization", "rerouting"):
        s = summ[name]
        assert SUMMARY_KEYS <= set(s)
        assert s["arrived"] == s["completed"] + s["rejected"] + s["unfinished"] > 300
        with (cell / f"requests_{name}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == s["arrived"]
        assert sum(r["fate"] == "completed" for r in rows) == s["completed"]
        events = [json.loads(x) for x in (cell / f"events_{name}.jsonl").read_text().splitlines()]
        assert {"acquire", "notice", "reclaim"} <= {e["event"] for e in events}
    for fig in ("latency_percentiles.png", "latency_over_time.png"):
        assert (cell / fig).stat().st_size > 5000
    (cell / "latency_percentiles.png").unlink()
    assert main(["plot", "--out", str(cell)]) == 0
    assert (cell / "latency_percentiles.png").is_file()


def test_e2e_with_true_gamma_arrivals_and_ablation(tmp_path):
    assert main(["e2e", "--model", "6.7B", "--trace", "Bs+o", "--approach", "spotserve,no-arranger",
                 "--arrival-cv", "4", "--rate", "0.5", "--out", str(tmp_path), "--no-progress"]) == 0
    summ = json.loads((tmp_path / "e2e_6.7B_Bs+o" / "summary.json").read_text())
    assert set(summ) == {"spotserve", "no-arranger", "_meta"}
    assert "CV 4" in summ["_meta"]["arrivals"]
    assert main(["ablation", "--model", "20B", "--trace", "Bs", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "ablation_20B_Bs" / "ablation.png").is_file()


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["e2e", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "has no availability/" in capsys.readouterr().err
    assert main(["e2e", "--approach", "bogus", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "unknown approach" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["e2e", "--model", "13B"])
