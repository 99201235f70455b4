"""HF naming: config.json round trips, public configs, tensor names/shapes against transformers' own models."""
import json

import pytest
import torch
import transformers

from spotserve.models import get_spec, hf
from spotserve.models.spec import ModelSpec

# The fields that matter, as published on the Hugging Face hub (older key styles on purpose).
PUBLIC = {
    "opt-6.7b": {  # facebook/opt-6.7b
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "activation_function": "relu",
        "hidden_size": 4096, "ffn_dim": 16384, "num_attention_heads": 32, "num_hidden_layers": 32,
        "max_position_embeddings": 2048, "vocab_size": 50272, "word_embed_proj_dim": 4096,
        "do_layer_norm_before": True, "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1,
        "torch_dtype": "float16"},
    "gpt-neox-20b": {  # EleutherAI/gpt-neox-20b
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_act": "gelu_fast",
        "hidden_size": 6144, "intermediate_size": 24576, "num_attention_heads": 64, "num_hidden_layers": 44,
        "max_position_embeddings": 2048, "vocab_size": 50432, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "layer_norm_eps": 1e-05, "tie_word_embeddings": False, "use_parallel_residual": True,
        "bos_token_id": 0, "eos_token_id": 0, "torch_dtype": "float16"},
    "llama-30b": {  # huggyllama/llama-30b
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": 6656, "intermediate_size": 17920, "num_attention_heads": 52, "num_hidden_layers": 60,
        "max_position_embeddings": 2048, "vocab_size": 32000, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "float16"},
}
SHAPE_FIELDS = ("family", "num_layers", "hidden", "num_heads", "ffn", "vocab", "max_positions", "kv_heads",
                "norm_eps", "rotary_pct", "rotary_base", "tie_word_embeddings", "activation")


@pytest.mark.parametrize("name", list(PUBLIC))
def test_spec_figures_match_public_configs(name):
    got = hf.spec_from_hf_config(PUBLIC[name])
    want = get_spec(name)
    assert got.name == name  # recognised by shape
    for f in SHAPE_FIELDS:
        assert getattr(got, f) == getattr(want, f), f


@pytest.mark.parametrize("name", ["opt-6.7b", "gpt-neox-20b", "llama-30b", "opt-tiny", "gpt-neox-tiny",
                                  "llama-tiny"])
def test_tensor_shapes_match_transformers_model(name):
    """Names and shapes equal those of transformers' model built from our config (on meta: no memory)."""
    spec = get_spec(name)
    cfg = transformers.AutoConfig.for_model(**hf.hf_config(spec, "fp16"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == hf.ARCHITECTURES[spec.family]
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if spec.family == "gpt_neox":  # save_pretrained writes lm_head as embed_out (transformers' renaming)
        theirs["embed_out.weight"] = theirs.pop("lm_head.weight")
    if spec.tie_word_embeddings:
        del theirs["lm_head.weight"]
    assert hf.tensor_shapes(spec) == theirs
    assert spec.total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["opt-6.7b", "gpt-neox-20b", "llama-30b", "paper-30b", "opt-tiny",
                                  "gpt-neox-tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_hf_config_round_trip_through_transformers(tmp_path, name, dtype):
    spec = get_spec(name)
    (tmp_path / "config.json").write_text(json.dumps(hf.hf_config(spec, dtype)))
    cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    cfg.save_pretrained(tmp_path / "resaved")  # what transformers writes back must parse to the same spec
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert hf.spec_from_hf_config(resaved, name=name) == spec
    assert hf.spec_from_hf_config(hf.hf_config(spec, dtype)) == spec
    assert str(cfg.dtype).endswith({"fp16": "float16", "fp32": "float32"}[dtype])


def test_unknown_architecture_and_variants_rejected():
    with pytest.raises(ValueError, match="BertForMaskedLM"):
        hf.spec_from_hf_config({"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    with pytest.raises(ValueError, match="t5"):
        hf.spec_from_hf_config({"model_type": "t5"})
    opt350 = dict(PUBLIC["opt-6.7b"], hidden_size=1024, word_embed_proj_dim=512, num_attention_heads=16)
    with pytest.raises(ValueError, match="word_embed_proj_dim"):
        hf.spec_from_hf_config(opt350)
    with pytest.raises(ValueError, match="do_layer_norm_before"):
        hf.spec_from_hf_config(dict(PUBLIC["opt-6.7b"], do_layer_norm_before=False))
    with pytest.raises(ValueError, match="rope_type"):
        hf.spec_from_hf_config(dict(PUBLIC["llama-30b"], rope_scaling={"type": "linear", "factor": 2.0}))
    no_layers = dict(PUBLIC["llama-30b"])
    del no_layers["num_hidden_layers"]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        hf.spec_from_hf_config(no_layers)
    with pytest.raises(ValueError, match="dtype"):
        hf.hf_config(get_spec("opt-tiny"), "int8")


def test_gqa_and_unknown_shapes_get_a_name():
    cfg = dict(PUBLIC["llama-30b"], num_key_value_heads=4, hidden_size=512, num_attention_heads=8,
               num_hidden_layers=3)
    spec = hf.spec_from_hf_config(cfg)
    assert spec.name == "llama-3x512" and spec.kv_heads == 4
    assert hf.tensor_shapes(spec)["model.layers.0.self_attn.k_proj.weight"] == (4 * 64, 512)
    assert isinstance(spec, ModelSpec)


def test_layer_of():
    assert hf.layer_of("model.decoder.layers.12.fc1.weight") == 12
    assert hf.layer_of("gpt_neox.layers.0.attention.dense.bias") == 0
    assert hf.layer_of("model.layers.59.mlp.up_proj.weight") == 59
    assert hf.layer_of("model.embed_tokens.weight") is None
    assert hf.layer_of("embed_out.weight") is None
    assert hf.layer_of("model.decoder.final_layer_norm.weight") is None
