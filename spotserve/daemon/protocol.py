"""Wire format of the context daemon (v1): 4-byte big-endian length, then a msgpack map.

Mirrors csrc/daemon/protocol.h; the daemon is the authority on validation, this side only
frames, encodes and turns replies into BufferInfo / DaemonError.
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
# Replies can be larger than requests (list of thousands of KV blocks).
MAX_REPLY = 256 << 20
DTYPE_ITEMSIZE = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1, "int16": 2, "int32": 4, "int64": 8, "bool": 1,
}


class DaemonError(RuntimeError):
    """An error reply from the daemon (`code` is the protocol's error code) or a broken connection."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class BufferInfo:
    """Everything needed to map one daemon buffer: `kind` is "shm" (handle = shm name) or
    "cuda_ipc" (handle = 64-byte CUDA IPC handle, device = ordinal)."""

    name: str
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    sealed: bool
    kind: str
    handle: str | bytes
    device: int
    offset: int
    epoch: str

    @classmethod
    def from_wire(cls, d: dict) -> "BufferInfo":
        """Builds a BufferInfo from a reply's `buffer` map; raises DaemonError if fields are missing."""
        try:
            return cls(name=d["name"], nbytes=int(d["nbytes"]), dtype=d["dtype"], shape=tuple(d["shape"]),
                       sealed=bool(d["sealed"]), kind=d["kind"], handle=d["handle"], device=int(d["device"]),
                       offset=int(d["offset"]), epoch=d["epoch"])
        except (KeyError, TypeError, ValueError) as e:
            raise DaemonError("bad_reply", f"malformed buffer description {d!r}: {e}") from e


def encode_frame(message: dict) -> bytes:
    """msgpack-encodes `message` and prefixes its length; raises ValueError past MAX_FRAME."""
    payload = msgpack.packb(message, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"request of {len(payload)} bytes exceeds the protocol's {MAX_FRAME}-byte frame limit")
    return struct.pack(">I", len(payload)) + payload


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise DaemonError("disconnected", "daemon closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket) -> dict:
    """Reads one reply; raises DaemonError on a closed socket or an undecodable reply."""
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if not 0 < length <= MAX_REPLY:
        raise DaemonError("bad_reply", f"reply frame length {length} out of range")
    try:
        reply = msgpack.unpackb(_recv_exact(sock, length), raw=False)
    except (ValueError, msgpack.UnpackException) as e:
        raise DaemonError("bad_reply", f"undecodable reply: {e}") from e
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise DaemonError("bad_reply", f"reply is not a map with a boolean 'ok': {reply!r}")
    return reply
