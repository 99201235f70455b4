"""Context daemons of worker slots on one host: their names, and killing them with their instance.

A slot's daemon is named after the slot and its launcher (`daemon_name`), so a worker restarted on
the same slot finds it, and two clusters on one host never share one. The worker starts it (see
live/context.py); the launcher kills it with the instance (`kill_daemon`): SIGKILL, as the cloud
does with a reclaimed VM, then it removes what the VM's memory would have taken along: the
daemon's /dev/shm segments, manifest and lock, its socket, token and log. Torch-free.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

from spotserve.daemon.paths import run_dir, socket_path, token_path
from spotserve.live.forkserver import alive

SHM_DIR = Path("/dev/shm")


def scope_of(log_dir: str | Path) -> str:
    """8 hex characters naming one launcher's cluster on this host (from its log folder)."""
    key = f"{socket.gethostname()}:{Path(log_dir).resolve()}"
    return hashlib.sha1(key.encode()).hexdigest()[:8]


def _safe(instance: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]", "_", instance)
    if len(s) > 40:  # daemon names have at most 64 characters
        s = s[:31] + "_" + hashlib.sha1(instance.encode()).hexdigest()[:8]
    return s


def daemon_name(slot: str, scope: str) -> str:
    """Daemon instance name of worker slot `slot` ("INSTANCE/gK") of the cluster `scope` (scope_of).
    Raises ValueError for a slot name of another form."""
    inst, sep, k = slot.rpartition("/g")
    if not sep or not inst or not k.isdigit():
        raise ValueError(f"slot name must be INSTANCE/gK, got {slot!r}")
    return f"{scope}-{_safe(inst)}-g{int(k)}"


def instance_daemons(instance: str, scope: str) -> list[str]:
    """Names of the daemons of `instance` that have anything in /dev/shm (running or killed)."""
    pat = re.compile(rf"^spotserve\.({re.escape(scope)}-{re.escape(_safe(instance))}-g\d+)\.")
    try:
        leaves = [p.name for p in SHM_DIR.iterdir()]
    except OSError:
        return []
    return sorted({m.group(1) for leaf in leaves if (m := pat.match(leaf))})


def daemon_pid(name: str) -> int | None:
    """Pid of the running daemon `name` (its manifest's, checked against its command line), else None."""
    try:
        pid = int(json.loads((SHM_DIR / f"spotserve.{name}.manifest").read_text())["pid"])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    # a recycled pid, or a zombie (empty command line), is not the daemon
    ok = any(a == b"--name" and b == name.encode() for a, b in zip(argv, argv[1:]))
    return pid if ok else None


def _locked(name: str) -> bool:
    """Whether a live daemon holds the instance lock of `name` (the kernel drops it at any exit)."""
    try:
        fd = os.open(SHM_DIR / f"spotserve.{name}.lock", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops our lock, if we took it


def kill_daemon(name: str, directory: str | Path | None = None, timeout_s: float = 5.0) -> int | None:
    """SIGKILL daemon `name` (socket and token in `directory`) and remove its files: shm segments,
    manifest, lock, socket, token, log. Files are left when a live daemon holds the name (one that
    started meanwhile). Returns the pid killed, or None when none was running."""
    pid = daemon_pid(name)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        end = time.monotonic() + timeout_s
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.005)
    if _locked(name):
        return pid
    for leaf in SHM_DIR.glob(f"spotserve.{name}.*"):  # the name is [A-Za-z0-9_-] only: no glob syntax
        leaf.unlink(missing_ok=True)
    d = run_dir(directory)
    for path in (socket_path(name, d), token_path(name, d), d / f"spotserve-{name}.log"):
        path.unlink(missing_ok=True)
    return pid
