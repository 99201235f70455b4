"""Shared fixtures of the planner tests: the artifact's T4 profile of the 20B shape and small cost models."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pipeline_sim

from spotserve.planner import CostModel, GPU, Workload  # noqa: E402
from spotserve.planner.profiles import parse_profile  # noqa: E402
from spotserve.models.spec import get_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
T4_20B = ROOT / "spotserve/data/profiles-t4/T4-4x/megatron_h6144_profile.json"
GB16 = 16 * 10 ** 9


@pytest.fixture(scope="session")
def cost20b() -> CostModel:
    return CostModel.from_profile(T4_20B, gpu_memory_bytes=GB16)


def tiny_cost(memory: int = 400_000, bandwidth=None) -> CostModel:
    """A cost model for the 5-layer, 6-head tiny shape with made-up timings (fast brute force)."""
    data = {"name": "tiny", "layer_num": 5, "pp_init_comm": 1.0, "pp_incr_comm": 0.1, "embed": [0.1, 0.2],
            "final_fix_factor": 1.0, "dtype": "fp32", "reserved_bytes": 0}
    for tp, f in ((1, 1.0), (2, 0.55), (3, 0.4), (6, 0.25)):
        data[f"tp-{tp}"] = {f"bsz-{b}": {"init": 10.0 * f * b, "incr": 1.0 * f * (1 + 0.1 * b)} for b in (1, 2, 4)}
    return CostModel(parse_profile(data), get_spec("gpt-neox-tiny"), gpu_memory_bytes=memory, bandwidth=bandwidth,
                     workload=Workload(prompt_len=16, output_len=8))


def make_gpus(counts: list[int], memory: int = 400_000) -> list[GPU]:
    """GPUs of instances i0, i1, ... holding counts[k] GPUs each."""
    return [GPU(f"i{k}/g{j}", f"i{k}", j, memory) for k, n in enumerate(counts) for j in range(n)]
