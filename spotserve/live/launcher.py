"""Starts an instance's worker processes on this host and kills them for real (SIGKILL).

An instance is a group of slots `INSTANCE/g0 .. g{n-1}`; each slot is one worker process in its
own session (so a kill hits exactly it, and the controller's terminal signals do not), forked
from the launcher's fork server (forkserver.py: torch is imported once, not per worker, so an
acquisition does not steal seconds of CPU from the replicas serving on the same host).
Acquisitions spawn fresh processes that connect to the running controller; that is the
"per-instance launcher" way of joining (no MPI dynamic process management needed, and it works
the same on one host or, through live/agent.py under mpirun, on several). Workers outlive a lost
controller for `reconnect_s`; a restarted controller adopts them (`adopt`) and kills them the
same way as its own: by pid. Each slot may have a context daemon (engine setting "daemon"; started
by its worker, named by live/daemons.py after the slot and this launcher's log folder): it outlives
a worker process that crashed, so `respawn` restarts the worker on the same slot and it re-attaches
its weights; `kill` takes the instance's daemons down with its workers.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from spotserve.daemon.paths import run_dir
from spotserve.live.daemons import daemon_name, instance_daemons, kill_daemon, scope_of
from spotserve.live.forkserver import Forked, ForkServer


class LocalLauncher:
    """Worker processes of instances on this host."""

    def __init__(self, connect: str, token_file: str | Path, model_dir: str, log_dir: str | Path,
                 heartbeat_s: float = 0.2, python: str = sys.executable, reconnect_s: float = 30.0,
                 daemon_dir: str | Path | None = None):
        self.connect, self.token_file, self.model_dir = connect, str(token_file), model_dir
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.heartbeat_s = heartbeat_s
        self.reconnect_s = reconnect_s
        self.procs: dict[str, Forked] = {}  # slot name -> process (spawned here or adopted)
        # slot daemons: named after the slot and this cluster; sockets in a short folder (108-byte limit)
        self.scope = scope_of(self.log_dir)
        self.daemon_dir = str(run_dir(daemon_dir))
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
            self.procs[name] = self._fork(name)
            names.append(name)
        return names

    def _fork(self, name: str) -> Forked:
        instance, k = name.rsplit("/g", 1)
        return self.server.spawn(
            ["--connect", self.connect, "--token-file", self.token_file, "--name", name, "--model-dir",
             self.model_dir, "--heartbeat-s", str(self.heartbeat_s), "--reconnect-s", str(self.reconnect_s),
             "--daemon-name", self.daemon_name(name), "--daemon-dir", self.daemon_dir],
            self.log_dir / f"{instance}-g{k}.log")

    def daemon_name(self, slot: str) -> str:
        """Name of the context daemon of `slot` (the same for every worker process of that slot)."""
        return daemon_name(slot, self.scope)

    def respawn(self, slot: str) -> int:
        """Start a new worker process on `slot` of a live instance (its previous one died, e.g. a crash);
        with the daemon on, it re-attaches the slot's weights. Returns its pid; ValueError while the
        slot's process still runs."""
        p = self.procs.get(slot)
        if p is not None and p.poll() is None:
            raise ValueError(f"slot {slot} still has a live worker process ({p.pid})")
        self.procs[slot] = self._fork(slot)
        return self.procs[slot].pid

    def adopt(self, instance: str, pids: dict[str, int], host: str | None = None) -> None:
        """Take over the workers `pids` (slot -> pid) of `instance`, started by a previous controller."""
        for name, pid in pids.items():
            self.procs[name] = Forked(int(pid))

    def pid(self, name: str) -> int | None:
        p = self.procs.get(name)
        return None if p is None else p.pid

    def kill(self, instance: str) -> list[int]:
        """SIGKILL every process of `instance` (the cloud took the VM back), its slots' context daemons
        included, and remove what their memory held (/dev/shm segments); returns the pids killed,
        once they are gone."""
        mine = [p for n, p in self.procs.items() if n.rsplit("/", 1)[0] == instance and p.poll() is None]
        for p in mine:
            p.kill()
        for p in mine:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # daemons after their workers: no process maps their segments any more when they go
        daemons = {self.daemon_name(n) for n in self.procs if n.rsplit("/", 1)[0] == instance}
        daemons.update(instance_daemons(instance, self.scope))  # slots of workers started by another launcher
        killed = [kill_daemon(d, self.daemon_dir) for d in sorted(daemons)]
        return [p.pid for p in mine] + [pid for pid in killed if pid is not None]

    def close(self) -> None:
        """Kill every worker still running (end of a run) and stop the fork server."""
        for inst in {n.rsplit("/", 1)[0] for n in self.procs}:
            self.kill(inst)
        self.server.close()
