"""HTTP API over a stand-in service: OpenAI-shaped answers, SSE framing, 4xx with a message, API key."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from spotserve.api.app import create_app
from spotserve.live.metrics import Metrics
from spotserve.live.requests import LiveRequest
from spotserve.live.state import StateStore


class StandIn:
    """What create_app needs of a LiveService; `submit` 'generates' prompt[-1]+1, +2, ... at once."""

    def __init__(self, tmp_path):
        self.config = SimpleNamespace(model_dir=str(tmp_path / "tiny-model"))
        self.spec = SimpleNamespace(max_positions=32, vocab=100)
        self.store = StateStore(tmp_path / "state.sqlite")
        self.metrics = Metrics()
        self.controller = SimpleNamespace(plan=SimpleNamespace(config=SimpleNamespace(short=lambda: "D1P1M1B4m1")),
                                          phase="serving", instances=SimpleNamespace(instances={}))
        self.rm = SimpleNamespace(queued=0, n_running=0)
        self.pool = SimpleNamespace(conns={}, alive=lambda name: None)
        self.n = 0
        self.params = []

    def submit(self, prompt, max_tokens, temperature=0.0, top_p=1.0, seed=0):
        if len(prompt) + max_tokens - 1 > self.spec.max_positions:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens {max_tokens} exceeds the model's 32 positions")
        self.params.append((temperature, top_p, seed))
        lr = LiveRequest(self.n, prompt, {"max_new_tokens": max_tokens})
        self.store.add(lr.sid, prompt, lr.params)
        self.n += 1
        for i in range(max_tokens):
            lr.accept(i, (prompt[-1] + 1 + i) % 100)
            self.store.commit(lr.sid, i, [lr.tokens[-1]])
        return lr

    def refresh_metrics(self):
        self.metrics.refresh(0, 0, None, {"ready": 1})


@pytest.fixture
def client(tmp_path):
    return TestClient(create_app(StandIn(tmp_path)))


def test_completion_models_health_metrics(client):
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0, "seed": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-model"
    assert body["choices"][0]["token_ids"] == [4, 5, 6, 7] and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert client.get("/v1/requests/0").json()["status"] == "running"
    assert client.get("/v1/models").json()["data"][0] == {"id": "tiny-model", "object": "model",
                                                           "owned_by": "spotserve", "max_model_len": 32}
    assert client.get("/health").json()["config"] == "D1P1M1B4m1"
    assert "spotserve_queue_length 0.0" in client.get("/metrics").text


def test_stream_is_sse_one_token_per_event(client):
    with client.stream("POST", "/v1/completions", json={"prompt": [9], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert [e["choices"][0]["token_ids"] for e in events] == [[10], [11], [12]]
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, "length"]


@pytest.mark.parametrize("body, code, message", [
    ({"prompt": [1] * 30, "max_tokens": 10}, 400, "exceeds the model's 32 positions"),
    ({"prompt": "hello"}, 400, "no tokenizer"),
    ({"prompt": [1], "max_tokens": 0}, 422, "max_tokens"),
    ({"prompt": [1], "top_p": 0}, 422, "top_p"),
    ({"prompt": [1], "n": 2}, 422, "n"),
    ({"prompt": [1], "logprobs": 3}, 422, "logprobs"),
    ({"max_tokens": 3}, 422, "prompt"),
    ({"prompt": [1], "model": "other"}, 404, "not served here"),
])
def test_bad_bodies_get_4xx_with_a_message(client, body, code, message):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == code
    assert message in json.dumps(r.json())


def test_unparsable_json_is_a_4xx(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


def test_api_key(tmp_path):
    c = TestClient(create_app(StandIn(tmp_path), api_key="s3cret"))
    assert c.post("/v1/completions", json={"prompt": [1], "max_tokens": 1}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200  # health stays open for load balancers
