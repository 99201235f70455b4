"""Live-cluster fixtures: a tiny random fp32 checkpoint and a cost-model profile measured on this machine."""
from __future__ import annotations

import json

import pytest

from spotserve.models import get_spec
from spotserve.models.checkpoint import write_random_checkpoint


@pytest.fixture(scope="session")
def live_ckpt(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("live-ckpt") / "opt-tiny"
    write_random_checkpoint(get_spec("opt-tiny"), root, seed=0, dtype="fp32")
    return str(root)


@pytest.fixture(scope="session")
def live_profile(live_ckpt, tmp_path_factory) -> str:
    from spotserve.live.profile import measure

    path = tmp_path_factory.mktemp("live-profile") / "profile.json"
    path.write_text(json.dumps(measure(live_ckpt, steps=4)))
    return str(path)
