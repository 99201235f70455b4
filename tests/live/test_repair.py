"""A replica whose workers live but whose configure failed (a peer of its migration died mid-way, a
rendezvous timed out) is reloaded on its own, its batches waiting; failing twice, its instance is
given up and the controller re-plans without it (LiveBackend._repair). Either way no request is lost
and none is sent to a replica that cannot serve."""
from __future__ import annotations

import pytest

from live_harness import ServiceThread, random_requests, reference, single_slot_profile
from spotserve.live import pool as pool_mod
from spotserve.live.service import LiveConfig

pytestmark = pytest.mark.timeout(180)


def _fail_configure(monkeypatch, slot: str, times: int) -> list[int]:
    """The controller's `configure` command to `slot` gets an error reply `times` times."""
    seen = [0]
    call = pool_mod.WorkerConn.call

    async def failing(self, mtype, body, timeout=30.0):
        if mtype == "configure" and self.name == slot and seen[0] < times:
            seen[0] += 1
            raise pool_mod.CommandError(f"{slot}: injected configure failure {seen[0]}")
        return await call(self, mtype, body, timeout)

    monkeypatch.setattr(pool_mod.WorkerConn, "call", failing)
    return seen


def _cluster(live_ckpt, live_profile, tmp_path) -> ServiceThread:
    profile = single_slot_profile(live_profile, tmp_path / "profile.json")  # D2: a replica per instance
    cfg = LiveConfig(live_ckpt, profile, str(tmp_path / "run"), gpus_per_instance=1, rate=200.0, grace_s=1.5)
    return ServiceThread(cfg, ["i0", "i1"], http=False)


def _events(st, name):
    return st.call(lambda: [e for e in st.svc.backend.events if e["event"] == name])


@pytest.mark.parametrize("failures", [1, 2])
def test_a_replica_that_failed_to_configure_is_reloaded_or_given_up(live_ckpt, live_profile, tmp_path, monkeypatch,
                                                                    failures):
    seen = _fail_configure(monkeypatch, "i1/g0", failures)
    st = _cluster(live_ckpt, live_profile, tmp_path)
    try:
        svc = st.svc
        reqs = random_requests(12, seed=7, out=(10, 20))
        lrs = [st.call(svc.submit, p, n) for p, n in reqs]
        got = st.wait_all(lrs, 120)
        assert seen[0] == failures
        assert got == reference(live_ckpt, reqs)  # every request completes, tokens as uninterrupted
        repairs = _events(st, "repair")
        assert [e["replica"] for e in repairs] == [e["replica"] for e in repairs[:1]] and len(repairs) == 1
        assert "injected configure failure 1" in repairs[0]["why"]
        if failures == 1:  # the reload worked: both replicas serve
            assert _events(st, "unservable") == []
            served = {e["replica"] for e in _events(st, "batch_done")}
            assert served == {0, 1}
            assert st.call(lambda: all(rt.failed is None for rt in svc.backend.replicas.values()))
        else:  # failed again: its instance is given up and the controller serves on the other one
            assert [e["workers"] for e in _events(st, "unservable")] == [["i1/g0"]]
            st.wait_for(lambda: [i.name for i in svc.controller.instances.ready()] == ["i0"], 30)
            assert [e["instance"] for e in _events(st, "reclaim")] == ["i1"]
        assert _events(st, "batch_error") == []  # no batch was sent to a replica that could not serve
    finally:
        st.close()
