"""A live cluster on CPU (tiny model, 2 worker processes per instance): preemptions with notice, an
acquisition, SIGKILLs without notice, SSE streaming and HTTP load across them. One cluster serves
the tests of this module in order (starting worker processes is the expensive part); each test
acquires the instances the next one needs in the background."""
from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest

from live_harness import ServiceThread, random_requests, reference
from spotserve.cloud.availability import parse_availability_lines
from spotserve.live.replay import schedule_trace
from spotserve.live.service import LiveConfig

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def cluster(live_ckpt, live_profile, tmp_path_factory):
    cfg = LiveConfig(live_ckpt, live_profile, str(tmp_path_factory.mktemp("live-run")), gpus_per_instance=2,
                     rate=200.0, grace_s=2.0, heartbeat_timeout_s=3.0)
    st = ServiceThread(cfg, ["i0", "i1", "i2"])
    yield st
    st.close()


def _acquire_later(st: ServiceThread, *names: str) -> None:
    for n in names:
        st.call(lambda n=n: asyncio.ensure_future(st.svc.acquire(n)))


def _ready(svc) -> list[str]:
    """Names of ready instances (call on the service loop: inside wait_for, or through st.call)."""
    return [i.name for i in svc.controller.instances.ready()]


def _live_instances(st: ServiceThread) -> list[str]:
    return st.call(_ready, st.svc)


def _events(st: ServiceThread, name: str, since: float = 0.0) -> list[dict]:
    return st.call(lambda: [e for e in st.svc.backend.events if e["event"] == name and e["t"] >= since])


def _submit_paced(st: ServiceThread, reqs, gap_s: float) -> list:
    async def go():
        out = []
        for p, n in reqs:
            out.append(st.svc.submit(p, n))
            await asyncio.sleep(gap_s)
        return out
    return st.run(go())


def test_trace_with_two_preemptions_and_an_acquisition(cluster, live_ckpt):
    st = cluster
    reqs = random_requests(50, seed=1)
    want = reference(live_ckpt, reqs)
    # i0 reclaimed at 3 s and i1 at 6 s (notices 2 s before), i3 acquired at 1.5 s (joins when started)
    trace = parse_availability_lines([
        json.dumps([0, "add", {"nodes": ["i0", "i1", "i2"]}]),
        json.dumps([1500, "add", {"nodes": ["i3"]}]),
        json.dumps([3000, "remove", {"nodes": ["i0"]}]),
        json.dumps([6000, "remove", {"nodes": ["i1"]}]),
        json.dumps([8000, "DONE", {}]),
    ])
    # paced steps keep every replica busy at both notices (unpaced, a fast replica may sit idle then)
    st.svc.backend.step_pause_s = 0.01
    t0 = st.call(st.svc.backend.now)
    st.call(schedule_trace, st.svc, trace, 1.0)
    lrs = _submit_paced(st, reqs, 0.12)
    got = st.wait_all(lrs, 150)
    st.svc.backend.step_pause_s = 0.0
    st.wait_for(lambda: sorted(_ready(st.svc)) == ["i2", "i3"] and st.svc.controller.phase == "serving", 120)
    assert got == want  # token-identical to an uninterrupted run
    reclaims = [e["instance"] for e in _events(st, "reclaim", t0)]
    assert sorted(reclaims) == ["i0", "i1"]
    assert sorted(_live_instances(st)) == ["i2", "i3"]
    plans = [(e["trigger"], e["config"]) for e in st.svc.log.of("plan") if e["t"] >= t0]
    assert len(_events(st, "configured", t0)) >= 2, plans  # a new layout after each notice
    interrupted = [lr for lr in lrs if st.svc.rm.requests[lr.rid].interruptions]
    assert interrupted, "the notices hit no running request; the test did not exercise migration"
    # every request interrupted with a notice resumed from its commit: no output token recomputed
    assert sum(lr.recomputed for lr in lrs) == 0
    # each resumed from its committed tokens (moved KV or re-prefill, as the arranger chose); one
    # interrupted before its first token restarts, with nothing to recompute
    assert all(lr.resumes for lr in interrupted), [(lr.rid, lr.resumes) for lr in interrupted]
    assert any(r["at"] > 0 for lr in interrupted for r in lr.resumes), "no interrupted request had tokens"
    print("interrupted:", len(interrupted), "resumed with moved KV:",
          sum(r["how"] == "kv" for lr in interrupted for r in lr.resumes),
          "re-prefilled:", sum(r["how"] == "prefill" for lr in interrupted for r in lr.resumes))
    assert all(lr.mismatches == 0 for lr in lrs)
    _acquire_later(st, "i4")  # for the next test


def test_sigkill_of_a_random_worker_loses_nothing(cluster, live_ckpt):
    st = cluster
    reqs = random_requests(12, seed=2, out=(40, 60))
    want = reference(live_ckpt, reqs)
    st.svc.backend.step_pause_s = 0.01
    t0 = st.call(st.svc.backend.now)
    lrs = _submit_paced(st, reqs, 0.02)
    # wait until a batch runs, then kill one of its workers at random
    st.wait_for(lambda: any(rt.batch is not None and any(len(st.svc.requests[q.id].tokens) > 3 for q in rt.batch.reqs)
                            for rt in st.svc.backend.replicas.values()))
    slots = st.call(lambda: [s for rt in st.svc.backend.replicas.values() if rt.batch is not None for s in rt.slots])
    victim = random.Random(7).choice(slots)
    pid = st.call(st.svc.kill_worker, victim)
    got = st.wait_all(lrs, 120)
    st.svc.backend.step_pause_s = 0.0
    assert got == want
    lost = _events(st, "worker_lost", t0)
    assert lost and lost[0]["worker"] == victim
    reclaim = [e for e in _events(st, "reclaim", t0) if e.get("notice") is False]
    inst = victim.split("/")[0]
    assert reclaim and reclaim[0]["instance"] == inst
    # the whole instance is gone for real: the killed worker and its sibling slot
    procs = [p for name, p in st.svc.launcher.procs.items() if name.startswith(inst + "/")]
    assert len(procs) == 2 and all(p.poll() is not None for p in procs)
    assert pid in [p.pid for p in procs]
    assert _events(st, "configured", lost[0]["t"]), "the cluster did not reconfigure after the loss"
    rec = [r for r in st.svc.recoveries if r["instance"] == victim.split("/")[0]]
    assert rec, "no request was running on the killed worker"
    print("recovery after SIGKILL (s):", sorted(r["seconds"] for r in rec))
    _acquire_later(st, "i5", "i6")


def _stream(url: str, body: dict, out: list, errors: list) -> None:
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                errors.append(f"status {r.status_code}")
                return
            for line in r.iter_lines():
                if not line:
                    continue
                if not line.startswith("data: "):
                    errors.append(f"unexpected line {line!r}")
                elif line == "data: [DONE]":
                    out.append("DONE")
                else:
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        errors.append(ev)
                    out.extend(ev["choices"][0]["token_ids"])
    except Exception as exc:  # the stream must not break
        errors.append(repr(exc))


def test_sse_stream_unbroken_across_a_preemption_and_a_kill(cluster, live_ckpt):
    st = cluster
    st.wait_for(lambda: len(_ready(st.svc)) >= 3 and st.svc.controller.phase == "serving", 150)
    prompt, n = [5, 17, 33, 2, 91], 120
    want = reference(live_ckpt, [(prompt, n)])[0]
    st.svc.backend.step_pause_s = 0.03
    out, errors = [], []
    first_new = st.call(lambda: st.svc._next_id)
    th = threading.Thread(target=_stream, args=(st.url, {"prompt": prompt, "max_tokens": n, "temperature": 0,
                                                         "stream": True}, out, errors))
    th.start()
    st.wait_for(lambda: first_new in st.svc.requests and len(st.svc.requests[first_new].tokens) >= 10)
    lr = st.call(lambda: st.svc.requests[first_new])

    def host():
        q = st.svc.rm.requests[lr.rid]
        r = st.svc.controller.replicas.get(q.replica) if q.replica is not None else None
        return r.gpus if r is not None else None

    st.wait_for(lambda: host() is not None)
    inst = host()[0].split("/")[0]
    def seen():
        q = st.svc.rm.requests[lr.rid]
        evs = [(round(e["t"], 2), e["event"], e.get("config") or e.get("instance") or e.get("replica"))
               for e in st.svc.log.events[-30:]]
        return (f"request {q.state} committed {q.committed} tokens {len(lr.tokens)} interruptions "
                f"{q.interruptions} resumes {lr.resumes} host {host()} phase {st.svc.controller.phase}; "
                f"events {evs}")

    st.call(st.svc.notice, inst, 2.0)  # ample grace on a slow machine: the migration lands before the kill
    st.wait_for(lambda: len(lr.resumes) >= 1 and host() is not None and not host()[0].startswith(inst + "/")
                and len(lr.tokens) >= lr.resumes[0]["at"] + 10, 60, explain=seen)
    st.call(st.svc.kill_worker, host()[-1])
    th.join(120)
    st.svc.backend.step_pause_s = 0.0
    assert not th.is_alive(), f"the stream did not end after the kill: {st.call(seen)}"
    assert errors == []
    assert out[-1] == "DONE" and out[:-1] == want  # no error, no repeated and no missing token
    assert st.svc.rm.requests[lr.rid].interruptions >= 2
    print("longest token gap of the stream (s):", round(lr.max_gap(), 3), "resumes:", lr.resumes)


def test_http_load_during_a_preemption_gets_no_5xx(cluster, live_ckpt):
    st = cluster
    st.wait_for(lambda: len(_ready(st.svc)) >= 2 and st.svc.controller.phase == "serving", 150)
    reqs = random_requests(32, seed=4, out=(10, 30))
    want = reference(live_ckpt, reqs)
    statuses, outs = {}, {}

    async def client(i, sem, http):
        async with sem:
            p, n = reqs[i]
            r = await http.post("/v1/completions", json={"prompt": p, "max_tokens": n, "temperature": 0})
            statuses[i] = r.status_code
            if r.status_code == 200:
                outs[i] = r.json()["choices"][0]["token_ids"]

    async def load():
        sem = asyncio.Semaphore(6)
        async with httpx.AsyncClient(base_url=st.url, timeout=120) as http:
            tasks = [asyncio.ensure_future(client(i, sem, http)) for i in range(len(reqs))]
            await asyncio.sleep(0.5)
            victim = _busy_instance(st)
            st.call(st.svc.notice, victim, 1.5)
            await asyncio.gather(*tasks)
            return victim

    victim = asyncio.run(load())
    assert sorted(statuses.values()) == [200] * len(reqs)
    assert [outs[i] for i in range(len(reqs))] == want
    st.wait_for(lambda: st.svc.controller.instances.instances[victim].state == "gone", 30)


def _busy_instance(st: ServiceThread) -> str:
    def pick():
        for rt in st.svc.backend.replicas.values():
            if rt.batch is not None:
                return rt.slots[0].split("/")[0]
        return st.svc.controller.instances.ready()[0].name
    return st.call(pick)
