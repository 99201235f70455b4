"""Under mpirun a controller restart is a new job: rank 0 reuses the token and worker address recorded in
the state store, so the workers the first job's agents started (which outlive it for --reconnect-s)
are adopted by the second job, not replaced."""
from __future__ import annotations

import os
import shutil
import signal
import sys

import pytest

from live_harness import start_listening
from spotserve.live.forkserver import WORKER_COMM, alive

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(200)]


def test_mpirun_restart_reuses_the_token_and_adopts_the_workers(live_ckpt, live_profile, tmp_path):
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert mpirun, "mpirun not found next to the interpreter or on PATH"
    cmd = [mpirun, "--oversubscribe", "-np", "2"]
    if os.geteuid() == 0:
        cmd.insert(1, "--allow-run-as-root")
    cmd += [sys.executable, "-m", "spotserve.live", "--model-dir", live_ckpt, "--profile", live_profile,
            "--run-dir", str(tmp_path / "run"), "--state", str(tmp_path / "state.sqlite"), "--instances", "i0",
            "--gpus-per-instance", "1", "--port", "0", "--rate", "200", "--reconnect-s", "40"]
    first, up = start_listening(cmd, "mpirun")
    token = (tmp_path / "run" / "token").read_bytes()
    pids = up["worker_pids"]
    assert sorted(pids) == ["i0/g0"] and up["adopted"] == []
    second = None
    try:
        os.kill(up["pid"], signal.SIGKILL)  # rank 0 dies: mpirun ends the job (its agent with it)
        first.wait(60)
        assert all(alive(p) for p in pids.values())  # the worker outlived the job
        second, again = start_listening(cmd, "mpirun")
        assert (tmp_path / "run" / "token").read_bytes() == token  # the recorded token, not a new one
        assert again["adopted"] == ["i0"] and again["worker_pids"] == pids
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        # mpirun hands SIGTERM to every rank at once: the agent may be gone before the controller's kill
        # reaches it, and workers outlive their agent (that is what lets a new job adopt them), so the
        # test removes the worker it caused
        for pid in pids.values():
            if alive(pid):
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == WORKER_COMM:
                        os.kill(pid, signal.SIGKILL)
