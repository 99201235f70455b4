"""Single-process engine against transformers: batching, preemption, stop tokens, resume, seeded sampling."""
from __future__ import annotations

import pytest

from engine_helpers import FAMILIES, rel_err
from spotserve.engine.config import EngineConfig
from spotserve.engine.engine import Engine, RequestState
from spotserve.engine.kv_reshard import RequestKV, assemble
from spotserve.engine.sequence import SamplingParams

PROMPTS = {"a": [11, 42, 7, 99, 3, 150, 64], "b": [5, 8], "c": [120, 1, 77, 30, 30, 9, 141, 2, 60, 13], "d": [4]}


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    kw.setdefault("num_blocks", 64)
    return Engine(EngineConfig(model_dir, **kw))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", FAMILIES)
def test_continuous_batching_matches_each_alone(ckpts, hf_generate, family):
    """Requests of different lengths join at different steps and leave when done; each gets
    exactly the tokens (and last-step logits) transformers gives it alone."""
    engine = _engine(ckpts[family], max_batch=3)
    arrivals = {0: ["a", "b"], 1: ["c"], 4: ["d"]}
    lengths = {"a": 9, "b": 3, "c": 6, "d": 5}
    last = {}
    while engine.has_unfinished() or any(s >= engine.steps for s in arrivals):
        for rid in arrivals.pop(engine.steps, []):
            engine.add_request(rid, PROMPTS[rid], SamplingParams(lengths[rid]))
        new = engine.step()
        for row, rid in enumerate(new):
            last[rid] = engine.last_logits[row].clone()
    for rid, n in lengths.items():
        ref_tokens, ref_logits = hf_generate(ckpts[family], PROMPTS[rid], n)
        assert engine.finished[rid].output == ref_tokens, rid
        assert engine.finished[rid].finish_reason == "length"
        assert rel_err(last[rid], ref_logits) < 1e-4


@pytest.mark.timeout(120)
def test_preemption_under_a_small_cache_keeps_tokens(ckpts, hf_generate):
    """With too few KV blocks for all requests, later ones are preempted and re-prefilled: same tokens."""
    model = ckpts["llama-tiny"]
    engine = _engine(model, block_size=2, num_blocks=12)
    for rid in ("a", "c", "b"):
        engine.add_request(rid, PROMPTS[rid], SamplingParams(8))
    engine.run()
    assert engine.tokens_fed > sum(len(PROMPTS[r]) + 7 for r in "acb")  # some tokens were recomputed
    for rid in ("a", "c", "b"):
        assert engine.finished[rid].output == hf_generate(model, PROMPTS[rid], 8)[0], rid
    assert engine.blocks.num_free == 12


@pytest.mark.timeout(120)
def test_stop_token_ends_a_request(ckpts, hf_generate):
    model = ckpts["gpt-neox-tiny"]
    ref, _ = hf_generate(model, PROMPTS["a"], 8)
    stop = ref[3]
    engine = _engine(model)
    engine.add_request("a", PROMPTS["a"], SamplingParams(8, stop_token_ids=(stop,)))
    engine.run()
    seq = engine.finished["a"]
    assert seq.output == ref[:ref.index(stop) + 1]
    assert seq.finish_reason == "stop"
    assert engine.blocks.num_free == 64


def _stopped(model_dir, k, uncommitted=0, params=None, **kw):
    """Run a and c for k steps, commit all but `uncommitted` tokens, export and release them."""
    engine = _engine(model_dir, **kw)
    for rid in ("a", "c"):
        engine.add_request(rid, PROMPTS[rid], params or SamplingParams(8))
    for _ in range(k):
        engine.step()
    out = {}
    for rid in ("a", "c"):
        seq = engine.get(rid)
        engine.commit(rid, len(seq.output) - uncommitted)
        out[rid] = engine.export_request(rid)
        engine.release(rid)
    assert engine.blocks.num_free == engine.config.num_blocks
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("uncommitted", [0, 2])
def test_resume_from_kv_and_from_prefill(ckpts, hf_generate, family, uncommitted):
    """A request stopped after 4 tokens continues identically from its KV (other block size, no
    recomputation) and by re-prefilling prompt + committed tokens."""
    model = ckpts[family]
    exported = _stopped(model, 4, uncommitted)
    for mode in ("kv", "prefill"):
        engine = _engine(model, block_size=8, num_blocks=16)
        for rid, (state, kv) in exported.items():
            assert len(state.committed) == 4 - uncommitted
            piece = assemble([kv], engine.spec, 1, 1, 0, 0, block_size=8) if mode == "kv" else None
            engine.import_request(state, piece)
        engine.step()
        fed = engine.last_step_tokens
        want_fed = 2 if mode == "kv" else sum(len(PROMPTS[r]) + 4 - uncommitted for r in exported)
        assert fed == want_fed, mode
        engine.run()
        for rid in exported:
            assert engine.finished[rid].output == hf_generate(model, PROMPTS[rid], 8)[0], (mode, rid)


@pytest.mark.timeout(120)
def test_import_rejects_a_piece_for_another_position(ckpts):
    model = ckpts["opt-tiny"]
    state, kv = _stopped(model, 2)["a"]
    engine = _engine(model)
    half = RequestKV(kv.req_id, kv.num_tokens, kv.block_size, (0, 3), kv.heads, kv.data[:, :3])
    with pytest.raises(ValueError, match="layers"):
        engine.import_request(state, half)
    with pytest.raises(ValueError, match="block size"):
        engine.import_request(state, assemble([kv], engine.spec, 1, 1, 0, 0, block_size=8))
    other = RequestState("zz", state.prompt, state.committed, state.params)
    with pytest.raises(ValueError, match="zz"):
        engine.import_request(other, kv)


@pytest.mark.timeout(120)
def test_seeded_sampling_ignores_batch_and_survives_resume(ckpts):
    """Seeded top-p sampling gives a request the same tokens alone, in a batch, and after a re-prefill."""
    model = ckpts["opt-tiny"]
    params = SamplingParams(8, temperature=1.3, top_p=0.9, seed=7)
    alone = _engine(model)
    alone.add_request("a", PROMPTS["a"], params)
    alone.run()
    crowd = _engine(model)
    crowd.add_request("c", PROMPTS["c"], SamplingParams(8, temperature=1.0, seed=1))
    crowd.add_request("a", PROMPTS["a"], params)
    crowd.add_request("b", PROMPTS["b"], SamplingParams(8))
    crowd.run()
    assert crowd.finished["a"].output == alone.finished["a"].output
    state, _ = _stopped(model, 3, params=params)["a"]
    resumed = _engine(model)
    resumed.import_request(state)
    resumed.run()
    assert resumed.finished["a"].output == alone.finished["a"].output
    other = _engine(model)
    other.add_request("a", PROMPTS["a"], SamplingParams(8, temperature=1.3, top_p=0.9, seed=8))
    other.run()
    greedy = _engine(model)
    greedy.add_request("a", PROMPTS["a"], SamplingParams(8))
    greedy.run()
    # A different seed, or no sampling, changes the draw (8 tokens from a nearly flat distribution).
    assert other.finished["a"].output != alone.finished["a"].output
    assert greedy.finished["a"].output != alone.finished["a"].output


@pytest.mark.timeout(60)
def test_bad_requests_are_refused(ckpts):
    engine = _engine(ckpts["llama-tiny"], num_blocks=8)
    with pytest.raises(ValueError, match="vocab"):
        engine.add_request("x", [1, 500], SamplingParams(4))
    with pytest.raises(ValueError, match="positions"):
        engine.add_request("x", [1] * 100, SamplingParams(40))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("x", [1] * 30, SamplingParams(8))
    engine.add_request("x", [1, 2], SamplingParams(4))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("x", [1, 2], SamplingParams(4))
    with pytest.raises(ValueError, match="tp=4"):
        Engine(EngineConfig(ckpts["llama-tiny"], tp=4))
    with pytest.raises(ValueError, match="pp=6"):
        Engine(EngineConfig(ckpts["llama-tiny"], pp=6))

