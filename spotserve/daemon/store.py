"""Weight shards kept in a context daemon: re-attach them when present, load them once otherwise.

Buffer names describe content, not position: `w/<hf name>` for a whole tensor and
`w/<hf name>/<dim>:<start>:<end>` for a tp slice, so a GPU whose position changes keeps whatever
slices still apply. A buffer is sealed only after it is completely written; an engine killed in
the middle of a load leaves an unsealed buffer that the next engine rewrites instead of trusting.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from spotserve.daemon.client import DaemonClient
from spotserve.daemon.mapping import dtype_name, torch_dtype
from spotserve.daemon.protocol import DaemonError


def weight_buffer_name(name: str, sl: tuple[int, int, int] | None) -> str:
    """Daemon buffer name of HF tensor `name`, whole (sl None) or its (dim, start, end) slice."""
    return f"w/{name}" if sl is None else f"w/{name}/{sl[0]}:{sl[1]}:{sl[2]}"


@dataclass
class AttachReport:
    """What one load_or_attach call did: tensors and bytes re-attached vs (re)loaded."""

    attached: int = 0
    attached_bytes: int = 0
    loaded: int = 0
    loaded_bytes: int = 0


def load_or_attach(client: DaemonClient, wanted: dict[str, tuple[tuple[int, ...], torch.dtype]],
                   load: Callable[[str], torch.Tensor]) -> tuple[dict[str, torch.Tensor], AttachReport]:
    """Tensors over daemon buffers for every buffer name in `wanted` (name -> (shape, dtype)).

    Sealed buffers of the right shape are mapped as they are; missing or unsealed ones are
    allocated, filled with `load(name)` (which must return that shape) and sealed. A sealed buffer
    with another shape or dtype raises DaemonError(code="exists").
    """
    out: dict[str, torch.Tensor] = {}
    report = AttachReport()
    present = {b.name: b for b in client.list()}
    for name, (shape, dtype) in wanted.items():
        info = present.get(name)
        if info is not None and info.sealed:
            if info.shape != tuple(shape) or torch_dtype(info.dtype) != dtype:
                raise DaemonError("exists", f"buffer {name!r} holds {info.dtype}{list(info.shape)}, "
                                            f"wanted {dtype}{list(shape)}")
            out[name] = client.attach(info)
            report.attached += 1
            report.attached_bytes += info.nbytes
            continue
        info = client.allocate(name, shape, dtype_name(dtype))
        tensor = client.attach(info)
        value = load(name)
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"load({name!r}) returned shape {tuple(value.shape)}, expected {tuple(shape)}")
        tensor.copy_(value)
        client.seal(name)
        out[name] = tensor
        report.loaded += 1
        report.loaded_bytes += info.nbytes
    return out, report


def attach_shard(client: DaemonClient, checkpoint: str | Path, pp: int, stage: int, tp: int, rank: int,
                 dtype: torch.dtype | None = None):
    """HF name -> tensor of position (stage, tp rank) of a pp x tp split, backed by the daemon.

    Reads from the checkpoint only the slices the daemon does not already hold sealed, so a
    restarted engine reads zero checkpoint bytes. Returns (tensors, report, checkpoint_bytes_read).
    Raises CheckpointError for a bad folder and ValueError for a bad position.
    """
    from spotserve.models import hf
    from spotserve.models.loader import CheckpointReader
    from spotserve.models.sharding import shard_shape, shard_slice, stage_tensor_names

    reader: CheckpointReader | None = None

    def open_reader() -> CheckpointReader:
        nonlocal reader
        if reader is None:
            reader = CheckpointReader(checkpoint)
        return reader

    # The spec comes from config.json alone, so a re-attach opens no weight file.
    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    spec = hf.spec_from_hf_config(cfg)
    stored = cfg.get("torch_dtype") or cfg.get("dtype") or "float16"
    want_dtype = dtype or torch_dtype(stored if stored in ("float16", "bfloat16", "float32") else "float16")
    buffers: dict[str, str] = {}
    wanted: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    slices = {}
    for name in stage_tensor_names(spec, pp, stage):
        sl = shard_slice(spec, name, tp, rank)
        bname = weight_buffer_name(name, sl)
        buffers[name] = bname
        slices[bname] = (name, sl)
        wanted[bname] = (shard_shape(spec, name, tp, rank), want_dtype)

    def load(bname: str) -> torch.Tensor:
        name, sl = slices[bname]
        t = open_reader().read(name) if sl is None else open_reader().read(name, *sl)
        return t.to(wanted[bname][1])

    tensors, report = load_or_attach(client, wanted, load)
    read = reader.bytes_read if reader is not None else 0
    if reader is not None:
        reader.close()
    return {name: tensors[b] for name, b in buffers.items()}, report, read

