"""Per-host launcher for mpirun runs: every MPI rank but 0 is an agent that starts and kills instances locally.

`mpirun -hostfile HOSTS -np N python -m spotserve.live ...` puts the controller on rank 0 and an
agent on every other rank (one per host is the intended layout). An agent connects to the
controller like a worker (name `agent/<rank>`), and on `spawn` starts an instance's worker
processes on its host with a LocalLauncher, on `kill` SIGKILLs them. MPI is used only to hand the
controller's address and token to the agents; the agents outlive the instances they host, so
killing workers never takes the MPI job down.
"""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time

from spotserve.live import protocol as P
from spotserve.live.launcher import LocalLauncher


def _detach(coro) -> None:
    """Run a command without waiting; a failure (agent gone) is logged, not left unretrieved."""
    import asyncio
    import logging

    def done(task):
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger("spotserve.live").warning("agent command failed: %s", task.exception())
    asyncio.ensure_future(coro).add_done_callback(done)


class AgentLauncher:
    """Controller-side launcher that places instances on agents (round robin) and drives them."""

    def __init__(self, pool, agents: list[str]):
        if not agents:
            raise ValueError("AgentLauncher needs at least one agent")
        self.pool, self.agents = pool, agents
        self.where: dict[str, str] = {}
        self._next = 0

    def spawn(self, instance: str, slots: int) -> list[str]:
        agent = self.agents[self._next % len(self.agents)]
        self._next += 1
        self.where[instance] = agent
        _detach(self.pool.conns[agent].call("spawn", {"instance": instance, "slots": slots}))
        return [f"{instance}/g{k}" for k in range(slots)]

    def kill(self, instance: str) -> list[int]:
        agent = self.where.get(instance)
        conn = self.pool.alive(agent) if agent else None
        if conn is None:
            return []
        _detach(conn.call("kill", {"instance": instance}))
        # the pids are on the agent's host; the controller only learns the workers are gone
        return [c.pid for c in self.pool.conns.values() if c.instance == instance and c.alive]

    def close(self) -> None:
        for inst in list(self.where):
            self.kill(inst)


def run_agent(connect: str, token: bytes, rank: int, model_dir: str, log_dir: str, heartbeat_s: float = 0.2) -> None:
    """Serve spawn / kill commands until the controller goes away; then kill this host's workers."""
    fd, token_file = tempfile.mkstemp(prefix="spotserve-token-")
    os.write(fd, token)
    os.close(fd)
    launcher = LocalLauncher(connect, token_file, model_dir, log_dir, heartbeat_s)
    host, _, port = connect.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.settimeout(None)
    lock = threading.Lock()

    def send(mtype, body, seq=0):
        with lock:
            P.send(sock, P.Message(mtype, body, seq), token)

    def beat():
        while True:
            time.sleep(heartbeat_s)
            try:
                send("ping", {})
            except OSError:
                return

    send("hello", {"worker": f"agent/{rank}", "pid": os.getpid()})
    threading.Thread(target=beat, daemon=True).start()
    try:
        while True:
            try:
                msg = P.recv(sock, token)
            except (ConnectionError, OSError):
                break
            try:
                if msg.type == "spawn":
                    send("ok", {"slots": launcher.spawn(msg.body["instance"], msg.body["slots"])}, msg.seq)
                elif msg.type == "kill":
                    send("ok", {"pids": launcher.kill(msg.body["instance"])}, msg.seq)
                elif msg.type == "shutdown":
                    send("ok", {}, msg.seq)
                    break
                else:
                    send("error", {"message": f"agent: unexpected {msg.type}"}, msg.seq)
            except Exception as exc:
                send("error", {"message": f"agent {rank}: {exc}"}, msg.seq)
    finally:
        launcher.close()
        os.unlink(token_file)
