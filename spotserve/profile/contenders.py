"""Hugging Face transformers (eager) on the same weight tensors as the engine, for scripts/bench_engine.py."""
from __future__ import annotations

import torch

from spotserve.models import hf
from spotserve.models.spec import ModelSpec
from spotserve.profile.timing import device_ms

_HF_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def hf_model(spec: ModelSpec, weights: dict, dtype: torch.dtype):
    """The family's *ForCausalLM (eager attention) whose parameters ARE the given tensors (no copy).

    Built on the meta device, then load_state_dict(assign=True); raises ValueError when a
    parameter or buffer would stay on the meta device.
    """
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(**hf.hf_config(spec, _HF_DTYPE[dtype]))
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(weights, assign=True, strict=False)
    if spec.tie_word_embeddings:
        model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # e.g. GPT-NeoX's rotary inv_freq: not a weight, so assign cannot fill it
            raise ValueError(f"transformers model buffer {name} stays on the meta device: only OPT is supported")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"transformers model parameters not in the weights: {left[:5]}")
    return model.eval()


@torch.inference_mode()
def hf_prefill_ms(model, ids: torch.Tensor, reps: int = 5) -> list[float]:
    """Device ms of a forward over prompts ids [b, t] (with a KV cache, as generate does)."""
    return device_ms(lambda: model(input_ids=ids, use_cache=True), reps, warmup=1, device=ids.device)


@torch.inference_mode()
def hf_decode_ms(model, ids: torch.Tensor, steps: int = 5) -> list[float]:
    """Device ms of each of `steps` one-token steps after prefilling ids [b, t] (greedy, cache growing)."""
    out = model(input_ids=ids, use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    state = {"cache": cache, "tok": tok}

    def step():
        o = model(input_ids=state["tok"], past_key_values=state["cache"], use_cache=True)
        state["cache"], state["tok"] = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)

    return device_ms(step, steps, warmup=2, device=ids.device)


@torch.inference_mode()
def hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy generate for ids [b, t]: tokens per prompt and the float logits [b, vocab] of each step."""
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:].tolist(), [x.float() for x in out.logits]
