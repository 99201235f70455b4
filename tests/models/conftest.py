"""Shared fixtures: tiny random fp32 checkpoints of the three families, written once per session."""
import pytest

from spotserve.models import get_spec
from spotserve.models.checkpoint import write_random_checkpoint

TINY = ["opt-tiny", "gpt-neox-tiny", "llama-tiny"]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """name -> folder of a random fp32 checkpoint (seed 0) of that tiny spec."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in TINY:
        write_random_checkpoint(get_spec(name), root / name, seed=0, dtype="fp32")
        out[name] = root / name
    return out
