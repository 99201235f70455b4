"""Starts an instance's worker processes on this host and kills them for real (SIGKILL).

An instance is a group of slots `INSTANCE/g0 .. g{n-1}`; each slot is one worker process in its
own session (so a kill hits exactly it, and the controller's terminal signals do not), forked
from the launcher's fork server (forkserver.py: torch is imported once, not per worker, so an
acquisition does not steal seconds of CPU from the replicas serving on the same host).
Acquisitions spawn fresh processes that connect to the running controller; that is the
"per-instance launcher" way of joining (no MPI dynamic process management needed, and it works
the same on one host or, through live/agent.py under mpirun, on several). Workers outlive a lost
controller for `reconnect_s`; a restarted controller adopts them (`adopt`) and kills them the
same way as its own: by pid.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spotserve.live.forkserver import Forked, ForkServer


class LocalLauncher:
    """Worker processes of instances on this host."""

    def __init__(self, connect: str, token_file: str | Path, model_dir: str, log_dir: str | Path,
                 heartbeat_s: float = 0.2, python: str = sys.executable, reconnect_s: float = 30.0):
        self.connect, self.token_file, self.model_dir = connect, str(token_file), model_dir
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s = heartbeat_s
        self.reconnect_s = reconnect_s
        self.procs: dict[str, Forked] = {}  # slot name -> process (spawned here or adopted)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # started now: its imports overlap whatever the caller does before the first spawn
        self.server = ForkServer(str(self.log_dir), self.log_dir / "forkserver.log", python, env)

    def spawn(self, instance: str, slots: int) -> list[str]:
        """Start `slots` workers for `instance`; returns their slot names (they connect on their own).
        Raises ValueError when the instance still has live workers, ForkServerError when none can start."""
        if any(n.rsplit("/", 1)[0] == instance and p.poll() is None for n, p in self.procs.items()):
            raise ValueError(f"instance {instance} already has live worker processes")
        names = []
        for k in range(slots):
            name = f"{instance}/g{k}"
            self.procs[name] = self.server.spawn(
                ["--connect", self.connect, "--token-file", self.token_file, "--name", name, "--model-dir",
                 self.model_dir, "--heartbeat-s", str(self.heartbeat_s), "--reconnect-s", str(self.reconnect_s)],
                self.log_dir / f"{instance}-g{k}.log")
            names.append(name)
        return names

    def adopt(self, instance: str, pids: dict[str, int], host: str | None = None) -> None:
        """Take over the workers `pids` (slot -> pid) of `instance`, started by a previous controller."""
        for name, pid in pids.items():
            self.procs[name] = Forked(int(pid))

    def pid(self, name: str) -> int | None:
        p = self.procs.get(name)
        return None if p is None else p.pid

    def kill(self, instance: str) -> list[int]:
        """SIGKILL every process of `instance` (the cloud took the VM back); returns the pids killed,
        once they are gone."""
        mine = [p for n, p in self.procs.items() if n.rsplit("/", 1)[0] == instance and p.poll() is None]
        for p in mine:
            p.kill()
        for p in mine:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        return [p.pid for p in mine]

    def close(self) -> None:
        """Kill every worker still running (end of a run) and stop the fork server."""
        for inst in {n.rsplit("/", 1)[0] for n in self.procs}:
            self.kill(inst)
        self.server.close()
