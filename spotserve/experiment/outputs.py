"""Write a run's outputs: per-request CSV, events JSON lines and summary.json; read them back for plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from spotserve.sim.run import SimResult

FIELDS = ["id", "fate", "arrival_s", "finish_s", "latency_s", "first_token_s", "input_len", "output_len",
          "committed", "interruptions", "recomputed_tokens", "reason"]
SUMMARY_KEYS = ("arrived", "completed", "rejected", "unfinished", "avg_s", "p50_s", "p90_s", "p99_s",
                "cost_usd", "usd_per_token")


def write_result(out: Path, res: SimResult) -> None:
    """requests_<approach>.csv, events_<approach>.jsonl and instances_<approach>.csv under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"requests_{res.approach}.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for row in res.records:
            w.writerow(row)
    res.log.write(out / f"events_{res.approach}.jsonl")
    with (out / f"instances_{res.approach}.csv").open("w", newline="") as f:
        f.write("t_s,instances\n")
        for t, n in res.instance_counts:
            f.write(f"{t},{n}\n")


def write_summary(out: Path, summaries: dict[str, dict], meta: dict | None = None) -> Path:
    """summary.json: an object keyed by approach name (plus `_meta` describing the run)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, s in summaries.items():
        missing = [k for k in SUMMARY_KEYS if k not in s]
        if missing:
            raise ValueError(f"summary of {name} lacks {missing}")
        if s["arrived"] != s["completed"] + s["rejected"] + s["unfinished"]:
            raise ValueError(f"summary of {name}: arrived != completed + rejected + unfinished")
    body = dict(summaries)
    if meta:
        body["_meta"] = meta
    path = out / "summary.json"
    path.write_text(json.dumps(body, indent=2))
    return path


def read_summary(out: Path) -> dict[str, dict]:
    """summary.json without `_meta`; ValueError if missing."""
    path = out / "summary.json"
    if not path.is_file():
        raise ValueError(f"{path} not found: run an experiment with --out {out} first")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def read_requests(out: Path, approach: str) -> list[dict]:
    """Rows of requests_<approach>.csv with numbers parsed."""
    rows = []
    with (out / f"requests_{approach}.csv").open() as f:
        for row in csv.DictReader(f):
            rows.append({k: (float(v) if v not in ("", None) and k.endswith("_s") else v) for k, v in row.items()})
    return rows


def read_instances(out: Path, approach: str) -> list[tuple[float, int]]:
    path = out / f"instances_{approach}.csv"
    with path.open() as f:
        next(f)
        return [(float(a), int(b)) for a, b in (line.strip().split(",") for line in f if line.strip())]
