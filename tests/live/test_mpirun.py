"""`mpirun -np 3 python -m spotserve.live ...`: rank 0 controls, ranks 1-2 are per-host agents that start
and SIGKILL instances; a trace with a notice and replayed arrivals runs to the end."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(180)]


def test_mpirun_controller_and_agents(live_ckpt, live_profile, tmp_path):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert mpirun, "mpirun not found next to the interpreter or on PATH"
    (tmp_path / "trace.txt").write_text('[0,"add",{"nodes":["i0","i1"]}]\n[3000,"remove",{"nodes":["i0"]}]\n'
                                        '[5000,"DONE",{}]\n')
    (tmp_path / "arrivals.txt").write_text("".join(f"{i},{0.4 * i + 0.2:.2f},8,0\n" for i in range(8)))
    cmd = [mpirun, "--oversubscribe", "-np", "3"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    cmd += [sys.executable, "-m", "spotserve.live", "--model-dir", live_ckpt, "--profile", live_profile,
            "--run-dir", str(tmp_path / "run"), "--trace", str(tmp_path / "trace.txt"), "--arrivals",
            str(tmp_path / "arrivals.txt"), "--output-len", "30", "--grace-s", "1.5", "--rate", "200",
            "--port", "0", "--exit-when-done", "--step-pause-s", "0.02"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    summary = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith('{"requests"')][-1])
    assert len(summary["requests"]) == 8 and all(r["done"] and r["tokens"] == 30 for r in summary["requests"])
    assert all(r["recomputed"] == 0 and r["mismatches"] == 0 for r in summary["requests"])
    assert [n["instance"] for n in summary["notice_to_serving"]] == ["i0"]
    # agents started the workers on their hosts: their logs sit under the agents' run dirs
    assert sorted(p.name for p in (tmp_path / "run").glob("agent*/i*-g*.log")) == [
        "i0-g0.log", "i0-g1.log", "i1-g0.log", "i1-g1.log"]
