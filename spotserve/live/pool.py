"""Controller side of the worker connections: accept, authenticate, call with timeouts, detect loss.

Every worker connects to one asyncio server, says hello (its slot name INSTANCE/gK), then
heartbeats. `WorkerConn.call` sends a command and awaits the reply carrying the same seq (or
raises WorkerLost / CommandError / TimeoutError). A worker is lost when its connection closes (a
SIGKILLed process's socket is closed by the kernel at once) or when it is silent for longer than
the heartbeat timeout (a frozen process); `on_lost(conn, why)` is then called once.
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

from spotserve.live import protocol as P


class WorkerLost(RuntimeError):
    """The worker's connection is gone (process killed, crashed or frozen)."""


class CommandError(RuntimeError):
    """The worker answered a command with an error reply."""


class WorkerConn:
    """One connected worker."""

    def __init__(self, name: str, pid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 token: bytes, hello: dict | None = None):
        self.name, self.pid = name, pid
        # the hello's body: a worker that reconnects after losing a controller says what it holds
        # (resumed, config_id, holds, position, host; see worker.hello_body), an agent its instances
        self.hello = dict(hello or {})
        self.instance = name.rsplit("/", 1)[0]
        self.reader, self.writer, self.token = reader, writer, token
        self.last_seen = time.monotonic()
        self.alive = True
        self.lost_why = ""
        self._seq = 0
        self._pending: dict[int, asyncio.Future] = {}

    @property
    def resumed(self) -> bool:
        """Whether it connected again after losing a controller (a candidate for adoption)."""
        return bool(self.hello.get("resumed"))

    @property
    def is_agent(self) -> bool:
        """A per-host launcher (live/agent.py), not a worker slot."""
        return self.name.startswith("agent/")

    async def call(self, mtype: str, body: dict, timeout: float = 30.0) -> P.Message:
        """Send one command; the reply message (type 'error' raises CommandError)."""
        if not self.alive:
            raise WorkerLost(f"{self.name}: {self.lost_why}")
        self._seq += 1
        seq = self._seq
        fut = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            await P.asend(self.writer, P.Message(mtype, body, seq), self.token)
            reply = await asyncio.wait_for(fut, timeout)
        except (ConnectionError, OSError) as exc:
            raise WorkerLost(f"{self.name}: {exc}") from None
        finally:
            self._pending.pop(seq, None)
        if reply.type == "error":
            raise CommandError(reply.body["message"])
        return reply

    def _resolve(self, msg: P.Message) -> None:
        fut = self._pending.get(msg.seq)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _fail(self, why: str) -> None:
        self.alive = False
        self.lost_why = why
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(WorkerLost(f"{self.name}: {why}"))
        try:
            self.writer.close()
        except Exception:
            pass


class WorkerPool:
    """The controller's server for worker connections."""

    def __init__(self, token: bytes, heartbeat_timeout_s: float = 2.0,
                 on_lost: Callable[[WorkerConn, str], None] | None = None,
                 on_hello: Callable[[WorkerConn], None] | None = None):
        self.token = token
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.on_lost = on_lost
        self.on_hello = on_hello
        self.conns: dict[str, WorkerConn] = {}
        self.server: asyncio.AbstractServer | None = None
        self._monitor: asyncio.Task | None = None
        self.rejected = 0  # connections refused (bad token, no hello)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen; returns the port."""
        self.server = await asyncio.start_server(self._accept, host, port)
        self._monitor = asyncio.create_task(self._watch())
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for c in list(self.conns.values()):
            if c.alive:
                c._fail("controller closing")
        if self.server is not None:
            self.server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            hello = await asyncio.wait_for(P.arecv(reader, self.token), 30.0)
            if hello.type != "hello":
                raise P.ProtocolError(f"first message must be hello, got {hello.type}")
        except (P.ProtocolError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            self.rejected += 1
            writer.close()
            return
        conn = WorkerConn(hello.body["worker"], hello.body["pid"], reader, writer, self.token, hello.body)
        old = self.conns.get(conn.name)
        if old is not None and old.alive:
            old._fail("replaced by a new connection with the same name")
        self.conns[conn.name] = conn
        if self.on_hello is not None:
            self.on_hello(conn)
        try:
            await self._read(conn)
        except asyncio.CancelledError:  # loop shutting down; ending quietly avoids asyncio's callback noise
            conn._fail("controller closing")

    async def _read(self, conn: WorkerConn) -> None:
        why = "connection closed"
        try:
            while conn.alive:
                msg = await P.arecv(conn.reader, self.token)
                conn.last_seen = time.monotonic()
                if msg.type != "ping":
                    conn._resolve(msg)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            why = "connection closed (process gone)"
        except P.ProtocolError as exc:
            why = f"protocol error: {exc}"
        self._lose(conn, why)

    def _lose(self, conn: WorkerConn, why: str) -> None:
        if not conn.alive:
            return
        conn._fail(why)
        if self.on_lost is not None:
            self.on_lost(conn, why)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_timeout_s / 4)
            now = time.monotonic()
            for c in list(self.conns.values()):
                if c.alive and now - c.last_seen > self.heartbeat_timeout_s:
                    self._lose(c, f"no heartbeat for {now - c.last_seen:.1f}s")

    def lose_instance(self, instance: str, why: str) -> None:
        """Mark the workers of `instance` lost now (the controller just killed them), so that no plan made
        before their sockets report the close counts them as migration sources or ranks."""
        for c in list(self.conns.values()):
            if c.instance == instance and not c.is_agent:
                self._lose(c, why)

    def alive(self, name: str) -> WorkerConn | None:
        c = self.conns.get(name)
        return c if c is not None and c.alive else None

    async def wait_for(self, names: list[str], timeout: float) -> list[WorkerConn]:
        """Wait until every named worker is connected; raises TimeoutError naming the missing ones."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [n for n in names if self.alive(n) is None]
            if not missing:
                return [self.conns[n] for n in names]
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers {missing} did not connect within {timeout:g}s")
            await asyncio.sleep(0.05)
