"""Wire protocol: round trips, authentication, and survival of malformed frames."""
import socket
import struct
import threading

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spotserve.live import protocol as P

TOKEN = b"secret-token"


def test_round_trip_over_socketpair():
    a, b = socket.socketpair()
    msg = P.Message("tokens", {"config_id": 3, "step": 7, "tokens": {"r1": 42, "r2": 7}}, seq=11)
    P.send(a, msg, TOKEN)
    got = P.recv(b, TOKEN)
    assert (got.type, got.seq, got.body) == ("tokens", 11, msg.body)


def test_wrong_token_is_rejected():
    frame = P.encode(P.Message("ping"), TOKEN)
    n = struct.unpack(">I", frame[:4])[0]
    with pytest.raises(P.ProtocolError, match="bad MAC"):
        P.decode_body(frame[4:36], frame[36:36 + n], b"other-token")


@pytest.mark.parametrize("body,match", [
    ({"type": "ping", "seq": 0, "body": {}}, "keys"),
    ({"v": 99, "type": "ping", "seq": 0, "body": {}}, "version"),
    ({"v": 1, "type": "nope", "seq": 0, "body": {}}, "unknown message type"),
    ({"v": 1, "type": "step", "seq": 0, "body": {"config_id": 1}}, "missing field 'step'"),
    ({"v": 1, "type": "step", "seq": 0, "body": {"config_id": True, "step": 1}}, "config_id"),
])
def test_schema_violations(body, match):
    raw = msgpack.packb(body)
    import hashlib
    import hmac
    mac = hmac.new(TOKEN, raw, hashlib.sha256).digest()
    with pytest.raises(P.ProtocolError, match=match):
        P.decode_body(mac, raw, TOKEN)


def test_oversized_frame_refused_before_reading_it():
    a, b = socket.socketpair()
    a.sendall(struct.pack(">I", P.MAX_FRAME + 1))
    with pytest.raises(P.ProtocolError, match="exceeds"):
        P.recv(b, TOKEN)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bodies_only_raise_protocol_errors(data):
    import hashlib
    import hmac
    mac = hmac.new(TOKEN, data, hashlib.sha256).digest()
    try:
        P.decode_body(mac, data, TOKEN)
    except P.ProtocolError:
        pass


def test_server_loop_survives_garbage_and_keeps_serving():
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    errors = []

    def serve():
        for _ in range(2):
            conn, _ = srv.accept()
            with conn:
                try:
                    msg = P.recv(conn, TOKEN)
                    P.send(conn, P.Message("pong", seq=msg.seq), TOKEN)
                except P.ProtocolError as exc:
                    errors.append(str(exc))
                    P.send(conn, P.Message("error", {"message": str(exc)}), TOKEN)

    t = threading.Thread(target=serve)
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.sendall(struct.pack(">I", 3) + b"\0" * 32 + b"abc")
        assert P.recv(c, TOKEN).type == "error"
    with socket.create_connection(("127.0.0.1", port)) as c:
        P.send(c, P.Message("ping", seq=5), TOKEN)
        reply = P.recv(c, TOKEN)
    t.join(5)
    assert reply.type == "pong" and reply.seq == 5
    assert len(errors) == 1 and "MAC" in errors[0]
