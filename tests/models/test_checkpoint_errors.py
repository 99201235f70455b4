"""Bad checkpoint folders: each gets one CheckpointError naming the file and the problem."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from spotserve.models.loader import CheckpointError, CheckpointReader, load_shard


@pytest.fixture
def ckpt(tmp_path, tiny_ckpt):
    """A private copy of the llama-tiny checkpoint to damage."""
    dst = tmp_path / "llama"
    shutil.copytree(tiny_ckpt["llama-tiny"], dst)
    return dst


def _config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.*not found"):
        CheckpointReader(tmp_path / "nowhere")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json.*not found"):
        CheckpointReader(ckpt)


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text("{'architectures': ")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        CheckpointReader(ckpt)


def test_unknown_architecture(ckpt):
    _config(ckpt, architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(CheckpointError, match="config.json.*unknown architecture 'MambaForCausalLM'"):
        CheckpointReader(ckpt)


def test_shape_disagrees_with_config(ckpt):
    _config(ckpt, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*mlp.*shape \[80, 48\].*\[96, 48\]"):
        CheckpointReader(ckpt)


@pytest.mark.parametrize("keep", [4, 100, -64])
def test_truncated_safetensors(ckpt, keep):
    path = ckpt / "model.safetensors"
    size = path.stat().st_size
    os.truncate(path, keep if keep > 0 else size + keep)
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        CheckpointReader(ckpt)


def test_corrupt_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        CheckpointReader(ckpt)


def test_missing_tensor(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.3.self_attn.v_proj.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*model.layers.3.self_attn.v_proj.weight"):
        CheckpointReader(ckpt)


def test_index_names_missing_file(ckpt):
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    save_file(tensors, ckpt / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}
    index["weight_map"]["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file not found"):
        CheckpointReader(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="index.json.*bad file name"):
        CheckpointReader(ckpt)


def test_pickle_weights_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickled"):
        CheckpointReader(ckpt)


def test_several_files_without_index(ckpt):
    shutil.copy(ckpt / "model.safetensors", ckpt / "b.safetensors")
    (ckpt / "model.safetensors").rename(ckpt / "a.safetensors")
    with pytest.raises(CheckpointError, match="2 .safetensors files but no model.safetensors.index.json"):
        CheckpointReader(ckpt)


def test_bad_reads_and_positions(tiny_ckpt):
    reader = CheckpointReader(tiny_ckpt["llama-tiny"])
    with pytest.raises(CheckpointError, match="no tensor 'lm_head.bias'"):
        reader.read("lm_head.bias")
    with pytest.raises(ValueError, match="outside"):
        reader.read("model.norm.weight", 0, 10, 60)
    with pytest.raises(ValueError, match="dim 2"):
        reader.read("model.norm.weight", 2, 0, 1)
    with pytest.raises(ValueError, match="tp=4"):
        load_shard(tiny_ckpt["llama-tiny"], 1, 0, 4, 0)
    with pytest.raises(ValueError, match="pp=6"):
        load_shard(tiny_ckpt["llama-tiny"], 6, 0, 1, 0)
