"""The live profile's link bandwidth is the worker-to-worker gloo point-to-point figure (live/p2p.py),
the path the migration executor moves weights and KV on: no relay through the controller, not halved."""
from __future__ import annotations

import json

import pytest

from spotserve.live.p2p import measure_p2p
from spotserve.planner.cost import CostModel


@pytest.mark.timeout(120)
def test_p2p_between_two_processes():
    bw, rtt = measure_p2p(nbytes=1 << 20, reps=2, pings=5)
    assert bw > 1e6 and 0 < rtt < 1.0  # loopback: far above 1 MB/s, a round trip well under a second


def test_profile_bandwidth_is_the_measured_link(live_profile):
    prof = json.loads(open(live_profile).read())
    link = prof["link"]
    assert link["method"].startswith("gloo send/recv between two processes")
    bw = prof["bandwidth"]
    assert bw["intra_bytes_per_s"] == bw["inter_bytes_per_s"] == link["bytes_per_s"] > 0
    assert prof["pp_incr_comm"] == prof["pp_init_comm"] > 0 and link["round_trip_s"] > 0
    assert CostModel.from_profile(live_profile).bandwidth["inter_bytes_per_s"] == link["bytes_per_s"]
