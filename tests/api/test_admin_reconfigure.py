"""POST /admin/reconfigure over a stand-in service: the config reaches LiveService.reconfigure, bad bodies
and refused configs get a 4xx with a message, the API key protects it."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from spotserve.api.app import create_app
from spotserve.planner.types import ParallelConfig


class StandIn:
    """What create_app needs; `reconfigure` refuses configs over 4 GPUs as the controller would."""

    def __init__(self, tmp_path):
        self.config = SimpleNamespace(model_dir=str(tmp_path / "tiny-model"))
        self.served = ParallelConfig(1, 1, 2, 8)
        self.calls: list[tuple[ParallelConfig, str]] = []

    def reconfigure(self, config: ParallelConfig, reason: str = "manual") -> bool:
        if config.world_size > 4:
            raise ValueError(f"reconfigure: {config.short()} needs {config.world_size} GPUs, 4 are ready")
        self.calls.append((config, reason))
        changed, self.served = config != self.served, config
        return changed


def test_reconfigure_reaches_the_service(tmp_path):
    svc = StandIn(tmp_path)
    c = TestClient(create_app(svc))
    r = c.post("/admin/reconfigure", json={"dp": 1, "pp": 2, "tp": 1, "batch": 8})
    assert r.status_code == 200 and r.json() == {"config": "D1P2M1B8m1", "changed": True}
    r = c.post("/admin/reconfigure", json={"dp": 1, "pp": 2, "tp": 1, "batch": 8, "micro_batches": 1})
    assert r.json() == {"config": "D1P2M1B8m1", "changed": False}  # served already
    assert svc.calls == [(ParallelConfig(1, 2, 1, 8), "manual")] * 2


@pytest.mark.parametrize("body, code, message", [
    ({"dp": 1, "pp": 1, "tp": 2, "batch": 6, "micro_batches": 4}, 400, "not a multiple of micro_batches"),
    ({"dp": 2, "pp": 2, "tp": 2, "batch": 8}, 409, "needs 8 GPUs, 4 are ready"),
    ({"dp": 0, "pp": 1, "tp": 1, "batch": 8}, 422, "dp"),
    ({"pp": 1, "tp": 1, "batch": 8}, 422, "dp"),
    ({"dp": 1, "pp": 1, "tp": 1, "batch": 8, "gpus": 3}, 422, "gpus"),
    ({"dp": 1, "pp": 1, "tp": "two", "batch": 8}, 422, "tp"),
])
def test_bad_bodies_and_refused_configs_get_4xx_with_a_message(tmp_path, body, code, message):
    svc = StandIn(tmp_path)
    r = TestClient(create_app(svc)).post("/admin/reconfigure", json=body)
    assert r.status_code == code
    assert message in json.dumps(r.json())
    assert svc.calls == []


def test_reconfigure_needs_the_api_key(tmp_path):
    svc = StandIn(tmp_path)
    c = TestClient(create_app(svc, api_key="s3cret"))
    body = {"dp": 1, "pp": 2, "tp": 1, "batch": 8}
    assert c.post("/admin/reconfigure", json=body).status_code == 401
    assert c.post("/admin/reconfigure", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert svc.calls == []
    assert c.post("/admin/reconfigure", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert svc.calls == [(ParallelConfig(1, 2, 1, 8), "manual")]
