"""Workers outlive a lost controller: they reconnect and say what they hold; the held layout a restart adopts."""
from __future__ import annotations

import asyncio
import secrets
import time

import pytest

from spotserve.live.adopt import held_replicas, install_held
from spotserve.live.forkserver import alive
from spotserve.live.launcher import LocalLauncher
from spotserve.live.pool import WorkerPool


class _Conn:
    def __init__(self, name, cid, replica, pp, tp, stage, shard, holds=None, resumed=True):
        self.name, self.resumed = name, resumed
        self.hello = {"resumed": resumed, "config_id": cid,
                      "holds": holds if holds is not None else [pp, tp, stage, shard],
                      "position": {"config_id": cid, "replica": replica, "stage": stage, "shard": shard,
                                   "pp": pp, "tp": tp}}


def test_held_replicas_keeps_complete_replicas_in_rank_order():
    conns = [
        # a (pp 2, tp 2) replica of config 3, listed out of order
        _Conn("b/g1", 3, 0, 2, 2, 1, 1), _Conn("a/g0", 3, 0, 2, 2, 0, 0), _Conn("b/g0", 3, 0, 2, 2, 1, 0),
        _Conn("a/g1", 3, 0, 2, 2, 0, 1),
        # a kept replica still numbered under its old config 1: same index 0, other config id
        _Conn("c/g0", 1, 0, 1, 1, 0, 0),
        # incomplete (its stage 1 did not come back), weights that disagree, a fresh (not resumed) worker
        _Conn("d/g0", 3, 1, 2, 1, 0, 0), _Conn("e/g0", 3, 2, 1, 1, 0, 0, holds=[1, 2, 0, 0]),
        _Conn("f/g0", 3, 3, 1, 1, 0, 0, resumed=False),
    ]
    assert held_replicas(conns) == [(1, 1, 1, ["c/g0"]), (3, 2, 2, ["a/g0", "a/g1", "b/g0", "b/g1"])]


def test_install_held_gives_the_backend_its_old_layout_and_later_config_ids():
    class Backend:
        replicas, held, config_id = {}, {}, 0

    be = Backend()
    conns = [_Conn("a/g0", 7, 0, 1, 2, 0, 0), _Conn("a/g1", 7, 0, 1, 2, 0, 1), _Conn("b/g0", 9, 1, 1, 1, 0, 0)]
    assert install_held(be, conns) == [["a/g0", "a/g1"], ["b/g0"]]
    assert be.config_id == 9  # the next configuration is 10: no worker mistakes it for one it has
    assert [(r.shape.tp, r.slots, r.config_id) for r in be.replicas.values()] == [(2, ["a/g0", "a/g1"], 7),
                                                                                 (1, ["b/g0"], 9)]
    assert be.held == {"a/g0": (1, 2, 0, 0), "a/g1": (1, 2, 0, 1), "b/g0": (1, 1, 0, 0)}


@pytest.mark.timeout(90)
def test_worker_reconnects_to_a_new_controller_and_gives_up_on_a_wrong_token(live_ckpt, tmp_path):
    async def go():
        token = secrets.token_hex(8).encode()
        (tmp_path / "token").write_bytes(token)
        pool = WorkerPool(token, 5.0)
        port = await pool.start()
        la = LocalLauncher(f"127.0.0.1:{port}", tmp_path / "token", live_ckpt, tmp_path / "logs", reconnect_s=3.0)
        try:
            (conn,) = await pool.wait_for(la.spawn("i0", 1), 60)
            assert not conn.resumed and conn.hello["config_id"] == -1 and conn.hello["holds"] is None
            await pool.close()  # the controller goes away; the worker keeps running
            await asyncio.sleep(0.5)
            assert alive(conn.pid)
            pool = WorkerPool(token, 5.0)
            await pool.start("127.0.0.1", port)
            (back,) = await pool.wait_for(["i0/g0"], 10)
            assert back.resumed and back.pid == conn.pid
            assert (await back.call("ping", {})).type == "pong"
            await pool.close()
            pool = WorkerPool(b"another token", 5.0)  # a controller it cannot authenticate with
            await pool.start("127.0.0.1", port)
            t0 = time.monotonic()
            while alive(conn.pid) and time.monotonic() - t0 < 20:
                await asyncio.sleep(0.1)
            assert not alive(conn.pid) and pool.rejected > 0 and pool.alive("i0/g0") is None
            assert 2.0 < time.monotonic() - t0 < 10.0  # it kept trying for its reconnect window, then exited
        finally:
            la.close()
            await pool.close()

    asyncio.run(go())
