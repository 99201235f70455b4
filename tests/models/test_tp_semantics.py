"""The sharding rules compute the same model: a Megatron-style tp forward over load_shard's slices
(column-parallel local heads/ffn, row-parallel partial sums + bias once, vocab-parallel embedding
and head) gives the reference logits. Reassembly alone cannot catch a wrong but consistent split."""
import pytest
import torch
import torch.nn.functional as F

from spotserve.models import hf
from spotserve.models.loader import CheckpointReader, load_shard
from spotserve.models.reference import (activation, apply_rotary, causal_attention, reference_logits,
                                        rms_norm, rotary_tables)
from spotserve.models.sharding import shard_slice

TINY = ["opt-tiny", "gpt-neox-tiny", "llama-tiny"]


def _heads(x, n):
    b, t, _ = x.shape
    return x.view(b, t, n, -1).transpose(1, 2)


def _ln(spec, x, w, b):
    return F.layer_norm(x, (spec.hidden,), w, b, spec.norm_eps)


def _tp_layer(spec, ws, x, cos, sin):
    """One decoder layer; ws[r](rel) is rank r's shard of the layer tensor `rel`."""
    tp = len(ws)
    heads, kv = spec.num_heads // tp, spec.kv_heads // tp
    if spec.family == "opt":
        h = _ln(spec, x, ws[0]("self_attn_layer_norm.weight"), ws[0]("self_attn_layer_norm.bias"))
        attn = 0
        for w in ws:
            q, k, v = (_heads(F.linear(h, w(f"self_attn.{p}_proj.weight"), w(f"self_attn.{p}_proj.bias")), heads)
                       for p in "qkv")
            attn = attn + F.linear(causal_attention(q, k, v), w("self_attn.out_proj.weight"))
        x = x + attn + ws[0]("self_attn.out_proj.bias")
        h = _ln(spec, x, ws[0]("final_layer_norm.weight"), ws[0]("final_layer_norm.bias"))
        mlp = sum(F.linear(activation(spec.activation, F.linear(h, w("fc1.weight"), w("fc1.bias"))),
                           w("fc2.weight")) for w in ws)
        return x + mlp + ws[0]("fc2.bias")
    if spec.family == "gpt_neox":
        h = _ln(spec, x, ws[0]("input_layernorm.weight"), ws[0]("input_layernorm.bias"))
        m = _ln(spec, x, ws[0]("post_attention_layernorm.weight"), ws[0]("post_attention_layernorm.bias"))
        out = x + ws[0]("attention.dense.bias") + ws[0]("mlp.dense_4h_to_h.bias")
        for w in ws:
            qkv = _heads(F.linear(h, w("attention.query_key_value.weight"), w("attention.query_key_value.bias")),
                         heads)
            q, k, v = qkv.chunk(3, dim=-1)
            a = causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
            out = out + F.linear(a, w("attention.dense.weight"))
            up = activation(spec.activation, F.linear(m, w("mlp.dense_h_to_4h.weight"), w("mlp.dense_h_to_4h.bias")))
            out = out + F.linear(up, w("mlp.dense_4h_to_h.weight"))
        return out
    h = rms_norm(x, ws[0]("input_layernorm.weight"), spec.norm_eps)
    for w in ws:
        q = _heads(F.linear(h, w("self_attn.q_proj.weight")), heads)
        k = _heads(F.linear(h, w("self_attn.k_proj.weight")), kv)
        v = _heads(F.linear(h, w("self_attn.v_proj.weight")), kv)
        a = causal_attention(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v)
        x = x + F.linear(a, w("self_attn.o_proj.weight"))
    h = rms_norm(x, ws[0]("post_attention_layernorm.weight"), spec.norm_eps)
    return x + sum(F.linear(activation(spec.activation, F.linear(h, w("mlp.gate_proj.weight")))
                            * F.linear(h, w("mlp.up_proj.weight")), w("mlp.down_proj.weight")) for w in ws)


def tp_logits(spec, shards, ids):
    """Forward over a single stage's tp shards (list of dicts, one per rank)."""
    tp = len(shards)
    emb = hf.token_embedding_name(spec)
    x = 0
    for r, s in enumerate(shards):  # vocab-parallel lookup: each rank embeds the ids it owns
        _, lo, hi = shard_slice(spec, emb, tp, r)
        own = (ids >= lo) & (ids < hi)
        x = x + s[emb][(ids - lo).clamp(0, hi - lo - 1)] * own[..., None]
    t = ids.shape[1]
    cos = sin = None
    if spec.family == "opt":
        x = x + shards[0]["model.decoder.embed_positions.weight"][torch.arange(t) + 2]
    else:
        cos, sin = rotary_tables(spec, torch.arange(t), torch.float32)
    for i in range(spec.num_layers):
        pre = hf.layer_prefix(spec, i)
        ws = [lambda rel, s=s: s[pre + rel] for s in shards]
        x = _tp_layer(spec, ws, x, cos, sin)
    norm = hf.final_norm_names(spec)
    if spec.norm == "rmsnorm":
        x = rms_norm(x, shards[0][norm[0]], spec.norm_eps)
    else:
        x = _ln(spec, x, shards[0][norm[0]], shards[0][norm[1]])
    return torch.cat([x @ s[hf.head_source(spec)].T for s in shards], dim=-1)  # gather vocab slices


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("tp", [2, 3, 6])
def test_tp_forward_over_shards_matches_reference(tiny_ckpt, name, tp):
    reader = CheckpointReader(tiny_ckpt[name])
    spec = reader.spec
    ids = torch.randint(0, spec.vocab, (2, 7), generator=torch.Generator().manual_seed(tp))
    want = reference_logits(spec, load_shard(reader, 1, 0, 1, 0), ids)
    shards = [load_shard(reader, 1, 0, tp, r) for r in range(tp)]
    with torch.no_grad():
        got = tp_logits(spec, shards, ids)

