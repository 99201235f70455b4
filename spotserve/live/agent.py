"""Per-host launcher for mpirun runs: every MPI rank but 0 is an agent that starts and kills instances locally.

`mpirun -hostfile HOSTS -np N python -m spotserve.live ...` puts the controller on rank 0 and an
agent on every other rank (one per host is the intended layout). An agent connects to the
controller like a worker (name `agent/<rank>`), and on `spawn` starts an instance's worker
processes on its host with a LocalLauncher, on `kill` SIGKILLs them. MPI is used only to hand the
controller's address and token to the agents; the agents outlive the instances they host, so
killing workers never takes the MPI job down. Like workers, an agent outlives a lost controller for
a while and says hello again with the instances it hosts; a restarted controller adopts instances
through the agent that hosts them, or one on the same host (`AgentLauncher.adopt`).
"""
from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time

from spotserve.live import protocol as P
from spotserve.live.forkserver import WORKER_COMM
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
        self.adopted: dict[str, list[int]] = {}  # instance -> pids of workers a previous controller started
        self._next = 0

    def spawn(self, instance: str, slots: int) -> list[str]:
        agent = self.agents[self._next % len(self.agents)]
        self._next += 1
        self.where[instance] = agent
        _detach(self.pool.conns[agent].call("spawn", {"instance": instance, "slots": slots}))
        return [f"{instance}/g{k}" for k in range(slots)]

    def adopt(self, instance: str, pids: dict[str, int], host: str | None = None) -> None:
        """Take over the workers `pids` (slot -> pid) of `instance` that a previous controller started:
        killed later through the agent that reports hosting them, else one on their host."""
        hosting = [a for a in self.agents if (c := self.pool.alive(a)) is not None and
                   instance in (c.hello.get("instances") or {})]
        local = [a for a in self.agents if (c := self.pool.alive(a)) is not None and host is not None and
                 c.hello.get("host") == host]
        if hosting or local:
            self.where[instance] = (hosting or local)[0]
        self.adopted[instance] = sorted(int(p) for p in pids.values())

    def kill(self, instance: str) -> list[int]:
        agent = self.where.get(instance)
        conn = self.pool.alive(agent) if agent else None
        pids = self.adopted.pop(instance, [])
        if conn is None:
            return []
        _detach(conn.call("kill", {"instance": instance, "pids": pids}))
        # the pids are on the agent's host; the controller only learns the workers are gone
        return [c.pid for c in self.pool.conns.values() if c.instance == instance and c.alive]

    def close(self) -> None:
        for inst in list(self.where):
            self.kill(inst)


def run_agent(connect: str, token: bytes, rank: int, model_dir: str, log_dir: str, heartbeat_s: float = 0.2,
              reconnect_s: float = 30.0) -> None:
    """Serve spawn / kill commands. When the controller goes away, keep this host's workers and
    reconnect for `reconnect_s` (saying hello again with the instances it hosts, so that a restarted
    controller can adopt them); past that, kill the workers and return."""
    fd, token_file = tempfile.mkstemp(prefix="spotserve-token-")
    os.write(fd, token)
    os.close(fd)
    launcher = LocalLauncher(connect, token_file, model_dir, log_dir, heartbeat_s, reconnect_s=reconnect_s)
    host, _, port = connect.rpartition(":")
    address = (host, int(port))
    try:
        sock = socket.create_connection(address, timeout=60)
        resumed = False
        while sock is not None:
            sock.settimeout(None)
            if _agent_session(sock, token, rank, launcher, heartbeat_s, resumed) == "shutdown":
                break
            sock.close()
            sock, resumed = _retry(address, reconnect_s), True
    finally:
        launcher.close()
        os.unlink(token_file)


def _agent_session(sock, token: bytes, rank: int, launcher: LocalLauncher, heartbeat_s: float,
                   resumed: bool) -> str:
    """One connection to the controller; returns "shutdown" or "lost"."""
    lock, stop = threading.Lock(), threading.Event()

    def send(mtype, body, seq=0):
        with lock:
            P.send(sock, P.Message(mtype, body, seq), token)

    def beat():
        while not stop.wait(heartbeat_s):
            try:
                send("ping", {})
            except OSError:
                return

    hosted: dict[str, dict[str, int]] = {}
    for name in launcher.procs:
        if launcher.procs[name].poll() is None:
            hosted.setdefault(name.rsplit("/", 1)[0], {})[name] = launcher.procs[name].pid
    try:
        send("hello", {"worker": f"agent/{rank}", "pid": os.getpid(), "host": socket.gethostname(),
                       "resumed": resumed, "instances": hosted})
        threading.Thread(target=beat, daemon=True).start()
        while True:
            try:
                msg = P.recv(sock, token)
            except (ConnectionError, OSError, P.ProtocolError):
                return "lost"
            try:
                if msg.type == "spawn":
                    send("ok", {"slots": launcher.spawn(msg.body["instance"], msg.body["slots"])}, msg.seq)
                elif msg.type == "kill":
                    pids = launcher.kill(msg.body["instance"])
                    pids += _kill_workers(msg.body.get("pids") or [])
                    send("ok", {"pids": pids}, msg.seq)
                elif msg.type == "shutdown":
                    send("ok", {}, msg.seq)
                    return "shutdown"
                else:
                    send("error", {"message": f"agent: unexpected {msg.type}"}, msg.seq)
            except OSError:
                raise
            except Exception as exc:
                send("error", {"message": f"agent {rank}: {exc}"}, msg.seq)
    except OSError:
        return "lost"
    finally:
        stop.set()


def _retry(address: tuple[str, int], reconnect_s: float):
    """A new connection within `reconnect_s`, or None."""
    end = time.monotonic() + reconnect_s
    while time.monotonic() < end:
        try:
            return socket.create_connection(address, timeout=1.0)
        except OSError:
            time.sleep(0.25)
    return None


def _kill_workers(pids: list) -> list[int]:
    """SIGKILL the given pids of this host, but only spotserve worker processes (adopted after a
    controller restart: another agent, or none, started them)."""
    killed = []
    for pid in pids:
        try:
            with open(f"/proc/{int(pid)}/comm", "rb") as f:
                if f.read().strip() != WORKER_COMM.encode():
                    continue
            os.kill(int(pid), signal.SIGKILL)
            killed.append(int(pid))
        except (OSError, ValueError):
            continue
    return killed
