"""SpotNoticePoller against a local imitation of the EC2 instance-metadata service (IMDSv2 token flow)."""
from __future__ import annotations

import asyncio
import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spotserve.cloud.aws import SpotNoticePoller, parse_instance_action


class FakeIMDS:
    """404 on instance-action until `schedule(t)`; tokens from PUT /latest/api/token; `revoke()` expires them."""

    def __init__(self):
        self.tokens: set[str] = set()
        self.action: dict | None = None
        self.log: list[tuple[str, str, int]] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, body=b""):
                outer.log.append((self.command, self.path, code))
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                if self.path != "/latest/api/token" or not ttl or not 1 <= int(ttl) <= 21600:
                    return self._reply(400)
                tok = f"tok{len(outer.tokens)}"
                outer.tokens.add(tok)
                self._reply(200, tok.encode())

            def do_GET(self):
                if self.headers.get("X-aws-ec2-metadata-token") not in outer.tokens:
                    return self._reply(401)
                if self.path != "/latest/meta-data/spot/instance-action":
                    return self._reply(404)
                if outer.action is None:
                    return self._reply(404, b"Not Found")
                self._reply(200, json.dumps(outer.action).encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def schedule(self, unix_t: float, action: str = "terminate"):
        self.action = {"action": action,
                       "time": datetime.fromtimestamp(unix_t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def revoke(self):
        self.tokens.clear()


@pytest.mark.timeout(30)
def test_poller_token_flow_and_one_notice_per_action():
    imds = FakeIMDS()
    now = [1_700_000_000.0]
    poller = SpotNoticePoller(imds.url, interval_s=0.05, clock=lambda: now[0])
    notices = []

    async def go():
        stop = asyncio.Event()
        task = asyncio.ensure_future(poller.run(notices.append, stop))
        await asyncio.sleep(0.3)
        assert notices == []  # 404: nothing scheduled
        imds.revoke()  # token expired: the poller must renew it, not fail
        await asyncio.sleep(0.2)
        imds.schedule(now[0] + 120)
        await asyncio.sleep(0.4)
        stop.set()
        await task

    asyncio.run(go())
    assert notices == [pytest.approx(120.0)]  # once, with the two-minute grace
    puts = [e for e in imds.log if e[0] == "PUT"]
    assert len(puts) == 2 and all(code == 200 for _, _, code in puts)
    assert any(code == 401 for m, _, code in imds.log if m == "GET")  # the revoked token was refused once
    imds.server.shutdown()


def test_parse_instance_action_errors_name_the_field():
    a = parse_instance_action({"action": "stop", "time": "2024-01-01T00:02:00Z"})
    assert a.action == "stop" and a.time == datetime(2024, 1, 1, 0, 2, tzinfo=timezone.utc).timestamp()
    with pytest.raises(ValueError, match="'action'"):
        parse_instance_action({"action": "reboot", "time": "2024-01-01T00:02:00Z"})
    with pytest.raises(ValueError, match="'time'"):
        parse_instance_action({"action": "terminate", "time": "soon"})
