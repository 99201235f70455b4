"""The cost-model profile of this engine on this machine (planner/profiles.py reads it).

Fields kept from the SpotServe artifact (spotserve/data/profiles-t4): ``name``, ``layer_num``,
``hidden_size``, ``max_tp``, ``final_fix_factor`` (1.0: embeddings and LM head are measured, not
folded in), ``embed`` (ms of the embedding + final norm + LM head for one decode step, index
log2(batch)) and ``tp-<n>`` -> ``bsz-<b>`` -> ``init`` (ms per layer, prefill of ``init_tokens``-token
prompts) / ``incr`` (ms per layer, one decode step with contexts of about ``init_tokens``).
Per-layer times are whole engine steps (host work included) minus the separately timed embedding
and head, divided by the layers. ``pp_init_comm`` / ``pp_incr_comm`` are written only where a
pipeline hop was measured (two GPUs); on one GPU they are left out (the planner then uses 0) and
listed under ``absent``, as are the tp degrees the machine cannot run.

Additions (documented in planner/profiles.py where the planner uses them): ``model``, ``dtype``,
``init_tokens``, ``gpu_memory_bytes``, ``gpus_per_instance``, ``reserved_bytes`` and ``memory``
{layer_bytes, kv_bytes_per_token_layer, embed_bytes, head_bytes, activation_bytes_per_token};
informational only: ``device``, ``embed_init`` (ms of embedding + head for a prefill, index
log2(batch)), ``detail`` (per batch: whole-step ms, embedding and head ms), ``absent``, ``torch``.
"""
from __future__ import annotations

import os

import torch

from spotserve.engine.config import EngineConfig
from spotserve.engine.engine import Engine
from spotserve.engine.sequence import SamplingParams
from spotserve.models.spec import ModelSpec
from spotserve.profile.timing import device_ms, median, sync, wall_ms

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def build_engine(spec: ModelSpec, weights: dict, device: str, dtype: torch.dtype, max_batch: int, max_len: int,
                 block_size: int = 16, cuda_graphs: bool = True) -> Engine:
    """A one-GPU (pp = tp = 1) engine over in-memory weights, with KV room for max_batch x max_len tokens."""
    num_blocks = max_batch * -(-max_len // block_size) + 4
    config = EngineConfig(f"<random {spec.name}>", block_size=block_size, num_blocks=num_blocks, max_batch=max_batch,
                          max_batch_tokens=max_batch * max_len, dtype=DTYPE_NAMES[dtype], device=device,
                          cuda_graphs=cuda_graphs)
    return Engine(config, spec=spec, weights=weights)


def random_prompts(spec: ModelSpec, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec.vocab, (batch, length), generator=gen).tolist()


def _add(engine: Engine, prompts: list[list[int]], new_tokens: int, tag: str) -> list[str]:
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, SamplingParams(new_tokens))
    return ids


def prefill_ms(engine: Engine, prompts: list[list[int]], reps: int, warmup: int = 1) -> list[float]:
    """Wall ms of engine.step() prefilling all prompts in one step (requests released after each)."""
    device = engine.config.device
    out = []
    for rep in range(warmup + reps):
        ids = _add(engine, prompts, 4, f"prefill{rep}")
        sync(device)
        out += wall_ms(engine.step, 1, warmup=0, device=device)
        for rid in ids:
            engine.release(rid)
    return out[warmup:]


def decode_ms(engine: Engine, prompts: list[list[int]], steps: int, warmup: int = 3) -> list[float]:
    """Wall ms of each of `steps` decode steps of the batch after its prefill (+ warm-up steps, graph capture)."""
    device = engine.config.device
    ids = _add(engine, prompts, warmup + steps + 2, "decode")
    engine.step()  # prefill
    for _ in range(warmup):
        engine.step()
    times = wall_ms(engine.step, steps, warmup=0, device=device)
    for rid in ids:
        engine.release(rid)
    return times


def embed_head_ms(engine: Engine, batch: int, tokens: int, reps: int = 10) -> tuple[float, float]:
    """(embedding of batch x tokens ids, final norm + LM head of batch rows) in ms."""
    model, spec, dev = engine.runner.model, engine.spec, engine.config.device
    ids = torch.randint(0, spec.vocab, (batch * tokens,), device=dev)
    pos = torch.arange(tokens, device=dev).repeat(batch)
    h = torch.randn(batch, spec.hidden, dtype=engine.runner.dtype, device=dev)
    with torch.inference_mode():
        emb = median(device_ms(lambda: model.embed_tokens(ids, pos), reps, warmup=2, device=dev))
        head = median(device_ms(lambda: model.logits(h), reps, warmup=2, device=dev))
    return emb, head


def _memory(engine: Engine) -> dict:
    model, spec = engine.runner.model, engine.spec
    size = lambda mod: sum(p.numel() * p.element_size() for p in mod.parameters())  # noqa: E731
    head = model.lm_head.weight
    return {"layer_bytes": size(model.layers[0]),
            "kv_bytes_per_token_layer": engine.runner.cache.bytes_per_token // spec.num_layers,
            "embed_bytes": size(model.embed) + (0 if model.positions is None else
                                                model.positions.numel() * model.positions.element_size()),
            "head_bytes": head.numel() * head.element_size() + size(model.final_norm)}


def _machine_memory(device: str) -> tuple[int, int | None]:
    """(memory of the device in bytes, bytes taken outside torch's allocator: CUDA context etc.)."""
    if torch.device(device).type == "cuda":
        free, total = torch.cuda.mem_get_info()
        return total, total - free - torch.cuda.memory_reserved()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None


def profile_engine(spec: ModelSpec, weights: dict, device: str = "cuda", dtype: torch.dtype = torch.float16,
                   batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32), prompt_len: int = 512,
                   prefill_batches: tuple[int, ...] | None = None, decode_steps: int = 10, reps: int = 3) -> dict:
    """Measure the engine (tp = 1, one device) and return the profile dict (module docstring).

    batches must be 1, 2, 4, ... (consecutive powers of two: ``embed`` is indexed by log2(batch)).
    prefill_batches defaults to batches. Raises ValueError on other batch lists.
    """
    if list(batches) != [1 << i for i in range(len(batches))]:
        raise ValueError(f"batches must be 1, 2, 4, ... consecutive powers of two, got {batches}")
    prefill_batches = tuple(prefill_batches or batches)
    if not set(prefill_batches) <= set(batches):
        raise ValueError(f"prefill_batches {prefill_batches} must be a subset of batches {batches}")
    max_len = prompt_len + decode_steps + 8
    engine = build_engine(spec, weights, device, dtype, max(batches), max_len)
    cuda = torch.device(device).type == "cuda"
    gpu_memory, outside = _machine_memory(device)
    table, embed, embed_init, detail = {}, [], [], {}
    activation_per_token = None
    for b in batches:
        prompts = random_prompts(spec, b, prompt_len, seed=b)
        e_dec, h_dec = embed_head_ms(engine, b, 1)
        e_pre, h_pre = embed_head_ms(engine, b, prompt_len)
        embed.append(round(e_dec + h_dec, 4))
        embed_init.append(round(e_pre + h_pre, 4))
        step_dec = median(decode_ms(engine, prompts, decode_steps))
        row = {"incr": round(max(step_dec - e_dec - h_dec, 1e-6) / spec.num_layers, 5)}
        d = {"decode_step_ms": round(step_dec, 4), "embed_ms": round(e_dec, 4), "head_ms": round(h_dec, 4)}
        if b in prefill_batches:
            if cuda:
                sync(device)
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            step_pre = median(prefill_ms(engine, prompts, reps))
            if cuda:
                activation_per_token = (torch.cuda.max_memory_allocated() - base) / (b * prompt_len)
            row["init"] = round(max(step_pre - e_pre - h_pre, 1e-6) / spec.num_layers, 5)
            d.update(prefill_step_ms=round(step_pre, 4), prefill_embed_ms=round(e_pre, 4), prefill_head_ms=round(h_pre, 4))
        table[f"bsz-{b}"] = row
        detail[f"bsz-{b}"] = d
    # The planner needs init and incr at every batch: prefill time is linear in tokens past
    # a few thousand, so unmeasured prefill batches scale the largest measured one.
    ref_b = max(prefill_batches)
    for b in batches:
        if "init" not in table[f"bsz-{b}"]:
            table[f"bsz-{b}"]["init"] = round(table[f"bsz-{ref_b}"]["init"] * b / ref_b, 5)
            detail[f"bsz-{b}"]["init_scaled_from"] = ref_b
    memory = _memory(engine)
    if activation_per_token is not None:
        memory["activation_bytes_per_token"] = round(activation_per_token, 1)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = {"name": f"spotserve-{spec.name}-{name.replace(' ', '_')}", "model": spec.name,
           "layer_num": spec.num_layers, "hidden_size": spec.hidden, "max_tp": 1, "final_fix_factor": 1.0,
           "dtype": DTYPE_NAMES[dtype], "init_tokens": prompt_len, "embed": embed, "embed_init": embed_init,
           "tp-1": table, "gpu_memory_bytes": int(gpu_memory), "gpus_per_instance": 1, "memory": memory,
           "device": name, "torch": torch.__version__, "detail": {"tp-1": detail},
           "absent": {"pp_init_comm": "one device: no pipeline hop to measure (the planner uses 0)",
                      "pp_incr_comm": "one device: no pipeline hop to measure (the planner uses 0)",
                      "tp>1": "one device: tensor parallelism needs several GPUs"}}
    if outside is not None:
        out["reserved_bytes"] = int(outside)
    del engine
    if cuda:
        torch.cuda.empty_cache()
    return out

