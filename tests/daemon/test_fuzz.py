"""Fuzzing the daemon's protocol through its socket: random bytes, random msgpack structures,
near-valid requests, garbage streams and bad frame lengths get error replies (or a hang-up after
an unframeable length) and never crash the daemon or corrupt its state."""
from __future__ import annotations

import os
import socket
import struct
import tempfile

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spotserve.daemon import DaemonConfig, DaemonProcess
from spotserve.daemon.protocol import MAX_FRAME, read_frame

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
OPS = ["allocate", "lookup", "list", "release", "seal", "stats", "shutdown"]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = DaemonProcess.start(DaemonConfig(name=f"fuzz{os.getpid()}", capacity_bytes=1 << 20,
                                         run_dir=tempfile.mkdtemp(prefix="sd", dir="/tmp")))
    with d.client() as c:
        c.allocate("keep", (16,), "int32")
        c.attach(c.lookup("keep")).copy_(torch.arange(16, dtype=torch.int32))
    yield d
    assert d.proc.poll() is None, "daemon died during fuzzing"
    assert d.stop() == 0


def exchange(d: DaemonProcess, payload: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d.socket_path))
        s.sendall(struct.pack(">I", len(payload)) + payload)
        return read_frame(s)


def check_reply(reply: dict) -> None:
    assert isinstance(reply["ok"], bool) and reply["v"] == 1
    if not reply["ok"]:
        assert isinstance(reply["code"], str) and isinstance(reply["error"], str)


def check_alive(d: DaemonProcess) -> None:
    """The daemon still answers and the sentinel buffer is untouched."""
    with d.client(timeout=10) as c:
        assert c.stats()["pid"] == d.pid
        info = c.lookup("keep")
        assert c.attach(info).tolist() == list(range(16))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20)


@FUZZ
@given(payload=st.binary(min_size=1, max_size=200))
def test_random_bytes(daemon, payload):
    check_reply(exchange(daemon, payload))
    check_alive(daemon)


@FUZZ
@given(value=msgpack_values)
def test_random_structures(daemon, value):
    reply = exchange(daemon, msgpack.packb(value, use_bin_type=True))
    check_reply(reply)
    assert not reply["ok"]  # no random structure carries the token
    check_alive(daemon)


@FUZZ
@given(data=st.data())
def test_near_valid_requests(daemon, data):
    req = {"v": data.draw(st.sampled_from([1, 1, 1, 0, 2, -1, "1"])),
           "token": data.draw(st.sampled_from([daemon.token, daemon.token, "", daemon.token[:-1] + "x"])),
           "op": data.draw(st.sampled_from(OPS[:-1]) | st.text(max_size=10))}  # never a valid shutdown
    optional = {"id": st.integers(-5, 2**64 - 1) | st.text(max_size=3),
                "name": st.sampled_from(["a", "kv/1", "keep", "", "x" * 300, "bad name", "é"]) | msgpack_values,
                "nbytes": st.integers(-1, 2**64 - 1) | msgpack_values,
                "dtype": st.sampled_from(["float16", "int8", "float32", "complex64", ""]) | msgpack_values,
                "shape": st.lists(st.integers(-1, 2**40), max_size=10) | msgpack_values,
                "extra": msgpack_values}
    for key, strategy in optional.items():
        if data.draw(st.booleans()):
            req[key] = data.draw(strategy)
    if req.get("name") == "keep" and req["op"] in ("release", "allocate"):
        req["name"] = "kept"  # the sentinel must survive
    reply = exchange(daemon, msgpack.packb(req, use_bin_type=True))
    check_reply(reply)
    if reply["ok"] and req["op"] == "allocate":
        with daemon.client() as c:
            assert c.release(req["name"])
    check_alive(daemon)


@FUZZ
@given(stream=st.binary(min_size=1, max_size=300))
def test_unframed_garbage_then_hang_up(daemon, stream):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(daemon.socket_path))
        s.sendall(stream)
    check_alive(daemon)


@pytest.mark.parametrize("length", [0, MAX_FRAME + 1, 2**32 - 1])
def test_bad_frame_length_gets_an_error_then_a_hang_up(daemon, length):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket_path))
        s.sendall(struct.pack(">I", length) + b"\x00" * 16)
        reply = read_frame(s)
        assert reply["ok"] is False and reply["code"] == "bad_frame"
        assert s.recv(1) == b""  # closed: the stream cannot be resynchronised
    check_alive(daemon)


def test_many_requests_in_one_write_are_answered_in_order(daemon):
    reqs = [{"v": 1, "token": daemon.token, "op": "stats", "id": i} for i in range(50)]
    blob = b"".join(struct.pack(">I", len(p)) + p for p in (msgpack.packb(r) for r in reqs))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(daemon.socket_path))
        s.sendall(blob)
        assert [read_frame(s)["id"] for _ in reqs] == list(range(50))
