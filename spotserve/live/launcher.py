"""Starts an instance's worker processes on this host and kills them for real (SIGKILL).

An instance is a group of slots `INSTANCE/g0 .. g{n-1}`; each slot is one worker process started
in its own session (so a kill hits exactly it, and the controller's terminal signals do not).
Acquisitions spawn fresh processes that connect to the running controller; that is the
"per-instance launcher" way of joining (no MPI dynamic process management needed, and it works
the same on one host or, through live/agent.py under mpirun, on several).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class LocalLauncher:
    """Worker processes of instances on this host."""

    def __init__(self, connect: str, token_file: str | Path, model_dir: str, log_dir: str | Path,
                 heartbeat_s: float = 0.2, python: str = sys.executable):
        self.connect, self.token_file, self.model_dir = connect, str(token_file), model_dir
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s = heartbeat_s
        self.python = python
        self.procs: dict[str, subprocess.Popen] = {}  # slot name -> process

    def spawn(self, instance: str, slots: int) -> list[str]:
        """Start `slots` workers for `instance`; returns their slot names (they connect on their own)."""
        if any(n.rsplit("/", 1)[0] == instance and p.poll() is None for n, p in self.procs.items()):
            raise ValueError(f"instance {instance} already has live worker processes")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        names = []
        for k in range(slots):
            name = f"{instance}/g{k}"
            log = open(self.log_dir / f"{instance}-g{k}.log", "ab")
            self.procs[name] = subprocess.Popen(
                [self.python, "-m", "spotserve.live.worker", "--connect", self.connect, "--token-file",
                 self.token_file, "--name", name, "--model-dir", self.model_dir,
                 "--heartbeat-s", str(self.heartbeat_s)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            log.close()
            names.append(name)
        return names

    def pid(self, name: str) -> int | None:
        p = self.procs.get(name)
        return None if p is None else p.pid

    def kill(self, instance: str) -> list[int]:
        """SIGKILL every process of `instance` (the cloud took the VM back); returns the pids killed."""
        killed = []
        for name, p in self.procs.items():
            if name.rsplit("/", 1)[0] == instance and p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                    killed.append(p.pid)
                except ProcessLookupError:
                    pass
        for name, p in self.procs.items():
            if name.rsplit("/", 1)[0] == instance:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        return killed

    def close(self) -> None:
        """Kill every worker still running (end of a run)."""
        for inst in {n.rsplit("/", 1)[0] for n in self.procs}:
            self.kill(inst)
