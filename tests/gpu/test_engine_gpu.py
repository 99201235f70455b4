"""The engine's GPU path (fp16, custom CUDA ops, CUDA-graph decode) on tiny shapes: marked gpu, run on the device."""
from __future__ import annotations

import pytest
import torch

from spotserve.engine.batch import Work
from spotserve.engine.engine import Engine
from spotserve.engine.kv_reshard import assemble
from spotserve.engine.sequence import SamplingParams
from spotserve.models import hf
from spotserve.models.spec import get_spec
from spotserve.profile.profiler import build_engine
from spotserve.profile.weights import random_weights

pytestmark = pytest.mark.gpu
FAMILIES = ["opt-tiny", "gpt-neox-tiny", "llama-tiny"]
PROMPTS = [[11, 42, 7, 99, 3, 150, 64], [5, 8], [120, 1, 77, 30, 30, 9, 141, 2, 60, 13, 17, 19, 23, 29, 31, 37, 41]]


def _weights(name: str) -> dict:
    return random_weights(get_spec(name), torch.float32, "cpu", seed=5)


def _reference(name: str, weights: dict, prompt: list[int], n: int):
    """transformers fp32 on the CPU: greedy tokens and the first step's logits."""
    import transformers

    transformers.logging.set_verbosity_error()
    spec = get_spec(name)
    config = transformers.AutoConfig.for_model(**hf.hf_config(spec, "fp32"))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    loaded = model.load_state_dict(weights, strict=False)
    assert set(loaded.missing_keys) <= {"lm_head.weight"}, loaded.missing_keys
    if spec.tie_word_embeddings:
        model.tie_weights()
    else:  # saved as e.g. embed_out.weight (GPT-NeoX); the model's attribute is named differently
        model.get_output_embeddings().weight.data.copy_(weights[hf.lm_head_name(spec)])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits]


def _engine(name: str, weights: dict, graphs: bool = True, block_size: int = 4) -> Engine:
    w = {k: v.to("cuda", torch.float16) for k, v in weights.items()}
    return build_engine(get_spec(name), w, "cuda", torch.float16, max_batch=5, max_len=64,
                        block_size=block_size, cuda_graphs=graphs)


def _drive(engine: Engine, n: int) -> tuple[dict, dict]:
    """Requests arrive at steps 0, 0, 2 (continuous batching); returns outputs and each one's first logits."""
    arrivals = {0: [0, 1], 2: [2]}
    first = {}
    while engine.has_unfinished() or arrivals:
        for i in arrivals.pop(engine.steps, []):
            engine.add_request(str(i), PROMPTS[i], SamplingParams(n))
        new = engine.step()
        for row, rid in enumerate(new):
            if rid not in first:
                first[rid] = engine.last_logits[row].clone().cpu()
    return {rid: s.output for rid, s in engine.finished.items()}, first


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", FAMILIES)
def test_fp16_engine_on_gpu_matches_transformers(name):
    """fp16 on the GPU vs transformers fp32 on the CPU: first logits within 1e-2, and greedy tokens
    equal up to the first near-tie of the reference (where fp16 rounding may pick the other token)."""
    weights = _weights(name)
    out, first = _drive(_engine(name, weights), 12)
    for i, prompt in enumerate(PROMPTS):
        ref_tokens, ref_logits = _reference(name, weights, prompt, 12)
        err = float((first[str(i)] - ref_logits[0]).norm() / ref_logits[0].norm())
        assert err < 1e-2, (i, err)
        got = out[str(i)]
        t = next((t for t in range(12) if got[t] != ref_tokens[t]), None)
        if t is not None:  # same prefix so far: the reference must nearly tie the two tokens here
            row = ref_logits[t]
            gap = float(row[ref_tokens[t]] - row[got[t]])
            assert gap <= 1e-2 * float(row.abs().max()), (i, t, gap)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["opt-tiny", "gpt-neox-tiny"])
def test_graph_replay_equals_eager_static_step(name):
    """Decode from CUDA graphs (padded buckets, context buckets 16 -> 32) = the same step run eagerly."""
    weights = _weights(name)
    graphed, eager = _engine(name, weights, graphs=True), _engine(name, weights, graphs=False)
    out_g, _ = _drive(graphed, 20)
    out_e, _ = _drive(eager, 20)
    assert out_g == out_e
    assert {k[0] for k in graphed.runner.decoder.graphs} >= {2, 4}  # batch 3 ran padded to 4
    assert {k[1] for k in graphed.runner.decoder.graphs} >= {16, 32}
    assert not eager.runner.decoder.graphs


@pytest.mark.timeout(300)
def test_decode_step_does_not_synchronize():
    """Once captured, a decode step (host -> device copies + graph replay) never waits for the GPU."""
    engine = _engine("llama-tiny", _weights("llama-tiny"))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(10))
    for _ in range(3):
        engine.step()
    for check in (False, True):  # the first step may capture a graph (capture synchronises)
        batch = engine.scheduler.schedule()
        work = [Work(s.req_id, s.pending, s.num_cached, engine.blocks.table(s.req_id), s.params, len(s.output))
                for s in batch]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if check else 0)
        try:
            tokens, _ = engine.runner.decoder.run(work)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        engine.scheduler.postprocess(batch, tokens.tolist())
    assert len(engine.runner.decoder.graphs) >= 1


@pytest.mark.timeout(300)
def test_resume_from_exported_kv_on_gpu():
    """KV exported from the GPU cache and imported into one with another block size continues identically."""
    name = "gpt-neox-tiny"
    weights = _weights(name)
    whole = _engine(name, weights)
    whole.add_request("a", PROMPTS[2], SamplingParams(10))
    want = whole.run()["a"]
    first = _engine(name, weights)
    first.add_request("a", PROMPTS[2], SamplingParams(10))
    for _ in range(4):
        first.step()
    first.commit("a", 4)
    state, kv = first.export_request("a")
    second = _engine(name, weights, block_size=8)
    second.import_request(state, assemble([kv], second.spec, 1, 1, 0, 0, block_size=8))
    second.step()
    assert second.last_step_tokens == 1  # continued from the KV, nothing recomputed
    assert second.run()["a"] == want
