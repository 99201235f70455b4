"""The daemon's ops against a real daemon process: allocate, lookup, list, seal, release, stats,
shutdown, capacity, zero-copy sharing, isolation between instances, cleanup on exit."""
from __future__ import annotations

import signal

import pytest
import torch

from spotserve.daemon import DaemonClient, DaemonConfig, DaemonError, DaemonProcess

pytestmark = pytest.mark.timeout(60)


def test_allocate_is_zero_filled_shared_and_idempotent(start_daemon):
    d = start_daemon()
    with d.client() as a, d.client() as b:
        info = a.allocate("w/x", (3, 5), "float32")
        assert (info.name, info.shape, info.dtype, info.nbytes, info.sealed) == ("w/x", (3, 5), "float32", 60, False)
        ta = a.attach(info)
        assert torch.count_nonzero(ta) == 0
        ta.copy_(torch.arange(15, dtype=torch.float32).view(3, 5))
        tb = b.attach(b.lookup("w/x"))
        assert torch.equal(tb, ta)
        tb[1, 2] = -7.0  # writes through either mapping are visible to the other
        assert ta[1, 2].item() == -7.0
        again = b.allocate("w/x", (3, 5), "float32")
        assert again.handle == info.handle
        with pytest.raises(DaemonError) as e:
            b.allocate("w/x", (5, 3), "float32")
        assert e.value.code == "exists"


def test_lookup_list_seal_release(start_daemon, shm_of):
    d = start_daemon()
    with d.client() as c:
        c.allocate("kv/0", (2, 4), "bfloat16")
        c.allocate("w/a", (8,), "int64")
        assert [b.name for b in c.list()] == ["kv/0", "w/a"]
        assert c.seal("w/a").sealed and c.lookup("w/a").sealed
        assert not c.lookup("kv/0").sealed
        seg = c.lookup("kv/0").handle.lstrip("/")
        assert seg in shm_of(d.config.name)
        assert c.release("kv/0") is True
        assert seg not in shm_of(d.config.name)
        assert c.release("kv/0") is False
        for op in (c.lookup, c.seal):
            with pytest.raises(DaemonError) as e:
                op("kv/0")
            assert e.value.code == "not_found"
        s = c.stats()
        assert s["buffers"] == 1 and s["bytes_used"] == 64 and s["pid"] == d.pid


def test_capacity_and_bad_arguments(start_daemon):
    d = start_daemon(capacity_bytes=1000)
    with d.client() as c:
        c.allocate("a", (100,), "float32")
        with pytest.raises(DaemonError) as e:
            c.allocate("b", (151,), "float32")
        assert e.value.code == "no_memory"
        c.allocate("b", (150,), "float32")  # exactly fills the capacity
        for name, shape, dtype in [("bad name!", (1,), "float32"), ("z", (0,), "float32"), ("", (1,), "int8")]:
            with pytest.raises(DaemonError) as e:
                c.allocate(name, shape, dtype)
            assert e.value.code == "bad_request"
        with pytest.raises(ValueError, match="unsupported dtype"):
            c.allocate("q", (1,), "complex64")
        with pytest.raises(DaemonError) as e:  # the daemon checks nbytes against shape itself
            c.call("allocate", name="q", nbytes=7, dtype="float32", shape=[2])
        assert e.value.code == "bad_request" and "nbytes" in e.value.message
        assert c.stats()["errors"] == 5


def test_wrong_token_is_refused_without_harm(start_daemon):
    d = start_daemon()
    with DaemonClient(d.socket_path, "0" * 48) as bad:
        with pytest.raises(DaemonError) as e:
            bad.allocate("w", (1,), "int8")
        assert e.value.code == "unauthorized"
        with pytest.raises(DaemonError):
            bad.shutdown()
    with d.client() as c:
        assert c.list() == [] and d.proc.poll() is None


def test_shutdown_op_and_sigterm_remove_every_segment(start_daemon, shm_of):
    for how in ("op", "sigterm"):
        d = start_daemon()
        with d.client() as c:
            for i in range(3):
                c.allocate(f"b{i}", (1024,), "uint8")
            t = c.attach(c.lookup("b0"))
            assert len(shm_of(d.config.name)) == 5  # 3 segments + lock + manifest
            if how == "op":
                c.shutdown()
            else:
                d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert shm_of(d.config.name) == []
        assert not d.socket_path.exists()
        t.fill_(1)  # an existing mapping stays valid after the segment is unlinked (POSIX semantics)
        assert int(t.sum()) == 1024


def test_two_instances_do_not_collide_and_a_name_is_exclusive(start_daemon, run_dir):
    a, b = start_daemon(), start_daemon()
    with a.client() as ca, b.client() as cb:
        ca.allocate("same", (4,), "int32")
        cb.allocate("same", (4,), "int32")
        ca.attach(ca.lookup("same")).fill_(1)
        cb.attach(cb.lookup("same")).fill_(2)
        assert int(ca.attach(ca.lookup("same")).sum()) == 4
        assert int(cb.attach(cb.lookup("same")).sum()) == 8
    with pytest.raises(RuntimeError, match="exited with 3"):
        DaemonProcess.start(DaemonConfig(name=a.config.name, run_dir=run_dir + "/other"))
    with a.client() as ca:  # the refused duplicate touched nothing
        assert [x.name for x in ca.list()] == ["same"]


def test_config_validation(new_name):
    for kw in ({"name": "has space"}, {"name": "x" * 65}, {"name": "ok", "device": "gpu0"},
               {"name": "ok", "capacity_bytes": -1}, {"name": "ok", "run_dir": "/tmp/" + "d" * 120}):
        with pytest.raises(ValueError):
            DaemonConfig(**kw)
    assert DaemonConfig(name=new_name(), device="cuda:1").device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without a CUDA driver")
def test_cuda_daemon_without_a_driver_fails_with_a_clear_error(run_dir, new_name):
    with pytest.raises(RuntimeError, match="libcuda|CUDA"):
        DaemonProcess.start(DaemonConfig(name=new_name(), device="cuda:0", run_dir=run_dir))
