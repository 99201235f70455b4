"""Maps daemon buffers into this process as torch tensors without copying.

CPU buffers are POSIX shm segments: mmap of /dev/shm/<segment> wrapped by torch.frombuffer
(the tensor keeps the mapping alive). GPU buffers arrive as CUDA IPC handles, opened by
spotserve._C.cuda_ipc_tensor, which caches one mapping per allocation and closes it when the
last tensor over it is freed.
"""
from __future__ import annotations

import mmap
import os
import re

import torch

from spotserve.daemon.protocol import DTYPE_ITEMSIZE, BufferInfo

SHM_DIR = "/dev/shm"
# The daemon's segment names (buffer_store.h); anything else is refused so a forged reply
# cannot point us at an arbitrary file.
_SEGMENT_RE = re.compile(r"^/spotserve\.[A-Za-z0-9_-]{1,64}\.[0-9a-f]{8}\.[0-9]+$")


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a protocol dtype name; ValueError for names outside the protocol."""
    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"unsupported dtype {name!r}; expected one of {sorted(DTYPE_ITEMSIZE)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """Protocol name of a torch dtype (torch.float16 -> "float16"); ValueError if unsupported."""
    name = str(dtype).removeprefix("torch.")
    torch_dtype(name)
    return name


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _attach_shm(info: BufferInfo) -> torch.Tensor:
    if not isinstance(info.handle, str) or not _SEGMENT_RE.match(info.handle):
        raise ValueError(f"buffer {info.name!r}: {info.handle!r} is not a daemon shm segment name")
    fd = os.open(SHM_DIR + info.handle, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size < info.offset + info.nbytes:
            raise ValueError(f"buffer {info.name!r}: segment holds {size} bytes, expected {info.offset + info.nbytes}")
        mapped = mmap.mmap(fd, info.offset + info.nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping outlives the descriptor
    flat = torch.frombuffer(mapped, dtype=torch_dtype(info.dtype), count=_numel(info.shape), offset=info.offset)
    return flat.view(info.shape)


def _attach_cuda(info: BufferInfo) -> torch.Tensor:
    from spotserve import _C

    if not isinstance(info.handle, bytes) or len(info.handle) != 64:
        raise ValueError(f"buffer {info.name!r}: CUDA IPC handle must be 64 bytes")
    return _C.cuda_ipc_tensor(info.handle, info.device, info.offset, info.nbytes, info.dtype, list(info.shape))


def attach(info: BufferInfo) -> torch.Tensor:
    """A tensor of `info.shape` and `info.dtype` over the daemon's memory (writes are shared).

    Raises ValueError for a malformed description, OSError if the segment is gone, and
    RuntimeError if a CUDA handle cannot be opened.
    """
    expected = _numel(info.shape) * DTYPE_ITEMSIZE.get(info.dtype, 0)
    if expected != info.nbytes:
        raise ValueError(f"buffer {info.name!r}: shape {info.shape} of {info.dtype} is not {info.nbytes} bytes")
    if info.kind == "shm":
        return _attach_shm(info)
    if info.kind == "cuda_ipc":
        return _attach_cuda(info)
    raise ValueError(f"buffer {info.name!r}: unknown kind {info.kind!r}")
