"""Where the experiment's inputs come from, and the paper's settings by name.

Data directory: `--data-dir`, else env SPOTSERVE_DATA, else the copies shipped in spotserve/data
(laid out like ../shared/data: availability/, arrivals/, profiles-t4/).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from spotserve.cloud.availability import AvailabilityTrace, label_ondemand_replacements, load_availability
from spotserve.models.spec import get_spec
from spotserve.planner.cost import CostModel

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
# A T4 (16 GB GDDR6) with ECC on, as on AWS g4dn: 15 GiB visible to CUDA (InstanceConfig's default).
T4_MEMORY_BYTES = 15 * 2**30

# The paper's trace names -> artifact files.
TRACES = {"As": "trace_0304_real.txt", "Bs": "trace_0506_real.txt",
          "As+o": "trace_0304_ondemand.txt", "Bs+o": "trace_0506_ondemand.txt"}


@dataclass(frozen=True)
class ModelSetting:
    """A paper model: the spec simulated under its name, its T4 profile and its workload."""

    name: str
    spec: str
    profile: str
    arrivals: str
    rate: float
    note: str


MODELS = {
    "6.7B": ModelSetting("6.7B", "opt-6.7b", "megatron_6.7B_profile.json", "query6144_tpt1.5_cv6.txt", 1.5,
                         "OPT-6.7B shape (32 x 4096)"),
    "20B": ModelSetting("20B", "gpt-neox-20b", "megatron_h6144_profile.json", "query_tpt0.35_cv6.txt", 0.35,
                        "GPT-20B shape (44 x 6144)"),
    "30B": ModelSetting("30B", "paper-30b", "megatron_h7168_profile.json", "query_tpt0.2_cv6.txt", 0.2,
                        "the paper's 'LLaMA-30B' was a GPT-style stand-in of 48 x 7168 (profile megatron_h7168)"),
}
FIDELITY_NOTE = ("simulated shapes: 6.7B = 32 x 4096, 20B = 44 x 6144, 30B = 48 x 7168 (the paper's GPT-style "
                 "stand-in for LLaMA-30B); fp32 on T4 (profiles-t4/T4-4x, 15 GiB usable with ECC), input 512 / "
                 "output 128 tokens, batch up to 4; the artifact's 'cv6' arrival files are nearly periodic (CV ~0.05)")


def data_dir(arg: str | None = None) -> Path:
    """Resolve the data directory (argument, SPOTSERVE_DATA, package copy); ValueError if it lacks a subfolder."""
    path = Path(arg or os.environ.get("SPOTSERVE_DATA") or PACKAGE_DATA)
    for sub in ("availability", "arrivals", "profiles-t4"):
        if not (path / sub).is_dir():
            raise ValueError(f"data directory {path} has no {sub}/ (expected the layout of spotserve/data)")
    return path


def model_setting(name: str) -> ModelSetting:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def load_cost(model: str, root: Path, max_batch: int = 4, gpu_memory_bytes: int = T4_MEMORY_BYTES) -> CostModel:
    """The CostModel of a paper model on the T4 profile, with batch sizes limited to max_batch."""
    m = model_setting(model)
    return CostModel.from_profile(root / "profiles-t4" / "T4-4x" / m.profile, spec=get_spec(m.spec),
                                  gpu_memory_bytes=gpu_memory_bytes, max_batch=max_batch)


def load_trace(name: str, root: Path, ondemand_delay_s: float = 90.0) -> AvailabilityTrace:
    """An availability trace by paper name (As, Bs, As+o, Bs+o) or file name under availability/."""
    fname = TRACES.get(name, name)
    path = root / "availability" / fname
    if not path.is_file():
        raise ValueError(f"no availability trace {name!r} ({path}); paper names: {', '.join(TRACES)}")
    trace = load_availability(path)
    if "ondemand" in fname:
        trace = label_ondemand_replacements(trace, ondemand_delay_s)
    trace.name = name
    return trace
