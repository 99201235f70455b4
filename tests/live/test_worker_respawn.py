"""A worker process SIGKILLed alone (engine setting "daemon" on, its instance not reclaimed): the service
restarts it on its slot, it re-attaches its shards from the slot's daemon, and the controller re-forms
its tp=2 replica with the same layout; every request completes token-identical, nothing is read from
the checkpoint and the instance stays."""
from __future__ import annotations

import json
import os
import signal

import pytest

from live_harness import ServiceThread, random_requests, reference
from spotserve.live.profile import reconfigure_margin
from spotserve.live.service import LiveConfig
from spotserve.models import get_spec

SPEC = get_spec("opt-tiny")


def _profile() -> dict:
    """tp 2 fastest; 500 kB per slot: one slot cannot hold the model, so one instance serves D1M2."""
    d = {"name": "synthetic-tiny", "model": "opt-tiny", "layer_num": SPEC.num_layers, "dtype": "fp32",
         "init_tokens": 16, "final_fix_factor": 1.0, "embed": [], "pp_init_comm": 20.0, "pp_incr_comm": 20.0,
         "gpu_memory_bytes": 500_000, "gpus_per_instance": 2, "reserved_bytes": 0,
         "bandwidth": {"intra_bytes_per_s": 1e9, "inter_bytes_per_s": 1e9, "disk_bytes_per_s": 1e8},
         "reconfigure_margin_s": reconfigure_margin(0.5)}
    for tp, f in ((1, 8.0), (2, 4.0)):
        d[f"tp-{tp}"] = {f"bsz-{b}": {"init": f * (1 + 0.2 * b), "incr": f * (0.5 + 0.05 * b)} for b in (1, 2, 4, 8)}
    return d


def _serving(st: ServiceThread) -> bool:
    svc = st.svc
    plan = svc.controller.plan
    return (plan is not None and plan.config.short().startswith("D1P1M2") and svc.controller.phase == "serving"
            and all(rt.ready.is_set() and not rt.failed for rt in svc.backend.replicas.values()))


@pytest.mark.timeout(120)
def test_sigkilled_worker_is_respawned_and_its_replica_reformed(live_ckpt, tmp_path):
    (tmp_path / "profile.json").write_text(json.dumps(_profile()))
    engine = {"block_size": 8, "num_blocks": 128, "max_batch": 8, "timeout_s": 5.0, "daemon": True}
    cfg = LiveConfig(live_ckpt, str(tmp_path / "profile.json"), str(tmp_path / "run"), gpus_per_instance=2,
                     rate=2.0, engine=engine, respawn_timeout_s=40.0)
    reqs = random_requests(4, seed=23, out=(60, 70))
    want = reference(live_ckpt, reqs)
    st = ServiceThread(cfg, ["i0"], http=False)
    svc = st.svc
    try:
        st.wait_for(lambda: _serving(st), 60)
        first = st.call(lambda: len(svc.backend.migrations))
        st.call(lambda: setattr(svc.backend, "step_pause_s", 0.02))
        lrs = [st.call(svc.submit, p, n) for p, n in reqs]
        st.wait_for(lambda: all(len(lr.tokens) >= 3 for lr in lrs), 60)
        victim = "i0/g1"
        old_pid = st.call(lambda: svc.launcher.pid(victim))
        os.kill(old_pid, signal.SIGKILL)  # the worker process alone: its instance and daemon live on
        st.wait_for(lambda: any(e["event"] == "worker_restarted" for e in svc.backend.events), 60)
        st.call(lambda: setattr(svc.backend, "step_pause_s", 0.0))
        got = st.wait_all(lrs, 90)
        st.wait_for(lambda: _serving(st), 30)
        events = st.call(lambda: list(svc.backend.events))
        restarted = [e for e in events if e["event"] == "worker_restarted"]
        print("restart:", restarted, [e for e in events if e["event"] in ("respawn_failed", "batch_error")])
        assert got == want  # token-identical to an uninterrupted run
        assert [e["worker"] for e in restarted] == [victim] and restarted[0]["pid"] != old_pid
        assert restarted[0]["holds"] and restarted[0]["attached_bytes"] > 0
        assert not [e for e in events if e["event"] in ("reclaim", "respawn_failed")]
        assert "i0" in svc.instances and svc.controller.instances.instances["i0"].state == "ready"
        again = st.call(lambda: list(svc.backend.migrations[first:]))
        assert again, "the replica was not re-formed"
        m = again[-1]
        print("re-formed:", {k: m.get(k) for k in ("config_id", "old", "live", "checkpoint_bytes", "loaded_bytes", "received_bytes")})
        assert m["checkpoint_bytes"] == m["loaded_bytes"] == 0
        assert m["workers"][victim]["checkpoint_bytes"] == 0
        assert any(lr.resumes for lr in lrs), "the crash interrupted no running request"
    finally:
        st.close()
