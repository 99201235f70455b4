"""A SIGKILLed daemon leaves its segments behind; the next daemon of that name removes them."""
from __future__ import annotations

import json
import os

import pytest

from spotserve.daemon import DaemonConfig, DaemonProcess

pytestmark = pytest.mark.timeout(60)


def test_restart_after_sigkill_removes_stale_segments(start_daemon, shm_of, run_dir):
    first = start_daemon()
    name = first.config.name
    with first.client() as c:
        segments = sorted(c.allocate(f"kv/{i}", (4096,), "uint8").handle.lstrip("/") for i in range(4))
    with open(f"/dev/shm/spotserve.{name}.manifest") as f:
        manifest = json.loads(f.read())
    assert manifest["pid"] == first.pid and manifest["instance"] == name
    first.kill()
    left = shm_of(name)
    assert set(segments) <= set(left)  # SIGKILL gives the daemon no chance to clean up
    # A different instance starting meanwhile must not touch them.
    other = start_daemon()
    assert set(segments) <= set(shm_of(name))
    second = start_daemon(name=name)
    with second.client() as c:
        s = c.stats()
    assert s["stale_removed"] == 4 and s["stale_owner_pid"] == first.pid
    assert not set(segments) & set(shm_of(name))
    assert other.proc.poll() is None


def test_stale_cleanup_removes_orphans_missing_from_any_manifest(start_daemon, shm_of, new_name, run_dir):
    # A crash between shm_open and anything else: only the naming rule ties the file to the instance.
    name = new_name()
    orphan = f"/dev/shm/spotserve.{name}.deadbeef.7"
    unrelated = f"/dev/shm/spotserve.{name}x.deadbeef.7"  # another instance's prefix: must survive
    for path in (orphan, unrelated):
        with open(path, "wb") as f:
            f.write(b"x" * 10)
    try:
        d = start_daemon(name=name)
        with d.client() as c:
            assert c.stats()["stale_removed"] == 1
        assert not os.path.exists(orphan) and os.path.exists(unrelated)
    finally:
        for path in (orphan, unrelated):
            if os.path.exists(path):
                os.unlink(path)


def test_stale_socket_file_is_replaced(run_dir, new_name):
    cfg = DaemonConfig(name=new_name(), run_dir=run_dir)
    d = DaemonProcess.start(cfg)
    d.kill()
    assert d.socket_path.exists()  # the dead daemon's socket file is still there
    d2 = DaemonProcess.start(cfg)
    try:
        with d2.client() as c:
            assert c.stats()["pid"] == d2.pid
    finally:
        assert d2.stop() == 0
