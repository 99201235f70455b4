"""Controller <-> worker messages: length-prefixed msgpack frames, versioned and HMAC-authenticated.

Frame on the wire: 4-byte big-endian body length | 32-byte HMAC-SHA256(token, body) | body, where
body is a msgpack map {"v": VERSION, "type": str, "seq": int, "body": map}. Only plain msgpack
types are decoded (no ext types, no pickle), so a peer can send data but never code. Each message
type has a schema (required fields and their types); anything else is a ProtocolError, which a
server answers with an error reply and survives.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass, field

import msgpack

VERSION = 1
MAX_FRAME = 64 << 20  # control messages only; tensors travel over torch.distributed or shm
_HEADER = struct.Struct(">I")
_MAC_LEN = 32

# type -> {field: allowed python types}; extra fields are allowed (forward compatibility).
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    # worker -> controller
    "hello": {"worker": (str,), "pid": (int,)},
    "ping": {},
    "pong": {},
    "ok": {},
    "error": {"message": (str,)},
    "tokens": {"config_id": (int,), "step": (int,), "tokens": (dict,)},
    # reply to "export": the worker parks the KV pieces of the asked requests locally (the migration
    # executor moves them worker to worker later); `pieces` stays for compatibility and is now always
    # empty, `parked` maps request id -> cached positions of its piece here (nil: none held)
    "kv": {"pieces": (dict,), "parked": (dict,)},
    "progress": {"config_id": (int,), "layer": (int,), "done": (bool,)},
    # controller -> worker
    # optional "migration" (live/migrate.py migration_msg / parse_migration), the same map for every
    # participant: "old" and "new" layouts of the replicas that change ({"shapes": [[replica, pp, tp]],
    # "placement": [[replica, stage, shard, slot]], "block_size"}; "old" nil: all from the checkpoint),
    # the planner's "transfers" ([src|nil, dst, tensor, layer, slice|nil, nbytes, request|nil, elems|nil]),
    # the "requests" whose KV moves ([id, old replica, new replica, cached positions]), the "live" old
    # slots that still hold context, and "ranks" (slot -> rank in the migration's process group)
    "configure": {"config_id": (int,), "config": (dict,), "position": (dict, type(None))},
    "add_requests": {"requests": (list,)},
    "step": {"config_id": (int,), "step": (int,)},
    "export": {"ids": (list,), "release": (bool,)},
    "release": {"ids": (list,)},
    "migrate": {"config_id": (int,), "transfers": (list,)},
    "shutdown": {},
    # agent (per-host launcher, see live/agent.py) <-> controller
    "spawn": {"instance": (str,), "slots": (int,)},
    "kill": {"instance": (str,)},
}


class ProtocolError(ValueError):
    """A frame or message that does not follow the protocol (bad size, MAC, version or schema)."""


@dataclass
class Message:
    type: str
    body: dict = field(default_factory=dict)
    seq: int = 0

    def validate(self) -> "Message":
        schema = SCHEMAS.get(self.type)
        if schema is None:
            raise ProtocolError(f"unknown message type {self.type!r}")
        if not isinstance(self.body, dict):
            raise ProtocolError(f"{self.type}: body must be a map")
        for name, types in schema.items():
            if name not in self.body:
                raise ProtocolError(f"{self.type}: missing field {name!r}")
            value = self.body[name]
            # bool is an int subclass; refuse it where an int is expected.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise ProtocolError(f"{self.type}: field {name!r} has type {type(value).__name__}")
        return self


def encode(msg: Message, token: bytes) -> bytes:
    """Serialise and sign one message; raises ProtocolError if it does not match its schema."""
    msg.validate()
    body = msgpack.packb({"v": VERSION, "type": msg.type, "seq": msg.seq, "body": msg.body}, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    mac = hmac.new(token, body, hashlib.sha256).digest()
    return _HEADER.pack(len(body)) + mac + body


def decode_body(mac: bytes, body: bytes, token: bytes) -> Message:
    """Check the MAC, then parse and validate a body. Raises ProtocolError."""
    if not hmac.compare_digest(mac, hmac.new(token, body, hashlib.sha256).digest()):
        raise ProtocolError("bad MAC: wrong token or corrupted frame")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"undecodable body: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {"v", "type", "seq", "body"}:
        raise ProtocolError("body must be a map with keys v, type, seq, body")
    if raw["v"] != VERSION:
        raise ProtocolError(f"protocol version {raw['v']!r}, expected {VERSION}")
    if not isinstance(raw["type"], str) or not isinstance(raw["seq"], int):
        raise ProtocolError("type must be a string and seq an integer")
    return Message(raw["type"], raw["body"], raw["seq"]).validate()


def _check_length(n: int) -> None:
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes exceeds {MAX_FRAME}")


# --- blocking sockets (workers) ----------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def send(sock: socket.socket, msg: Message, token: bytes) -> None:
    sock.sendall(encode(msg, token))


def recv(sock: socket.socket, token: bytes) -> Message:
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    _check_length(n)
    mac = _recv_exact(sock, _MAC_LEN)
    return decode_body(mac, _recv_exact(sock, n), token)


# --- asyncio streams (controller) --------------------------------------------------------------
async def asend(writer: asyncio.StreamWriter, msg: Message, token: bytes) -> None:
    writer.write(encode(msg, token))
    await writer.drain()


async def arecv(reader: asyncio.StreamReader, token: bytes) -> Message:
    (n,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    _check_length(n)
    mac = await reader.readexactly(_MAC_LEN)
    return decode_body(mac, await reader.readexactly(n), token)
