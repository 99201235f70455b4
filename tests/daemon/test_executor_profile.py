"""The executor's prepared allocations and timing breakdown, on 2 gloo processes (profile_worker.py):
prepare(allocate=True) tensors are the ones the move fills, profile=True gives per-round rows whose
bytes add up to what was sent, and the host steps are accounted."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("profile_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = ("alloc_s", "pack_s", "post_s", "wait_s", "unpack_s", "local_s", "arrive_s", "drain_s")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, cwd=ROOT,
                                      stdout=open(out / f"out.{rank}", "w"), stderr=open(out / f"err.{rank}", "w")))
    deadline = time.monotonic() + 100
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    bad = [r for r, p in enumerate(procs) if p.returncode != 0]
    assert not bad, "\n".join((out / f"err.{r}").read_text()[-3000:] for r in bad)
    return [json.loads((out / f"{r}.json").read_text()) for r in range(2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["weights", "kv"])
def test_prepared_tensors_are_filled_and_correct(ranks, case):
    for r in ranks:
        got = r[case]
        assert got["identical"]
        assert got["prepared_used"] == got["prepared"]  # every prepared tensor is an outcome tensor
        assert got["prepared_alloc_seconds"] > 0 if got["prepared"] else got["prepared_alloc_seconds"] >= 0
        assert sorted(got["units"]) == got["want_units"]  # each unit reported once
    tp2 = ranks[1]["weights"]
    assert tp2["prepared"] and all(not n.startswith("kv/") for n in tp2["prepared"])
    if case == "kv":
        assert ranks[0]["kv"]["kv_values"] == {} and ranks[1]["kv"]["kv_values"] == {"a": [10.0], "b": [24.0]}
        assert ranks[1]["kv"]["prepared"] == ["kv/a", "kv/b"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["weights", "kv"])
def test_timing_rows_add_up(ranks, case):
    for r in ranks:
        got = r[case]
        st, tm = got["stats"], got["timing"]
        assert got["again_timing"] is None  # profile is opt-in per run
        assert all(st[k] >= 0 for k in STEPS) and sum(st[k] for k in STEPS) <= st["seconds"] * 1.01
        rows = tm["rounds"]
        assert sum(x["send_bytes"] for x in rows) == st["sent_bytes"]
        assert sum(x["recv_bytes"] for x in rows) == st["received_bytes"]
        assert len(rows) == st["rounds"] == tm["timeline"]["rounds"]
        for x in rows:
            assert x["done_ms"] >= x["packed_ms"] >= x["pack_start_ms"] and x["net_ms"] >= 0
        assert tm["timeline"]["source"] == "host clock"
    sender = ranks[0][case]["stats"]
    assert sender["sent_bytes"] > 0 and sender["pack_s"] > 0 and sender["post_s"] > 0
    receiver = ranks[1][case]["stats"]
    assert receiver["received_bytes"] == sender["sent_bytes"] and receiver["wait_s"] > 0
    assert ranks[1][case]["again_alloc_s"] > 0  # without prepare(allocate=True) the move allocates
