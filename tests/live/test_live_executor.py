"""The live cluster migrates through the migration executor: weights and KV caches move worker to
worker, never through the controller, and the checkpoint is read only for what no live GPU holds.

One cluster (tiny model, instances of 2 CPU slots) serves the tests in order. A synthetic profile
makes the optimizer's choice independent of this machine's timings: tensor parallelism of 3 is the
fastest shape and one slot cannot hold the model, so 2 slots serve D1M2 and 4 slots serve D1M3.
  1. i0 alone (D1M2), i1 acquired: the new position on i1 gets its weights from i0's workers.
  2. a notice for i1 (D1M3 -> D1M2): running requests resume from KV moved worker-to-worker.
  3. i2 acquired (D1M3), then one of its workers SIGKILLed: only what it alone held is read from disk.
"""
from __future__ import annotations

import collections
import json

import msgpack
import pytest

from live_harness import ServiceThread, random_requests, reference
from spotserve.daemon.layout import KVRequest, Layout
from spotserve.daemon.resolve import resolve
from spotserve.live import protocol as P
from spotserve.live.migrate import (Migration, backend_of, device_of, migration_msg, network_gpus, parse_migration,
                                    usable_transfers)
from spotserve.live.service import LiveConfig
from spotserve.live.profile import reconfigure_margin
from spotserve.models import get_spec
from spotserve.planner.types import Position, Transfer

pytestmark = pytest.mark.timeout(240)
SPEC = get_spec("opt-tiny")


def _profile() -> dict:
    """tp 3 fastest, tp 2 next, pipelines costly; 500 kB per slot: one slot cannot hold the model."""
    d = {"name": "synthetic-tiny", "model": "opt-tiny", "layer_num": SPEC.num_layers, "dtype": "fp32",
         "init_tokens": 16, "final_fix_factor": 1.0, "embed": [], "pp_init_comm": 20.0, "pp_incr_comm": 20.0,
         "gpu_memory_bytes": 500_000, "gpus_per_instance": 2, "reserved_bytes": 0,
         "bandwidth": {"intra_bytes_per_s": 1e9, "inter_bytes_per_s": 1e9, "disk_bytes_per_s": 1e8},
         # what a reconfiguration's process groups and engine start cost here (a calibrated profile measures it)
         "reconfigure_margin_s": reconfigure_margin(0.5)}
    for tp, f in ((1, 8.0), (2, 4.0), (3, 1.0)):
        d[f"tp-{tp}"] = {f"bsz-{b}": {"init": f * (1 + 0.2 * b), "incr": f * (0.5 + 0.05 * b)} for b in (1, 2, 4, 8)}
    return d


class Tally:
    """Bytes of controller <-> worker messages by type, counted in the controller process."""

    def __init__(self):
        self.bytes: collections.Counter = collections.Counter()
        self.export_replies: list[dict] = []
        self._encode, self._decode = P.encode, P.decode_body

    def install(self) -> None:
        def encode(msg, token):
            raw = self._encode(msg, token)
            self.bytes[msg.type] += len(raw)
            return raw

        def decode_body(mac, body, token):
            msg = self._decode(mac, body, token)
            self.bytes[msg.type] += len(body)
            if msg.type == "kv":
                self.export_replies.append(msg.body)
            return msg

        P.encode, P.decode_body = encode, decode_body

    def remove(self) -> None:
        P.encode, P.decode_body = self._encode, self._decode


# --- messages (no processes) ---------------------------------------------------------------------
def _tp_layout(replicas: dict[int, list[str]], bs: int = 8) -> Layout:
    return _layout(replicas, bs)


def test_migration_map_round_trips_through_msgpack():
    old = _tp_layout({0: ["i0/g0", "i0/g1"], 1: ["i1/g0", "i1/g1"]})
    new = _tp_layout({0: ["i0/g0", "i0/g1", "i1/g0"]})
    transfers = [Transfer("i0/g1", "i1/g0", "layer", 2, (2, 3, 6), 1234, None, ((64, 96),)),
                 Transfer(None, "i0/g0", "embed", None, None, 99),
                 Transfer("i1/g1", "i0/g1", "kv", 0, (1, 2, 3), 512, "7")]
    reqs = [KVRequest("7", 1, 0, 21)]
    msg = migration_msg(old, new, transfers, reqs, ["i0/g0", "i1/g1"], {"i0/g0": 0, "i1/g1": 1})
    back = parse_migration(msgpack.unpackb(msgpack.packb(msg, use_bin_type=True), raw=False))
    assert back.transfers == transfers and back.requests == reqs
    assert back.old.placement == old.placement and dict(back.old.shapes) == dict(old.shapes)
    assert back.new.placement == new.placement and back.new.block_size == 8
    assert back.live == {"i0/g0", "i1/g1"} and back.ranks == {"i0/g0": 0, "i1/g1": 1}
    with pytest.raises(ValueError, match="malformed"):
        parse_migration({"new": msg["new"]})


def test_usable_transfers_drop_what_the_layouts_cannot_honour():
    old = _tp_layout({0: ["a", "b"]})
    new = _tp_layout({0: ["a", "c", "b"]})
    reqs = [KVRequest("1", 0, 0, 10), KVRequest("2", 0, 0, 0)]
    good = [Transfer("a", "c", "layer", 1, (1, 2, 6), 10), Transfer(None, "c", "head", None, None, 10),
            Transfer("b", "c", "kv", 3, (2, 3, 6), 10, "1")]
    bad = [Transfer("kept/g0", "c", "layer", 1, (1, 2, 6), 10),  # a source outside the old layout
           Transfer("a", "gone", "layer", 1, None, 10),  # a destination outside the new one
           Transfer("b", "c", "kv", 3, None, 10, "9"),  # a request this migration does not move
           Transfer("b", "c", "kv", 3, None, 10, "2")]  # a request with no cached token
    m = Migration(old, new, bad[:1] + good[:2] + bad[1:] + good[2:], reqs, {"a", "b"}, {"a": 0, "b": 1, "c": 2})
    assert usable_transfers(SPEC, m) == good
    with pytest.raises(ValueError):  # what the filter protects against
        resolve(SPEC, old, new, m.transfers, reqs, 4, live=m.live)
    res = resolve(SPEC, old, new, good, reqs, 4, live=m.live)
    assert not any(mv.src is None for mv in res.moves if mv.transfer < 0)  # live holders filled the rest
    assert network_gpus(res) == ["a", "b", "c"]


def test_device_of_slots():
    import torch

    assert device_of("i0/g1", {}) == "cpu" and device_of("i0/g1", {"device": "cpu"}) == "cpu"
    assert backend_of("cpu") == "gloo" and backend_of("cuda:1") == "nccl"
    with pytest.raises(ValueError, match="device"):
        device_of("i0/g1", {"device": "tpu"})
    n = torch.cuda.device_count()
    if n == 0:
        with pytest.raises(ValueError, match="no GPU"):
            device_of("i0/g3", {"device": "cuda"})
    else:
        assert device_of("i0/g3", {"device": "cuda"}) == f"cuda:{3 % n}"


# --- the live cluster ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(live_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("live-executor")
    (root / "profile.json").write_text(json.dumps(_profile()))
    cfg = LiveConfig(live_ckpt, str(root / "profile.json"), str(root / "run"), gpus_per_instance=2, rate=2.0,
                     grace_s=4.0, heartbeat_timeout_s=3.0)
    tally = Tally()
    tally.install()
    st = ServiceThread(cfg, ["i0"], http=False)
    st.tally = tally
    try:
        _wait_serving(st, "D1P1M2")
        yield st
    finally:
        st.close()
        tally.remove()


def _wait_serving(st: ServiceThread, config: str, timeout: float = 90) -> None:
    svc = st.svc

    def ok():
        plan = svc.controller.plan
        return (plan is not None and plan.config.short().startswith(config) and svc.controller.phase == "serving"
                and all(rt.ready.is_set() and not rt.failed for rt in svc.backend.replicas.values()))
    st.wait_for(ok, timeout)


def _submit(st: ServiceThread, reqs) -> list:
    return [st.call(st.svc.submit, p, n) for p, n in reqs]


def _migration(st: ServiceThread, after: int) -> dict:
    st.wait_for(lambda: len(st.svc.backend.migrations) > after, 60)
    m = st.call(lambda: dict(st.svc.backend.migrations[after]))
    print("migration:", {k: m[k] for k in ("config_id", "seconds", "executor_s", "prepare_s", "group_s", "planned_bytes",
                                           "received_bytes", "local_bytes", "checkpoint_bytes", "kv_bytes")})
    return m


def _layout(replicas: dict, block_size: int) -> Layout:
    """Layout of a configure event's one tp-only replica {index: [slots]}."""
    shapes, placement = {}, {}
    for idx, slots in replicas.items():
        shapes[int(idx)] = (1, len(slots))
        placement.update({Position(int(idx), 0, k): s for k, s in enumerate(slots)})
    return Layout(shapes, placement, block_size)


def _configure_events(st: ServiceThread) -> list[dict]:
    return st.call(lambda: [e for e in st.svc.backend.events if e["event"] == "configure"])


def test_acquisition_loads_new_positions_from_peers(cluster, live_ckpt):
    st = cluster
    svc = st.svc
    reqs = random_requests(4, seed=11, out=(40, 50))
    want = reference(live_ckpt, reqs)
    st.run(svc.acquire("i1", join=False))  # its workers are up; the controller learns of it below
    st.call(lambda: setattr(svc.backend, "step_pause_s", 0.02))
    lrs = _submit(st, reqs)
    st.wait_for(lambda: all(len(lr.tokens) >= 3 for lr in lrs))
    before = len(svc.backend.migrations)
    old_slots = {s for rt in svc.backend.replicas.values() for s in rt.slots}
    st.call(svc.controller.on_instance_added, "i1")
    m = _migration(st, before)
    got = st.wait_all(lrs, 120)
    st.call(lambda: setattr(svc.backend, "step_pause_s", 0.0))
    _wait_serving(st, "D1P1M3")
    assert got == want
    assert m["old"] and m["failed"] == []
    new_slots = [s for s in _configure_events(st)[-1]["replicas"][0] if s not in old_slots]
    assert new_slots and all(s.startswith("i1/") for s in new_slots)
    # the new position's weights came from i0's workers; nothing was read from the checkpoint
    assert m["checkpoint_bytes"] == 0 and m["loaded_bytes"] == 0
    for s in new_slots:
        assert m["workers"][s]["received_bytes"] > 0 and m["workers"][s]["checkpoint_bytes"] == 0
    assert m["received_bytes"] == m["sent_bytes"] > 0
    assert sum(lr.recomputed for lr in lrs) == 0 and all(lr.mismatches == 0 for lr in lrs)
    moved = [lr for lr in lrs if any(r["how"] == "kv" for r in lr.resumes)]
    assert moved, "no running request was carried across the acquisition with its KV"
    assert {lr.sid for lr in moved} <= set(m["kv_moved"])
    for lr in moved:
        assert lr.reprefilled == 0 and lr.kv_moved_bytes > 0


def test_notice_moves_kv_worker_to_worker(cluster, live_ckpt):
    st = cluster
    svc = st.svc
    # long enough to be still decoding when migration starts (about grace - margin after the notice)
    reqs = random_requests(4, seed=12, out=(100, 110))
    want = reference(live_ckpt, reqs)
    st.call(lambda: setattr(svc.backend, "step_pause_s", 0.03))
    lrs = _submit(st, reqs)
    st.wait_for(lambda: all(len(lr.tokens) >= 3 for lr in lrs))
    before = len(svc.backend.migrations)
    kv_msgs, exports = st.tally.bytes["kv"] + st.tally.bytes["add_requests"], len(st.tally.export_replies)
    st.call(svc.notice, "i1", 4.0)
    m = _migration(st, before)
    got = st.wait_all(lrs, 120)
    st.call(lambda: setattr(svc.backend, "step_pause_s", 0.0))
    _wait_serving(st, "D1P1M2")
    assert got == want  # token-identical to an uninterrupted run
    assert m["old"] and m["failed"] == [] and m["lost_kv"] == []
    assert any(s.startswith("i1/") for s in m["live"]), "the noticed instance was gone before the migration"
    # weights and KV moved worker to worker; every old GPU was alive, so no checkpoint read at all
    assert m["received_bytes"] > 0 and m["kv_bytes"] > 0
    assert m["checkpoint_bytes"] == 0 and m["loaded_bytes"] == 0
    moved = [lr for lr in lrs if lr.resumes]
    assert moved, "the notice interrupted no running request"
    for lr in moved:
        assert [r["how"] for r in lr.resumes] == ["kv"], lr.resumes
        assert lr.sid in m["kv_moved"] and lr.kv_moved_bytes > 0
        assert lr.reprefilled == 0 and lr.recomputed == 0
    # no KV bytes through the controller: export replies carry token counts only, and every control
    # message about these requests is far smaller than the KV that moved
    replies = st.tally.export_replies[exports:]
    assert replies and all(r["pieces"] == {} for r in replies)
    control = st.tally.bytes["kv"] + st.tally.bytes["add_requests"] - kv_msgs
    assert control < sum(lr.kv_moved_bytes for lr in moved) / 10, (control, [lr.kv_moved_bytes for lr in moved])
    reclaim = st.call(lambda: [e for e in svc.backend.events if e["event"] == "reclaim" and e["instance"] == "i1"])
    assert reclaim, "the noticed instance was never reclaimed"


def test_sigkill_reads_only_what_no_live_gpu_held(cluster, live_ckpt):
    st = cluster
    svc = st.svc
    st.run(svc.acquire("i2"))
    _wait_serving(st, "D1P1M3")
    old = _configure_events(st)[-1]["replicas"]
    reqs = random_requests(3, seed=13, out=(40, 50))
    want = reference(live_ckpt, reqs)
    st.call(lambda: setattr(svc.backend, "step_pause_s", 0.02))
    lrs = _submit(st, reqs)
    st.wait_for(lambda: all(len(lr.tokens) >= 3 for lr in lrs))
    before = len(svc.backend.migrations)
    victim = next(s for s in old[0] if s.startswith("i2/"))
    st.call(svc.kill_worker, victim)
    m = _migration(st, before)
    got = st.wait_all(lrs, 120)
    st.call(lambda: setattr(svc.backend, "step_pause_s", 0.0))
    _wait_serving(st, "D1P1M2")
    assert got == want
    assert sum(lr.recomputed for lr in lrs) == 0
    assert victim not in m["live"] and m["failed"] == []
    # the minimum: the new shards' elements that no surviving old GPU holds
    bs = svc.config.engine["block_size"]
    new = _configure_events(st)[-1]["replicas"]
    res = resolve(SPEC, _layout(old, bs), _layout(new, bs), [], [], 4, live=set(m["live"]))
    need = sum(mv.nbytes for mv in res.moves if mv.src is None)
    assert need > 0 and m["checkpoint_bytes"] == need
    # the rest came from the surviving workers (their own slices or each other's)
    assert m["received_bytes"] == sum(mv.nbytes for mv in res.moves if mv.src not in (None, mv.dst))
    assert m["lost_kv"] == [] and m["kv_requests"] == 0  # a lost worker's batch is aborted, not parked
