"""AWS spot interruption notices: poll the instance-metadata `spot/instance-action` endpoint (IMDSv2).

On a spot instance, http://169.254.169.254/latest/meta-data/spot/instance-action answers 404 until
EC2 schedules the interruption, then 200 with {"action": "terminate"|"stop"|"hibernate", "time":
"2024-01-01T00:02:00Z"}, about two minutes ahead. IMDSv2 needs a session token first: PUT
/latest/api/token with header X-aws-ec2-metadata-token-ttl-seconds, then every GET carries
X-aws-ec2-metadata-token; an expired token gets 401 and is renewed. The poller calls
`on_notice(grace_s)` once per announced interruption (grace measured to the announced time).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

log = logging.getLogger("spotserve.cloud.aws")
IMDS_URL = "http://169.254.169.254"
ACTIONS = ("terminate", "stop", "hibernate")


@dataclass(frozen=True)
class InstanceAction:
    """A scheduled interruption: what happens and when (Unix seconds)."""

    action: str
    time: float


def parse_instance_action(data) -> InstanceAction:
    """Parse the endpoint's JSON body; ValueError naming the bad field."""
    if not isinstance(data, dict):
        raise ValueError("instance-action: body must be a JSON object")
    action = data.get("action")
    if action not in ACTIONS:
        raise ValueError(f"instance-action: field 'action' must be one of {ACTIONS}, got {action!r}")
    raw = data.get("time")
    if not isinstance(raw, str):
        raise ValueError(f"instance-action: field 'time' must be an ISO-8601 string, got {raw!r}")
    try:
        t = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"instance-action: field 'time' is not ISO-8601: {raw!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return InstanceAction(action, t.timestamp())


class SpotNoticePoller:
    """Polls one instance's metadata service; `base_url` is the IMDS root (a local imitation in tests)."""

    def __init__(self, base_url: str = IMDS_URL, interval_s: float = 5.0, token_ttl_s: int = 21600,
                 timeout_s: float = 2.0, clock=time.time):
        if interval_s <= 0 or not 1 <= token_ttl_s <= 21600:
            raise ValueError("interval_s must be > 0 and token_ttl_s in 1..21600")
        self.base_url = base_url.rstrip("/")
        self.interval_s, self.token_ttl_s, self.timeout_s = interval_s, token_ttl_s, timeout_s
        self.clock = clock
        self._token: str | None = None
        self._token_expiry = 0.0
        self.seen: InstanceAction | None = None
        self.polls = 0

    async def _get_token(self, client: httpx.AsyncClient) -> str:
        if self._token is None or self.clock() > self._token_expiry - 30:
            r = await client.put(f"{self.base_url}/latest/api/token",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl_s)})
            r.raise_for_status()
            self._token = r.text.strip()
            self._token_expiry = self.clock() + self.token_ttl_s
        return self._token

    async def poll_once(self, client: httpx.AsyncClient) -> InstanceAction | None:
        """One look at the endpoint: the scheduled action, or None (404). Renews the token on 401."""
        self.polls += 1
        for attempt in range(2):
            token = await self._get_token(client)
            r = await client.get(f"{self.base_url}/latest/meta-data/spot/instance-action",
                                 headers={"X-aws-ec2-metadata-token": token})
            if r.status_code == 401 and attempt == 0:
                self._token = None  # expired or revoked: fetch a new one and retry once
                continue
            if r.status_code == 404:
                return None
            r.raise_for_status()
            return parse_instance_action(r.json())
        return None

    async def run(self, on_notice, stop: asyncio.Event | None = None) -> None:
        """Poll until `stop`; call on_notice(grace_s) once for each newly announced action."""
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            while stop is None or not stop.is_set():
                try:
                    action = await self.poll_once(client)
                except (httpx.HTTPError, ValueError) as exc:
                    log.warning("instance-action poll failed: %s", exc)
                    action = None
                if action is not None and action != self.seen:
                    self.seen = action
                    on_notice(max(0.0, action.time - self.clock()))
                try:
                    await asyncio.wait_for(stop.wait(), self.interval_s) if stop else \
                        await asyncio.sleep(self.interval_s)
                except asyncio.TimeoutError:
                    pass
