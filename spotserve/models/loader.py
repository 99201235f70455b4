"""Read a Hugging Face safetensors checkpoint folder and hand each (pp stage, tp rank) only its slices.

Reads through safetensors' `safe_open` (mmap) + `get_slice`, so a shard costs the bytes of its slice,
not of the whole tensor. Handles folders written by `python -m spotserve.checkpoint random` and by
transformers' `save_pretrained` (single file or sharded with model.safetensors.index.json, tied LM
head absent, checkpoints saved from the base model class without its name prefix, extra buffers
such as `attention.masked_bias` or `rotary_emb.inv_freq`, which are ignored). Pickle-based .bin
checkpoints are refused, never unpickled.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from spotserve.models import hf
from spotserve.models.sharding import shard_slice, stage_tensor_names
from spotserve.models.spec import ModelSpec

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read; the message names the file and the problem."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _weight_files(root: Path) -> dict[str, list[str]]:
    """file name -> tensor keys it should hold, from the index json or the single file."""
    index = root / INDEX_FILE
    if index.exists():
        wmap = _read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise CheckpointError(f"{index}: missing or empty 'weight_map'")
        files: dict[str, list[str]] = {}
        for key, fname in wmap.items():
            if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
                raise CheckpointError(f"{index}: bad file name {fname!r} for tensor {key!r}")
            files.setdefault(fname, []).append(key)
        return files
    if (root / SINGLE_FILE).exists():
        return {SINGLE_FILE: []}
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if len(found) == 1:
        return {found[0]: []}
    if found:
        raise CheckpointError(f"{root}: {len(found)} .safetensors files but no {INDEX_FILE}")
    if list(root.glob("*.bin")) or list(root.glob("*.pt")):
        raise CheckpointError(f"{root}: only pickle-based weights (.bin/.pt) found; they are never unpickled, "
                              f"re-save with save_pretrained(safe_serialization=True)")
    raise CheckpointError(f"{root}: no {SINGLE_FILE} or {INDEX_FILE}")


def _diagnose(path: Path) -> str:
    """Say whether a safetensors file safe_open refused is truncated (and by how much) or corrupt."""
    size = path.stat().st_size
    if size < 8:
        return f"truncated safetensors file ({size} bytes, not even the 8-byte header length)"
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if 8 + n > size:
            return f"truncated safetensors file (header of {n} bytes, file of {size})"
        try:
            header = json.loads(f.read(n))
            need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                               default=0)
        except (ValueError, TypeError, KeyError, IndexError):
            return "corrupt safetensors header"
    if need > size:
        return f"truncated safetensors file ({size} bytes, its header describes {need})"
    return "corrupt safetensors file"


class CheckpointReader:
    """A checkpoint folder: spec from config.json, tensors by HF name, sliced reads.

    Attributes: spec (ModelSpec), dtype (torch dtype of the stored weights), path, bytes_read
    (tensor bytes returned by read() so far). Raises CheckpointError on any bad input.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint folder not found")
        cfg_path = self.path / "config.json"
        try:
            self.spec: ModelSpec = hf.spec_from_hf_config(_read_json(cfg_path))
        except CheckpointError:
            raise
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: {e}") from None
        self.bytes_read = 0
        self._handles: dict[str, object] = {}
        self._where: dict[str, tuple[str, str]] = {}  # HF name -> (file, key stored in the file)
        self._open_all()
        self._check_tensors()
        self.dtype = self._stored_dtype(hf.token_embedding_name(self.spec))

    def _open_all(self):
        stored: dict[str, str] = {}
        for fname, listed in _weight_files(self.path).items():
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: file not found (listed in {INDEX_FILE})")
            try:
                handle = safe_open(str(fpath), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{fpath}: {_diagnose(fpath)} ({e})") from None
            missing = sorted(set(listed) - set(keys))
            if missing:
                raise CheckpointError(f"{fpath}: lacks {len(missing)} tensors the index lists, e.g. {missing[0]!r}")
            self._handles[fname] = handle
            for k in keys:
                stored[k] = fname
        prefix = hf.BASE_PREFIX[self.spec.family]
        for name in hf.tensor_shapes(self.spec):
            # A checkpoint saved from the base model class stores names without its prefix.
            for key in (name, name[len(prefix):] if name.startswith(prefix) else None):
                if key is not None and key in stored:
                    self._where[name] = (stored[key], key)
                    break
        # Some save_pretrained versions keep a tied LM head; read it if it is there.
        head = hf.lm_head_name(self.spec)
        if self.spec.tie_word_embeddings and head in stored:
            self._where[head] = (stored[head], head)

    def _check_tensors(self):
        expected = hf.tensor_shapes(self.spec)
        missing = [n for n in expected if n not in self._where]
        if missing:
            raise CheckpointError(f"{self.path}: {len(missing)} tensors of {self.spec.name} are missing, "
                                  f"e.g. {missing[0]!r}")
        for name, want in expected.items():
            got = self.shape(name)
            if got != want:
                fname = self._where[name][0]
                raise CheckpointError(f"{self.path / fname}: tensor {name!r} has shape {list(got)}, "
                                      f"config.json implies {list(want)}")
            dt = self._slice(name).get_dtype()
            if dt not in _ST_DTYPES:
                raise CheckpointError(f"{self.path / self._where[name][0]}: tensor {name!r} has "
                                      f"unsupported dtype {dt}")

    def close(self):
        """Drop the file handles (and their mmaps); tensors already read stay valid."""
        self._handles.clear()
        self._where.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _slice(self, name: str):
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor {name!r} in this checkpoint")
        fname, key = self._where[name]
        return self._handles[fname].get_slice(key)

    def _stored_dtype(self, name: str) -> torch.dtype:
        return _ST_DTYPES[self._slice(name).get_dtype()]

    def names(self) -> list[str]:
        """HF names of the model's tensors present in the folder (a tied LM head is absent)."""
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        """Full shape of tensor `name` as stored."""
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int | None = None,
             end: int | None = None) -> torch.Tensor:
        """Tensor `name`, or its rows/columns [start, end) along `dim`, reading only those bytes.

        Raises CheckpointError for an unknown name, ValueError for a slice outside the tensor.
        """
        sl = self._slice(name)
        shape = sl.get_shape()
        if dim is None:
            if start is not None or end is not None:
                raise ValueError("start/end given without dim")
            out = sl[:]
        else:
            if not 0 <= dim < len(shape):
                raise ValueError(f"{name}: dim {dim} out of range for shape {shape}")
            start = 0 if start is None else start
            end = shape[dim] if end is None else end
            if not 0 <= start <= end <= shape[dim]:
                raise ValueError(f"{name}: slice [{start}, {end}) outside dim {dim} of size {shape[dim]}")
            index = tuple(slice(start, end) if d == dim else slice(None) for d in range(len(shape)))
            out = sl[index]
        self.bytes_read += out.numel() * out.element_size()
        return out

    def read_shard(self, name: str, tp: int, rank: int) -> torch.Tensor:
        """The part of `name` tp rank `rank` holds (sharding.shard_slice); the whole tensor if replicated."""
        sl = shard_slice(self.spec, name, tp, rank)
        return self.read(name) if sl is None else self.read(name, *sl)


def load_shard(path: str | Path | CheckpointReader, pp: int, stage: int, tp: int, rank: int,
               dtype: torch.dtype | str | None = None) -> dict[str, torch.Tensor]:
    """HF name -> tensor slice for position (stage, tp rank) of a pp x tp split of the checkpoint.

    path: a checkpoint folder, or an open CheckpointReader (saves re-validating the folder).
    dtype: cast to this (torch dtype or 'fp16'|'bf16'|'fp32'); None keeps the stored dtype.
    With tied embeddings the last stage gets the token embedding (its LM head) under the embedding's name.
    Raises CheckpointError on a bad folder, ValueError on a bad (pp, stage, tp, rank).
    """
    if isinstance(dtype, str):
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(TORCH_DTYPES)}")
        dtype = TORCH_DTYPES[dtype]
    reader = path if isinstance(path, CheckpointReader) else CheckpointReader(path)
    out = {}
    for name in stage_tensor_names(reader.spec, pp, stage):
        t = reader.read_shard(name, tp, rank)
        out[name] = t if dtype is None else t.to(dtype)
    return out
