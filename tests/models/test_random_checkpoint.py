"""Random checkpoints: CLI, file layout, determinism, sharding into several files, dtypes, init scale."""
import json

import pytest
import torch
from safetensors import safe_open

from spotserve.checkpoint.__main__ import main
from spotserve.models import get_spec, hf, list_specs
from spotserve.models.checkpoint import plan_shards, write_random_checkpoint


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_cli_list(capsys):
    assert main(["list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list_specs()
    assert {"opt-tiny", "gpt-neox-tiny", "llama-tiny", "opt-6.7b", "gpt-neox-20b", "llama-30b"} <= set(names)
    assert all(n.endswith("-tiny") == (get_spec(n).hidden < 256) for n in names)


def test_cli_random_writes_loadable_folder(tmp_path, capsys):
    out = tmp_path / "neox"
    assert main(["random", "--model", "gpt-neox-tiny", "--out", str(out), "--seed", "3", "--dtype", "bf16"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"] and cfg["dtype"] == "bfloat16"
    tensors = _tensors(out)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == hf.tensor_shapes(get_spec("gpt-neox-tiny"))
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    # A second write into a folder that holds a checkpoint is refused, not merged.
    assert main(["random", "--model", "gpt-neox-tiny", "--out", str(out)]) == 1
    assert "already holds" in capsys.readouterr().err


def test_cli_rejects_unknown_model(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["random", "--model", "gpt-5", "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_deterministic_per_seed(tmp_path):
    spec = get_spec("llama-tiny")
    write_random_checkpoint(spec, tmp_path / "a", seed=7, dtype="fp16")
    write_random_checkpoint(spec, tmp_path / "b", seed=7, dtype="fp16")
    write_random_checkpoint(spec, tmp_path / "c", seed=8, dtype="fp16")
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    a, c = _tensors(tmp_path / "a"), _tensors(tmp_path / "c")
    assert all(not torch.equal(a[k], c[k]) for k in a)


def test_several_files_same_tensors_as_one(tmp_path):
    spec = get_spec("opt-tiny")
    write_random_checkpoint(spec, tmp_path / "one", seed=1, dtype="fp32")
    files = write_random_checkpoint(spec, tmp_path / "many", seed=1, dtype="fp32", max_shard_bytes=60_000)
    assert len(files) > 3
    index = json.loads((tmp_path / "many/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(hf.tensor_shapes(spec))
    assert set(index["weight_map"].values()) == {f.name for f in files}
    one, many = _tensors(tmp_path / "one"), _tensors(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in one.values())
    assert "lm_head.weight" not in one  # tied to the token embedding, absent as save_pretrained does


def test_plan_shards_bounds_file_size():
    spec = get_spec("llama-30b")
    shapes = hf.tensor_shapes(spec)
    shards = plan_shards(spec, "fp16", 2 << 30)
    assert [n for s in shards for n in s] == list(shapes)
    for names in shards:
        size = sum(torch.Size(shapes[n]).numel() * 2 for n in names)
        assert size <= 2 << 30 or len(names) == 1
    with pytest.raises(ValueError):
        plan_shards(spec, "fp16", 0)


def test_init_scale(tiny_ckpt):
    t = _tensors(tiny_ckpt["llama-tiny"])
    w = t["model.layers.0.mlp.up_proj.weight"]
    assert abs(w.std().item() - 2 / 48 ** 0.5) < 0.03
    norm = t["model.layers.0.input_layernorm.weight"]
    assert (norm - 1).abs().max() < 0.1 and not torch.equal(norm, torch.ones_like(norm))
    nt = _tensors(tiny_ckpt["gpt-neox-tiny"])
    bias = nt["gpt_neox.layers.0.mlp.dense_4h_to_h.bias"]
    assert 0 < bias.abs().max() < 0.1


def test_bad_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        write_random_checkpoint(get_spec("opt-tiny"), tmp_path / "x", dtype="int8")
