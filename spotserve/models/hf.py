"""Hugging Face naming of the three families: config.json <-> ModelSpec, tensor names and shapes (no torch).

Names and shapes are exactly those `save_pretrained` of transformers 5.x writes for
OPTForCausalLM, GPTNeoXForCausalLM and LlamaForCausalLM (GPT-NeoX's LM head is saved as
`embed_out.weight`; a tied LM head is absent from the file).
"""
from __future__ import annotations

import functools
import re
from types import MappingProxyType

from spotserve.models.spec import ModelSpec, get_spec, list_specs

ARCHITECTURES = {"opt": "OPTForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"}
_FAMILY_OF_ARCH = {arch: fam for fam, arch in ARCHITECTURES.items()}
# The prefix of the base model inside the *ForCausalLM class; checkpoints saved from the base
# model class (e.g. facebook/opt-*) lack it.
BASE_PREFIX = {"opt": "model.", "gpt_neox": "gpt_neox.", "llama": "model."}
HF_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _layer_names(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Per-layer tensor names relative to `...layers.{i}.`, with shapes."""
    h, f = spec.hidden, spec.ffn
    kv = spec.kv_heads * spec.head_dim
    if spec.family == "opt":
        out = {}
        for p in ("k_proj", "v_proj", "q_proj", "out_proj"):
            out[f"self_attn.{p}.weight"] = (h, h)
            out[f"self_attn.{p}.bias"] = (h,)
        out.update({"self_attn_layer_norm.weight": (h,), "self_attn_layer_norm.bias": (h,),
                    "fc1.weight": (f, h), "fc1.bias": (f,), "fc2.weight": (h, f), "fc2.bias": (h,),
                    "final_layer_norm.weight": (h,), "final_layer_norm.bias": (h,)})
        return out
    if spec.family == "gpt_neox":
        return {"input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
                "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
                "attention.query_key_value.weight": (3 * h, h), "attention.query_key_value.bias": (3 * h,),
                "attention.dense.weight": (h, h), "attention.dense.bias": (h,),
                "mlp.dense_h_to_4h.weight": (f, h), "mlp.dense_h_to_4h.bias": (f,),
                "mlp.dense_4h_to_h.weight": (h, f), "mlp.dense_4h_to_h.bias": (h,)}
    return {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, h),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h), "mlp.down_proj.weight": (h, f)}


def layer_prefix(spec: ModelSpec, layer: int) -> str:
    """The name prefix of decoder layer `layer`, e.g. 'model.decoder.layers.3.'."""
    base = {"opt": "model.decoder.", "gpt_neox": "gpt_neox.", "llama": "model."}[spec.family]
    return f"{base}layers.{layer}."


def embedding_names(spec: ModelSpec) -> list[str]:
    """Tensors of the first pipeline stage besides its layers: token (+ learned position) embeddings."""
    return {"opt": ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"],
            "gpt_neox": ["gpt_neox.embed_in.weight"],
            "llama": ["model.embed_tokens.weight"]}[spec.family]


def token_embedding_name(spec: ModelSpec) -> str:
    return embedding_names(spec)[0]


def final_norm_names(spec: ModelSpec) -> list[str]:
    return {"opt": ["model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"],
            "gpt_neox": ["gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias"],
            "llama": ["model.norm.weight"]}[spec.family]


def lm_head_name(spec: ModelSpec) -> str:
    """Name of the LM head weight; with tied embeddings it is absent from files (see head_source)."""
    return "embed_out.weight" if spec.family == "gpt_neox" else "lm_head.weight"


def head_source(spec: ModelSpec) -> str:
    """The tensor that holds the LM head: the token embedding when tied, else the LM head itself."""
    return token_embedding_name(spec) if spec.tie_word_embeddings else lm_head_name(spec)


def tensor_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """All tensors save_pretrained writes for `spec` (HF name -> shape), embeddings, layers, final norm, head."""
    return dict(shape_map(spec))


@functools.lru_cache(maxsize=64)
def shape_map(spec: ModelSpec) -> MappingProxyType:
    """Read-only, cached tensor_shapes(spec) (the sharding rules look names up often)."""
    h = spec.hidden
    out: dict[str, tuple[int, ...]] = {token_embedding_name(spec): (spec.vocab, h)}
    if spec.family == "opt":
        out["model.decoder.embed_positions.weight"] = (spec.max_positions + 2, h)  # OPT offsets positions by 2
    rel = _layer_names(spec)
    for i in range(spec.num_layers):
        pre = layer_prefix(spec, i)
        out.update({pre + k: v for k, v in rel.items()})
    for n in final_norm_names(spec):
        out[n] = (h,)
    if not spec.tie_word_embeddings:
        out[lm_head_name(spec)] = (spec.vocab, h)
    return MappingProxyType(out)


def layer_of(name: str) -> int | None:
    """Decoder layer index of an HF tensor name, None for embeddings, final norm and LM head."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def hf_config(spec: ModelSpec, dtype: str) -> dict:
    """A config.json dict that transformers 5.x loads as the family's *ForCausalLM.

    dtype: 'fp16' | 'bf16' | 'fp32'. Raises ValueError on an unknown dtype.
    """
    if dtype not in HF_DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(HF_DTYPES)}")
    common = {"architectures": [ARCHITECTURES[spec.family]], "model_type": spec.family,
              "vocab_size": spec.vocab, "hidden_size": spec.hidden, "num_hidden_layers": spec.num_layers,
              "num_attention_heads": spec.num_heads, "max_position_embeddings": spec.max_positions,
              "tie_word_embeddings": spec.tie_word_embeddings, "bos_token_id": spec.bos_token_id,
              "eos_token_id": spec.eos_token_id, "pad_token_id": spec.pad_token_id,
              "dtype": HF_DTYPES[dtype], "use_cache": True}
    if spec.family == "opt":
        common.update({"ffn_dim": spec.ffn, "activation_function": spec.activation, "do_layer_norm_before": True,
                       "word_embed_proj_dim": spec.hidden, "enable_bias": True, "dropout": 0.0,
                       "attention_dropout": 0.0, "init_std": 0.02})
    elif spec.family == "gpt_neox":
        common.update({"intermediate_size": spec.ffn, "hidden_act": spec.activation,
                       "layer_norm_eps": spec.norm_eps, "use_parallel_residual": True, "attention_bias": True,
                       "rope_parameters": {"rope_type": "default", "rope_theta": spec.rotary_base,
                                           "partial_rotary_factor": spec.rotary_pct},
                       "hidden_dropout": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02})
    else:
        common.update({"intermediate_size": spec.ffn, "hidden_act": spec.activation,
                       "num_key_value_heads": spec.kv_heads, "rms_norm_eps": spec.norm_eps,
                       "head_dim": spec.head_dim, "attention_bias": False, "mlp_bias": False,
                       "rope_parameters": {"rope_type": "default", "rope_theta": spec.rotary_base},
                       "attention_dropout": 0.0, "initializer_range": 0.02})
    return common


def _family(cfg: dict) -> str:
    archs = cfg.get("architectures") or []
    for arch in archs:
        if arch in _FAMILY_OF_ARCH:
            return _FAMILY_OF_ARCH[arch]
    if archs:
        raise ValueError(f"unknown architecture {archs[0]!r}; supported: {', '.join(_FAMILY_OF_ARCH)}")
    mt = cfg.get("model_type")
    if mt in ARCHITECTURES:
        return mt
    raise ValueError(f"unknown architecture (model_type {mt!r}); supported: {', '.join(_FAMILY_OF_ARCH)}")


def _need(cfg: dict, key: str, default=None):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise ValueError(f"config field {key!r} is missing")
    return default


def _rope(cfg: dict, default_pct: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from the 5.x `rope_parameters` or the legacy keys."""
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype != "default":
        raise ValueError(f"unsupported rope_type {rtype!r} (only 'default' rotary is implemented)")
    theta = rp.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000.0)))
    pct = rp.get("partial_rotary_factor", cfg.get("rotary_pct", default_pct))
    return float(theta), float(pct)


def _check(cond: bool, what: str):
    if not cond:
        raise ValueError(f"unsupported config: {what}")


def spec_from_hf_config(cfg: dict, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a config.json dict (5.x or older key styles).

    name: the spec's name; by default the known spec with the same shape, else '<family>-<L>x<H>'.
    Raises ValueError naming an unknown architecture, a missing field or an unsupported variant.
    """
    fam = _family(cfg)
    h = int(_need(cfg, "hidden_size"))
    kw = dict(family=fam, num_layers=int(_need(cfg, "num_hidden_layers")), hidden=h,
              num_heads=int(_need(cfg, "num_attention_heads")), vocab=int(_need(cfg, "vocab_size")),
              max_positions=int(_need(cfg, "max_position_embeddings", 2048)))
    eos = cfg.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, list) else eos
    if fam == "opt":
        _check(cfg.get("do_layer_norm_before", True), "OPT with do_layer_norm_before=false (post-LN, opt-350m)")
        _check(cfg.get("word_embed_proj_dim") in (None, h), "OPT with word_embed_proj_dim != hidden_size")
        _check(cfg.get("enable_bias", True) and cfg.get("layer_norm_elementwise_affine", True),
               "OPT without biases or norm affine parameters")
        _check(not cfg.get("_remove_final_layer_norm", False), "OPT without its final layer norm")
        kw.update(ffn=int(_need(cfg, "ffn_dim")), activation=cfg.get("activation_function", "relu"),
                  tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), norm_eps=1e-5)
    elif fam == "gpt_neox":
        _check(cfg.get("use_parallel_residual", True), "GPT-NeoX with use_parallel_residual=false")
        _check(cfg.get("attention_bias", True), "GPT-NeoX without attention biases")
        theta, pct = _rope(cfg, 0.25)
        kw.update(ffn=int(_need(cfg, "intermediate_size")), activation=cfg.get("hidden_act", "gelu"),
                  norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), rotary_pct=pct, rotary_base=theta,
                  tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    else:
        _check(not cfg.get("attention_bias", False) and not cfg.get("mlp_bias", False), "LLaMA with biases")
        _check(int(cfg.get("pretraining_tp", 1) or 1) == 1, "LLaMA with pretraining_tp != 1")
        heads = kw["num_heads"]
        _check(cfg.get("head_dim") in (None, h // heads), "LLaMA with head_dim != hidden_size / heads")
        theta, _ = _rope(cfg, 1.0)
        kv = cfg.get("num_key_value_heads") or heads
        kw.update(ffn=int(_need(cfg, "intermediate_size")), activation=cfg.get("hidden_act", "silu"),
                  norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rotary_base=theta,
                  num_kv_heads=None if kv == heads else int(kv),
                  tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))
    bos = cfg.get("bos_token_id")
    pad = cfg.get("pad_token_id")
    kw.update(bos_token_id=int(bos if bos is not None else eos), eos_token_id=int(eos),
              pad_token_id=int(pad if pad is not None else eos))
    shape_only = ModelSpec(name="?", **kw)
    if name is None:
        name = _known_name(shape_only) or f"{fam.replace('_', '-')}-{kw['num_layers']}x{h}"
    return ModelSpec(name=name, **kw)


def _known_name(spec: ModelSpec) -> str | None:
    """The name of a registered spec with the same tensor shapes as `spec`, if any."""
    for n in list_specs():
        known = get_spec(n)
        if known.family == spec.family and tensor_shapes(known) == tensor_shapes(spec):
            return n
    return None
