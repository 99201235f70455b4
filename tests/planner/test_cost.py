"""CostModel: pipeline formulas against a brute-force schedule, profile parsing, memory model."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from planner_helpers import GB16, T4_20B, tiny_cost
from pipeline_sim import simulate
from spotserve.planner import CostModel, stage_layer_ranges
from spotserve.planner.profiles import load_profile, parse_profile


def test_stage_layer_ranges_cover_layers_in_order():
    for L in range(1, 20):
        for pp in range(1, L + 1):
            r = stage_layer_ranges(L, pp)
            assert r[0][0] == 0 and r[-1][1] == L
            assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
            sizes = [hi - lo for lo, hi in r]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        stage_layer_ranges(4, 5)


def _sim_for(cost, pp, tp, batch, m, n):
    """Brute-force batch time from the same per-stage inputs the cost model uses."""
    p = cost.profile
    b = batch / m
    x = float(cost.layer_seconds(tp, b, "prefill"))
    y = float(cost.layer_seconds(tp, b, "decode"))
    e = float(cost.embed_seconds(b))
    n_layers = [hi - lo for lo, hi in stage_layer_ranges(cost.spec.num_layers, pp)]
    t_pre = [k * x + (e if s == 0 else 0) for s, k in enumerate(n_layers)]
    t_dec = [k * y + (e if s == 0 else 0) for s, k in enumerate(n_layers)]
    total, done = simulate(t_pre, t_dec, p.pp_init_comm, p.pp_incr_comm, m, n)
    f = p.final_fix_factor
    return total * f, max(d[0] for d in done) * f, done


@settings(max_examples=60, deadline=None)
@given(pp=st.integers(1, 8), tp=st.sampled_from([1, 2, 4, 8]), batch=st.sampled_from([1, 2, 4, 8]),
       m_idx=st.integers(0, 3), n=st.integers(1, 40))
def test_pipeline_formulas_match_brute_force_schedule(cost20b, pp, tp, batch, m_idx, n):
    divisors = [d for d in (1, 2, 4, 8) if batch % d == 0]
    m = divisors[m_idx % len(divisors)]
    total, pre, done = _sim_for(cost20b, pp, tp, batch, m, n)
    assert float(cost20b.prefill_seconds(pp, tp, batch, m)) == pytest.approx(pre, rel=1e-9)
    assert float(cost20b.batch_seconds(pp, tp, batch, m, output_len=n)) == pytest.approx(total, rel=1e-9)
    if n >= 3:  # steady state: every micro-batch gets a token once per round R
        r = float(cost20b.decode_round_seconds(pp, tp, batch, m)) / cost20b.profile.final_fix_factor
        for d in done:
            assert d[-1] - d[-2] == pytest.approx(r, rel=1e-9)


def test_prefill_is_not_divided_by_micro_batches_twice(cost20b):
    # the artifact's t1 = pipelined time / m underestimates prefill by m; ours is at least one full
    # micro-batch pass per micro-batch on the bottleneck stage
    for m in (2, 4, 8):
        t = float(cost20b.prefill_seconds(4, 4, 8, m))
        per_mb_stage = 11 * float(cost20b.layer_seconds(4, 8 / m, "prefill")) * cost20b.profile.final_fix_factor
        assert t >= m * per_mb_stage


def test_profile_interpolates_between_measured_batches(cost20b):
    t2, t4 = (float(cost20b.layer_seconds(4, b, "decode")) for b in (2, 4))
    assert t2 == pytest.approx(1.938e-3) and t4 == pytest.approx(2.13e-3)
    assert float(cost20b.layer_seconds(4, 3, "decode")) == pytest.approx((t2 + t4) / 2)
    t8 = float(cost20b.layer_seconds(4, 8, "decode"))
    assert float(cost20b.layer_seconds(4, 16, "decode")) == pytest.approx(t8 + 8 * (t8 - t4) / 4)
    with pytest.raises(ValueError, match="tp 3"):
        cost20b.layer_seconds(3, 1, "decode")


def test_memory_model_components(cost20b):
    s = cost20b.spec
    assert cost20b.layer_bytes == 4 * s.layer_params()
    assert cost20b.kv_bytes_per_token_layer == 4 * 2 * s.hidden
    one = float(cost20b.memory_bytes(2, 4, 1, 1))
    two = float(cost20b.memory_bytes(2, 4, 2, 1))
    # one more request adds its KV (640 tokens over 22 layers / tp) and its activations
    kv = 640 * 22 * cost20b.kv_bytes_per_token_layer / 4
    assert two - one > kv
    # fp32 20B (82 GB of weights) cannot fit 4 T4s but fits 8
    assert not cost20b.feasible(1, 4, 1, 1) and bool(cost20b.feasible(2, 4, 1, 1))
    assert cost20b.min_gpus() * GB16 >= 4 * s.total_params()


def test_artifact_profiles_all_load():
    from planner_helpers import ROOT
    paths = sorted((ROOT / "spotserve/data/profiles-t4").glob("*/*.json"))
    assert len(paths) == 14
    for path in paths:
        p = load_profile(path)
        assert p.layer_num > 0 and p.tps[0] == 1 and p.pp_incr_comm >= 0


def test_spotserve_profile_extensions_override_derived_figures(tmp_path):
    data = json.loads(T4_20B.read_text())
    data.update({"model": "opt-6.7b", "dtype": "fp16", "gpu_memory_bytes": 80 * 2**30, "reserved_bytes": 123,
                 "bandwidth": {"inter_bytes_per_s": 1e10}, "memory": {"layer_bytes": 1000, "kv_bytes_per_token_layer": 7}})
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(data))
    cost = CostModel.from_profile(path)
    assert cost.spec.name == "opt-6.7b" and cost.dtype_bytes == 2 and cost.gpu_memory_bytes == 80 * 2**30
    assert cost.layer_bytes == 1000 and cost.kv_bytes_per_token_layer == 7 and cost.reserved_bytes == 123
    assert cost.bandwidth["inter_bytes_per_s"] == 1e10 and cost.bandwidth["disk_bytes_per_s"] == 1e9


@pytest.mark.parametrize("patch,match", [
    ({"layer_num": "x"}, "layer_num"),
    ({"tp-1": {"bsz-1": {"init": 1.0}}}, "incr"),
    ({"tp-1": {"bsz-1": {"init": -1.0, "incr": 1.0}}}, "positive"),
    ({"dtype": "int3"}, "dtype"),
    ({"bandwidth": {"warp": 1}}, "bandwidth"),
])
def test_bad_profiles_raise_named_errors(patch, match):
    data = json.loads(T4_20B.read_text())
    data.update(patch)
    with pytest.raises(ValueError, match=match):
        parse_profile(data, "bad.json")


def test_bad_json_names_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="p.json"):
        load_profile(path)


def test_throughput_and_tiny_model_consistency():
    cost = tiny_cost()
    for pp in range(1, 6):
        t = float(cost.batch_seconds(pp, 2, 4, 2))
        assert float(cost.replica_throughput(pp, 2, 4, 2)) == pytest.approx(4 / t)
    assert math.isfinite(float(cost.batch_seconds(np.array([1, 2]), 1, 1)[1]))
