"""Per-instance file names of a context daemon (socket, token), so two daemons never collide."""
from __future__ import annotations

import os
import re
from pathlib import Path

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def check_instance_name(name: str) -> str:
    """Returns `name` if it is 1-64 characters of [A-Za-z0-9_-]; raises ValueError otherwise."""
    if not isinstance(name, str) or not _INSTANCE_RE.match(name):
        raise ValueError(f"daemon instance name must be 1-64 characters of [A-Za-z0-9_-], got {name!r}")
    return name


def run_dir(directory: str | Path | None = None) -> Path:
    """The directory for sockets and tokens: `directory`, else $SPOTSERVE_RUN_DIR, $XDG_RUNTIME_DIR, /tmp."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get("SPOTSERVE_RUN_DIR") or os.environ.get("XDG_RUNTIME_DIR") or "/tmp")


def socket_path(name: str, directory: str | Path | None = None) -> Path:
    """Unix socket of instance `name` (same rule as the daemon's default); ValueError if too long."""
    path = run_dir(directory) / f"spotserve-{check_instance_name(name)}.sock"
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter run dir")
    return path


def token_path(name: str, directory: str | Path | None = None) -> Path:
    """File holding the shared token of instance `name` (mode 0600, written by the launcher)."""
    return run_dir(directory) / f"spotserve-{check_instance_name(name)}.token"
