"""Megatron-style sharding rules: which slice of each HF-named tensor a (pipeline stage, tp rank) holds (no torch).

One definition serves checkpoint loading, the engine's layers and migration re-slicing:
- column-parallel (output dim 0 split): q/k/v by heads (GPT-NeoX's fused query_key_value is laid
  out [heads, 3, head_dim], so a head range is a contiguous row range), up/gate/fc1 by `partition`
  of the ffn (uneven allowed); their biases are split the same way;
- row-parallel (input dim 1 split with the matching range): out/o_proj/dense and down/fc2/dense_4h_to_h;
  their biases are replicated (added once, after the all-reduce);
- vocab-parallel embedding and LM head along the vocab dim (uneven allowed);
- everything else (norms, OPT's learned positions) replicated.
"""
from __future__ import annotations

from spotserve.models import hf
from spotserve.models.spec import ModelSpec

# Role of a per-layer tensor (name relative to the layer prefix) -> how it is split.
_ROLES = {
    "opt": {"self_attn.q_proj": "col_q", "self_attn.k_proj": "col_kv", "self_attn.v_proj": "col_kv",
            "self_attn.out_proj": "row_heads", "fc1": "col_ffn", "fc2": "row_ffn"},
    "gpt_neox": {"attention.query_key_value": "col_qkv", "attention.dense": "row_heads",
                 "mlp.dense_h_to_4h": "col_ffn", "mlp.dense_4h_to_h": "row_ffn"},
    "llama": {"self_attn.q_proj": "col_q", "self_attn.k_proj": "col_kv", "self_attn.v_proj": "col_kv",
              "self_attn.o_proj": "row_heads", "mlp.gate_proj": "col_ffn", "mlp.up_proj": "col_ffn",
              "mlp.down_proj": "row_ffn"},
}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def partition(n: int, parts: int, index: int) -> tuple[int, int]:
    """Balanced contiguous split of range(n) into `parts`; the first n % parts parts get one extra.

    Returns (start, end) of part `index`. Raises ValueError unless n >= 0, parts >= 1, 0 <= index < parts.
    """
    if not (_is_int(n) and _is_int(parts) and _is_int(index)):
        raise ValueError(f"partition needs ints, got n={n!r} parts={parts!r} index={index!r}")
    if n < 0 or parts < 1 or not 0 <= index < parts:
        raise ValueError(f"bad partition n={n} parts={parts} index={index}")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def stage_layers(num_layers: int, pp: int, stage: int) -> range:
    """Contiguous decoder layers of pipeline stage `stage` of `pp` (the first stages take one extra).

    Raises ValueError when pp > num_layers (a stage would have no layer) or on bad arguments.
    """
    if _is_int(pp) and _is_int(num_layers) and pp > num_layers:
        raise ValueError(f"pp={pp} exceeds the {num_layers} layers")
    return range(*partition(num_layers, pp, stage))


def _check_tp(spec: ModelSpec, tp: int, rank: int):
    if not _is_int(tp) or not spec.valid_tp(tp):
        raise ValueError(f"{spec.name}: tp={tp!r} does not split {spec.num_heads} heads "
                         f"({spec.kv_heads} kv heads) evenly")
    if not _is_int(rank) or not 0 <= rank < tp:
        raise ValueError(f"tp rank {rank!r} out of range for tp={tp}")


def _layer_rel(spec: ModelSpec, name: str) -> str | None:
    """`name` relative to its layer prefix, without .weight/.bias; None when not a layer tensor."""
    layer = hf.layer_of(name)
    if layer is None:
        return None
    pre = hf.layer_prefix(spec, layer)
    if not name.startswith(pre):
        return None
    return name[len(pre):].rsplit(".", 1)[0]


def shard_slice(spec: ModelSpec, name: str, tp: int, rank: int) -> tuple[int, int, int] | None:
    """(dim, start, end) of HF tensor `name` held by tp rank `rank`; None when replicated.

    Raises ValueError for a tp that spec.valid_tp rejects, a bad rank, or a name the family lacks.
    """
    _check_tp(spec, tp, rank)
    shapes = hf.shape_map(spec)
    if name not in shapes and name != hf.lm_head_name(spec):
        raise ValueError(f"{spec.name} has no tensor {name!r}")
    if name in (hf.token_embedding_name(spec), hf.lm_head_name(spec)):
        return (0, *partition(spec.vocab, tp, rank))
    rel = _layer_rel(spec, name)
    role = _ROLES[spec.family].get(rel) if rel is not None else None
    if role is None:
        return None
    is_bias = name.endswith(".bias")
    hd = spec.head_dim
    heads = spec.num_heads // tp
    kv_heads = spec.kv_heads // tp
    if role == "col_q":
        return 0, rank * heads * hd, (rank + 1) * heads * hd
    if role == "col_kv":
        return 0, rank * kv_heads * hd, (rank + 1) * kv_heads * hd
    if role == "col_qkv":
        return 0, rank * heads * 3 * hd, (rank + 1) * heads * 3 * hd
    if role == "col_ffn":
        return (0, *partition(spec.ffn, tp, rank))
    if is_bias:  # row-parallel bias: replicated, added once after the all-reduce
        return None
    if role == "row_heads":
        return 1, rank * heads * hd, (rank + 1) * heads * hd
    return (1, *partition(spec.ffn, tp, rank))  # row_ffn


def shard_shape(spec: ModelSpec, name: str, tp: int, rank: int) -> tuple[int, ...]:
    """Shape of the shard of `name` that tp rank `rank` holds."""
    shape = list(hf.shape_map(spec).get(name) or (spec.vocab, spec.hidden))
    sl = shard_slice(spec, name, tp, rank)
    if sl is not None:
        shape[sl[0]] = sl[2] - sl[1]
    return tuple(shape)


def stage_tensor_names(spec: ModelSpec, pp: int, stage: int) -> list[str]:
    """HF tensor names pipeline stage `stage` of `pp` needs: its layers; embeddings (+ positions) on
    stage 0; final norm and LM head on the last stage (the token embedding when tied, listed once)."""
    layers = stage_layers(spec.num_layers, pp, stage)
    shapes = hf.shape_map(spec)
    names: list[str] = []
    if stage == 0:
        names += hf.embedding_names(spec)
    names += [n for n in shapes if (li := hf.layer_of(n)) is not None and li in layers]
    if stage == pp - 1:
        names += hf.final_norm_names(spec)
        head = hf.head_source(spec)
        if head not in names:
            names.append(head)
    return names
