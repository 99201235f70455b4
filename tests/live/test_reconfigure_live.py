"""A manual reconfiguration of a live cluster (POST /admin/reconfigure) while requests decode: the
migration plan sizes each running request's KV with the tokens it has when migration starts
(Backend.live_tokens / kv_tokens), so the plan's KV bytes are the bytes the executor moves, and its
weight bytes too; every request finishes token-identical, its cache moved, nothing recomputed."""
from __future__ import annotations

import httpx
import pytest

from live_harness import ServiceThread, random_requests, reference
from spotserve.live.service import LiveConfig
from spotserve.planner.types import ParallelConfig

pytestmark = pytest.mark.timeout(240)


def test_manual_reconfigure_moves_the_planned_kv_bytes(live_ckpt, live_profile, tmp_path):
    # block_size 1: the executor moves whole KV blocks, which are then exactly the cached tokens
    cfg = LiveConfig(live_ckpt, live_profile, str(tmp_path / "run"), gpus_per_instance=2, rate=200.0,
                     engine={"block_size": 1, "num_blocks": 1024, "max_batch": 8, "timeout_s": 10.0})
    st = ServiceThread(cfg, ["i0"], api_key="k3y")
    try:
        svc = st.svc
        st.call(lambda: setattr(svc.backend, "step_pause_s", 0.03))
        reqs = random_requests(3, seed=11, out=(70, 80))
        # submitted at once (most likely before the first layout is ready: then they share one batch)
        lrs = st.call(lambda: [svc.submit(p, n) for p, n in reqs])
        want = reference(live_ckpt, reqs)
        st.wait_for(lambda: svc.controller.plan is not None and svc.controller.phase == "serving"
                    and all(rt.ready.is_set() for rt in svc.backend.replicas.values()))
        served = st.call(lambda: svc.controller.plan.config)
        target = ParallelConfig(1, 2, 1, 8) if served != ParallelConfig(1, 2, 1, 8) else ParallelConfig(1, 1, 2, 8)
        st.wait_for(lambda: len(lrs[0].tokens) >= 8)
        with pytest.raises(ValueError, match="needs 4 GPUs, 2 are ready"):
            st.call(svc.reconfigure, ParallelConfig(2, 2, 1, 8))
        headers = {"Authorization": "Bearer k3y"}
        body = {"dp": target.dp, "pp": target.pp, "tp": target.tp, "batch": target.batch}
        r = httpx.post(f"{st.url}/admin/reconfigure", json=body, headers=headers, timeout=30)
        assert r.status_code == 200 and r.json() == {"config": target.short(), "changed": True}
        st.wait_for(lambda: svc.controller.plan.config == target and svc.controller.phase == "serving", 60)
        got = st.wait_all(lrs, 120)
        events = st.call(lambda: list(svc.backend.events))
    finally:
        st.close()
    assert got == want
    asked = [e for e in events if e["event"] == "reconfigure"]
    assert [(e["config"], "refused" in e) for e in asked] == [("D2P2M1B8m1", True), (target.short(), False)]
    conf = next(e for e in events if e["event"] == "configure" and e["config"] == target.short())
    done = next(e for e in events if e["event"] == "configured" and e["config_id"] == conf["config_id"])
    print(served, {k: done[k] for k in ("kv_requests", "planned_bytes", "planned_kv_bytes", "planned_disk_bytes",
                                        "received_bytes", "checkpoint_bytes", "kv_bytes", "kv_moved")})
    # the requests whose cache the plan continues (from dp 2, those of the replica the new one inherits;
    # the others re-prefill their committed tokens)
    resumed_kv = sorted(str(lr.rid) for lr in lrs if [x["how"] for x in lr.resumes] == ["kv"])
    assert resumed_kv and sorted(done["kv_moved"]) == resumed_kv
    assert done["lost_kv"] == [] and done["failed"] == []
    # the plan's KV bytes are the executor's, byte for byte (block_size 1: no padding), and so are its weights
    assert done["kv_bytes"] == done["planned_kv_bytes"] > 0
    assert done["received_bytes"] + done["checkpoint_bytes"] == done["planned_bytes"]
    assert done["checkpoint_bytes"] == done["planned_disk_bytes"] == 0
    for lr in lrs:
        assert [x["how"] for x in lr.resumes] in ([], ["kv"], ["prefill"]) and lr.recomputed == 0
