"""WorkerPool: authenticated hello, command round trips, and loss detection (closed socket, silence)."""
from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from spotserve.live import protocol as P
from spotserve.live.pool import CommandError, WorkerLost, WorkerPool

TOKEN = b"pool-test-token"


def _fake_worker(port: int, name: str, token: bytes = TOKEN, beat: bool = True, stop: threading.Event = None):
    """A thread speaking the worker side: echoes `step` as tokens, fails `export`, beats unless told not to."""
    sock = socket.create_connection(("127.0.0.1", port))

    def run():
        try:
            P.send(sock, P.Message("hello", {"worker": name, "pid": 1}), token)
            while True:
                msg = P.recv(sock, token)
                if msg.type == "step":
                    P.send(sock, P.Message("tokens", {"config_id": 1, "step": msg.body["step"], "tokens": {"a": 7}},
                                           msg.seq), token)
                else:
                    P.send(sock, P.Message("error", {"message": "nope"}, msg.seq), token)
        except (ConnectionError, OSError, P.ProtocolError):
            return

    def pings():
        while beat and not stop.is_set():
            try:
                P.send(sock, P.Message("ping", {}), token)
            except OSError:
                return
            stop.wait(0.05)

    stop = stop or threading.Event()
    threading.Thread(target=run, daemon=True).start()
    threading.Thread(target=pings, daemon=True).start()
    return sock, stop


@pytest.mark.timeout(30)
def test_calls_errors_and_loss_detection():
    async def go():
        lost = []
        pool = WorkerPool(TOKEN, heartbeat_timeout_s=0.6, on_lost=lambda c, why: lost.append((c.name, why)))
        port = await pool.start()
        a, _ = _fake_worker(port, "i0/g0")
        b, stop_b = _fake_worker(port, "i0/g1")
        bad, _ = _fake_worker(port, "i9/g0", token=b"wrong")
        conns = await pool.wait_for(["i0/g0", "i0/g1"], 5)
        assert conns[0].instance == "i0"
        reply = await conns[0].call("step", {"config_id": 1, "step": 3})
        assert reply.type == "tokens" and reply.body["tokens"] == {"a": 7} and reply.body["step"] == 3
        with pytest.raises(CommandError, match="nope"):
            await conns[0].call("export", {"ids": [], "release": False})
        # a closed socket is a loss at once, a silent worker after the heartbeat timeout
        a.close()
        stop_b.set()
        await asyncio.sleep(1.2)
        assert {n for n, _ in lost} == {"i0/g0", "i0/g1"}
        assert any("heartbeat" in why for n, why in lost if n == "i0/g1")
        with pytest.raises(WorkerLost):
            await conns[1].call("step", {"config_id": 1, "step": 4})
        assert pool.alive("i9/g0") is None and pool.rejected == 1
        await pool.close()
        b.close()
        bad.close()
    asyncio.run(go())
