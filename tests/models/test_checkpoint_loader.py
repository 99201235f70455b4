"""Checkpoint loader: same logits as transformers, exact sharded reassembly, sliced reads, save_pretrained folders."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from spotserve.models import get_spec, hf
from spotserve.models.loader import CheckpointReader, load_shard
from spotserve.models.reference import reference_logits
from spotserve.models.sharding import shard_slice, stage_tensor_names

TINY = ["opt-tiny", "gpt-neox-tiny", "llama-tiny"]


def _hf_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits, model


@pytest.mark.parametrize("name", TINY)
def test_same_logits_as_transformers(tiny_ckpt, name):
    folder = tiny_ckpt[name]
    reader = CheckpointReader(folder)
    assert reader.spec == get_spec(name) and reader.dtype == torch.float32
    ids = torch.randint(0, reader.spec.vocab, (2, 13), generator=torch.Generator().manual_seed(0))
    want, _ = _hf_logits(folder, ids)
    got = reference_logits(reader.spec, load_shard(folder, 1, 0, 1, 0), ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.5  # the random init gives logits with real spread


def _reassemble(spec, folder, pp, tp):
    """Full tensors rebuilt from every (stage, rank) shard; checks replicated copies agree."""
    full: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        parts = [load_shard(folder, pp, stage, tp, rank) for rank in range(tp)]
        assert all(list(p) == stage_tensor_names(spec, pp, stage) for p in parts)
        for name in parts[0]:
            sl = shard_slice(spec, name, tp, 0)
            if sl is None:
                assert all(torch.equal(p[name], parts[0][name]) for p in parts)
                t = parts[0][name]
            else:
                t = torch.cat([p[name] for p in parts], dim=sl[0])
            if name in full:  # tied embedding: stage 0 and the last stage must agree
                assert torch.equal(full[name], t)
            full[name] = t
    return full


@pytest.mark.parametrize("name", TINY)
def test_every_pp_tp_split_reassembles_exactly(tiny_ckpt, name):
    spec = get_spec(name)
    reader = CheckpointReader(tiny_ckpt[name])
    whole = {n: reader.read(n) for n in reader.names()}
    tps = [tp for tp in range(1, spec.num_heads + 1) if spec.valid_tp(tp)]
    assert tps == [1, 2, 3, 6]
    for pp in range(1, 6):
        for tp in tps:
            full = _reassemble(spec, tiny_ckpt[name], pp, tp)
            assert full.keys() == whole.keys(), (pp, tp)
            for n, t in whole.items():
                assert torch.equal(full[n], t), (pp, tp, n)


def test_reads_only_the_slice_bytes(tiny_ckpt):
    folder = tiny_ckpt["llama-tiny"]
    reader = CheckpointReader(folder)
    name = "model.layers.1.mlp.down_proj.weight"  # [48, 80], column slice
    part = reader.read(name, 1, 27, 54)
    assert part.shape == (48, 27) and reader.bytes_read == 48 * 27 * 4
    assert torch.equal(part, reader.read(name)[:, 27:54])
    # A (stage, rank) reads about 1/(pp*tp) of the model plus its replicated norms.
    total = sum(torch.Size(s).numel() * 4 for s in hf.tensor_shapes(reader.spec).values())
    r2 = CheckpointReader(folder)
    for n in stage_tensor_names(r2.spec, 5, 2):
        r2.read_shard(n, 3, 1)
    assert r2.bytes_read < total / 12


def test_dtype_cast(tiny_ckpt):
    out = load_shard(tiny_ckpt["opt-tiny"], 2, 1, 2, 0, dtype="fp16")
    assert all(t.dtype == torch.float16 for t in out.values())
    with pytest.raises(ValueError, match="dtype"):
        load_shard(tiny_ckpt["opt-tiny"], 1, 0, 1, 0, dtype="fp8")


@pytest.mark.parametrize("name", TINY)
def test_save_pretrained_folder_several_files(tmp_path, name):
    """A folder written by transformers itself (sharded, tied head absent) loads and gives its logits."""
    spec = get_spec(name)
    cfg = transformers.AutoConfig.for_model(**hf.hf_config(spec, "fp32"))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids = torch.randint(0, spec.vocab, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    reader = CheckpointReader(tmp_path)
    assert reader.spec == spec
    state = model.state_dict()
    for n in reader.names():
        assert torch.equal(reader.read(n), state["lm_head.weight" if n == "embed_out.weight" else n]), n
    full = _reassemble(spec, tmp_path, 2, 3)
    torch.testing.assert_close(reference_logits(spec, full, ids), want, rtol=1e-5, atol=1e-5)


def test_base_model_names_and_extra_buffers(tmp_path, tiny_ckpt):
    """facebook/opt-* store names without 'model.'; old GPT-NeoX files carry masked_bias/inv_freq buffers."""
    src = load_file(tiny_ckpt["opt-tiny"] / "model.safetensors")
    (tmp_path / "opt").mkdir()
    save_file({k.removeprefix("model."): v for k, v in src.items()}, tmp_path / "opt" / "model.safetensors")
    (tmp_path / "opt" / "config.json").write_bytes((tiny_ckpt["opt-tiny"] / "config.json").read_bytes())
    a, b = load_shard(tiny_ckpt["opt-tiny"], 2, 1, 3, 2), load_shard(tmp_path / "opt", 2, 1, 3, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    src = load_file(tiny_ckpt["gpt-neox-tiny"] / "model.safetensors")
    src["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    src["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(2)
    (tmp_path / "neox").mkdir()
    save_file(src, tmp_path / "neox" / "model.safetensors")
    (tmp_path / "neox" / "config.json").write_bytes((tiny_ckpt["gpt-neox-tiny"] / "config.json").read_bytes())
    reader = CheckpointReader(tmp_path / "neox")
    assert set(reader.names()) == set(hf.tensor_shapes(reader.spec))


def test_reader_reuse_and_close(tiny_ckpt):
    with CheckpointReader(tiny_ckpt["gpt-neox-tiny"]) as reader:
        a = load_shard(reader, 3, 2, 2, 1)
        b = load_shard(tiny_ckpt["gpt-neox-tiny"], 3, 2, 2, 1)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert reader.bytes_read == sum(t.numel() * 4 for t in a.values())
    assert a["embed_out.weight"].shape == (80, 48)  # still valid after close
