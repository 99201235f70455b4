"""Client of one context daemon: allocate, look up, list, seal and release named buffers.

Torch-free; mapping buffers as tensors is spotserve.daemon.mapping's job (`DaemonClient.attach`
imports it lazily).
"""
from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from spotserve.daemon.paths import socket_path, token_path
from spotserve.daemon.protocol import PROTOCOL_VERSION, BufferInfo, DaemonError, encode_frame, read_frame

if TYPE_CHECKING:
    import torch


class DaemonClient:
    """One connection to a daemon. Not thread-safe: use one client per thread.

    Every call has a timeout (`timeout` seconds) and raises DaemonError with the daemon's error
    code (not_found, exists, no_memory, unauthorized, ...) on failure.
    """

    def __init__(self, socket_file: str | Path, token: str, timeout: float = 30.0):
        self.socket_file = str(socket_file)
        self._token = token
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.socket_file)
        except OSError as e:
            self._sock.close()
            raise DaemonError("disconnected", f"cannot connect to daemon at {self.socket_file}: {e}") from e

    @classmethod
    def connect(cls, name: str, run_dir: str | Path | None = None, timeout: float = 30.0) -> "DaemonClient":
        """Connects to the daemon instance `name`, reading the token file its launcher wrote."""
        token_file = token_path(name, run_dir)
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise DaemonError("disconnected", f"cannot read daemon token {token_file}: {e}") from e
        return cls(socket_path(name, run_dir), token, timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, op: str, **args) -> dict:
        """Sends one request and returns the ok reply; raises DaemonError on an error reply."""
        request_id = next(self._ids)
        message = {"v": PROTOCOL_VERSION, "token": self._token, "op": op, "id": request_id, **args}
        try:
            self._sock.sendall(encode_frame(message))
            reply = read_frame(self._sock)
        except OSError as e:  # includes socket.timeout
            raise DaemonError("disconnected", f"daemon at {self.socket_file}: {e}") from e
        if reply.get("id") != request_id:
            raise DaemonError("bad_reply", f"reply id {reply.get('id')!r} does not match request {request_id}")
        if not reply["ok"]:
            raise DaemonError(str(reply.get("code")), str(reply.get("error")))
        return reply

    def allocate(self, name: str, shape: tuple[int, ...] | list[int], dtype: str) -> BufferInfo:
        """Creates buffer `name` (zero-filled), or returns the existing one if dtype and shape match."""
        from spotserve.daemon.protocol import DTYPE_ITEMSIZE

        if dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_ITEMSIZE)}")
        shape = [int(d) for d in shape]
        nbytes = DTYPE_ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        reply = self.call("allocate", name=name, nbytes=nbytes, dtype=dtype, shape=shape)
        return BufferInfo.from_wire(reply["buffer"])

    def lookup(self, name: str) -> BufferInfo:
        """The buffer called `name`; DaemonError(code="not_found") if there is none."""
        return BufferInfo.from_wire(self.call("lookup", name=name)["buffer"])

    def seal(self, name: str) -> BufferInfo:
        """Marks `name` complete: its contents are valid for a later engine to re-attach."""
        return BufferInfo.from_wire(self.call("seal", name=name)["buffer"])

    def release(self, name: str) -> bool:
        """Frees `name`; returns False if no such buffer existed. Mapped views stay valid (CPU)."""
        return bool(self.call("release", name=name)["released"])

    def list(self) -> list[BufferInfo]:
        """All buffers, sorted by name."""
        return [BufferInfo.from_wire(b) for b in self.call("list")["buffers"]]

    def stats(self) -> dict:
        """Daemon counters: pid, instance, epoch, buffers, bytes_used, requests, errors, stale_removed..."""
        return self.call("stats")["stats"]

    def shutdown(self) -> None:
        """Asks the daemon to free everything and exit."""
        self.call("shutdown")

    def attach(self, info: BufferInfo) -> "torch.Tensor":
        """Maps `info` as a tensor sharing the daemon's memory (no copy); see mapping.attach."""
        from spotserve.daemon.mapping import attach

        return attach(info)
