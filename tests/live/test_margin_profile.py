"""The reconfiguration margin a measured live profile carries, and the live service planning with it."""
from __future__ import annotations

import json

import pytest

from spotserve.controller.policy import profile_margin_s
from spotserve.live.profile import MIN_CONFIGURE_S, reconfigure_margin


def test_measured_profile_carries_a_margin_the_policy_reads(live_profile):
    prof = json.loads(open(live_profile).read())
    m = prof["reconfigure_margin_s"]
    assert m >= reconfigure_margin(0.0) == pytest.approx(0.3 + 2 * MIN_CONFIGURE_S)
    assert profile_margin_s(live_profile) == m
    assert "reconfigure_margin_s" in prof["derived"]


def test_margin_formula():
    assert reconfigure_margin(0.05) == reconfigure_margin(MIN_CONFIGURE_S) == 0.7
    assert reconfigure_margin(1.0) == 2.3
