"""EngineConfig: everything one replica's engine needs to start, validated once."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EngineConfig:
    """Configuration of one replica (pp x tp workers) of the engine.

    model_dir: Hugging Face checkpoint folder (config.json + *.safetensors).
    pp, tp: pipeline stages and tensor-parallel shards; workers = pp * tp.
    block_size: tokens per KV block; num_blocks: KV blocks per worker (every worker of a replica
    holds the same block ids, each for its own layers and heads).
    max_batch: most requests in one decode step; max_batch_tokens: most tokens fed in one step
    (prefill budget; a single longer request is still admitted alone).
    micro_batches: how many micro-batches one step is split into across pipeline stages.
    timeout_s: limit of every collective / point-to-point call; a peer silent for longer is lost.
    cuda_graphs: replay decode steps from CUDA graphs (GPU, any pp and tp); off: the same static
    step runs eagerly.
    """

    model_dir: str
    pp: int = 1
    tp: int = 1
    block_size: int = 16
    num_blocks: int = 256
    max_batch: int = 32
    max_batch_tokens: int = 4096
    micro_batches: int = 1
    dtype: str = "fp32"
    device: str = "cpu"
    timeout_s: float = 60.0
    cuda_graphs: bool = True

    def __post_init__(self):
        if not isinstance(self.model_dir, str) or not self.model_dir:
            raise ValueError("EngineConfig.model_dir must be a non-empty path")
        for field in ("pp", "tp", "block_size", "num_blocks", "max_batch", "max_batch_tokens", "micro_batches"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"EngineConfig.{field} must be a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.timeout_s > 0):
            raise ValueError(f"EngineConfig.timeout_s must be positive, got {self.timeout_s!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"EngineConfig.device must be 'cpu' or 'cuda[:i]', got {self.device!r}")

    @property
    def world(self) -> int:
        """Workers of one replica."""
        return self.pp * self.tp
