"""A replica a plan leaves unchanged keeps decoding through another instance's preemption
(LiveBackend.keeps_unchanged_replicas): its workers are not reconfigured, its batch is not stopped."""
from __future__ import annotations

import pytest

from live_harness import ServiceThread, reference, single_slot_profile
from spotserve.live.service import LiveConfig

pytestmark = pytest.mark.timeout(180)


def test_request_on_an_untouched_replica_decodes_straight_through_a_preemption(live_ckpt, live_profile, tmp_path):
    # The measured profile with tensor and pipeline parallelism made costly, so the optimizer's choice
    # does not hang on this machine's timings: one single-slot replica per instance (D4, then D3). One
    # replica decodes a long request while an idle instance gets the notice.
    cfg = LiveConfig(live_ckpt, single_slot_profile(live_profile, tmp_path / "profile.json"), str(tmp_path / "run"),
                     gpus_per_instance=1, rate=200.0, grace_s=1.5)
    st = ServiceThread(cfg, ["i0", "i1", "i2", "i3"], http=False)
    try:
        svc = st.svc
        st.wait_for(lambda: svc.controller.plan is not None and len(svc.backend.replicas) == 4
                    and all(rt.ready.is_set() for rt in svc.backend.replicas.values()))
        st.call(lambda: setattr(svc.backend, "step_pause_s", 0.03))  # a long request: ~100 steps
        prompt, n = [5, 17, 42, 99, 3, 64, 7, 11], 100
        lr = st.call(svc.submit, prompt, n)
        st.wait_for(lambda: len(lr.tokens) >= 5)
        busy = st.call(lambda: [rt.slots for rt in svc.backend.replicas.values() if rt.batch is not None])
        assert len(busy) == 1 and len(busy[0]) == 1
        victim = next(i for i in ("i0", "i1", "i2", "i3") if f"{i}/g0" not in busy[0])
        assert st.call(lambda: svc.controller.reconfigurations) == 0  # the start set's layout is warm
        before = len(lr.tokens)
        st.call(svc.notice, victim, 1.5)
        st.wait_for(lambda: any(e["event"] == "reclaim" for e in svc.backend.events), timeout=30)
        st.wait_for(lambda: svc.backend.plans_done >= 2, timeout=30)
        during = len(lr.tokens) - before
        out = st.wait_all([lr], timeout=60)[0]
        configure = [e for e in st.call(lambda: list(svc.backend.events)) if e["event"] == "configure"]
        plans = [(e["trigger"], e["config"], e["kept"], e["transfers"]) for e in st.call(lambda: svc.log.of("plan"))]
        # the busy replica was kept
        assert len(configure) >= 2 and configure[-1]["kept"], (plans, [c["replicas"] for c in configure])
        assert svc.controller.reconfigurations == 1
        # never stopped nor resumed
        assert lr.resumes == [] and svc.rm.requests[lr.rid].interruptions == 0, (plans, configure[-1]["kept"], busy)
        assert lr.recomputed == 0 and lr.reprefilled == 0
        assert during >= 10  # it kept committing tokens between the notice and the new configuration
        gaps = sorted(b - a for a, b in zip(lr.token_wall, lr.token_wall[1:]))
        median = gaps[len(gaps) // 2]
        assert lr.max_gap() < max(0.3, 6 * median), (lr.max_gap(), median)  # no stall beyond step jitter
        assert out == reference(live_ckpt, [(prompt, n)])[0]
    finally:
        st.close()
