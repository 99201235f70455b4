"""Engine test fixtures: tiny random fp32 checkpoints and transformers' greedy `generate` as the reference."""
from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spotserve.models import get_spec
from spotserve.models.checkpoint import write_random_checkpoint

FAMILIES = ["opt-tiny", "gpt-neox-tiny", "llama-tiny"]
ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("mp_harness.py")


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """spec name -> folder of a random fp32 checkpoint (seed 3) of that tiny spec."""
    root = tmp_path_factory.mktemp("engine-ckpt")
    out = {}
    for name in FAMILIES:
        write_random_checkpoint(get_spec(name), root / name, seed=3, dtype="fp32")
        out[name] = str(root / name)
    return out


@functools.lru_cache(maxsize=None)
def _hf_model(model_dir: str):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def _hf_generate(model_dir: str, prompt: tuple[int, ...], max_new_tokens: int):
    model = _hf_model(model_dir)
    out = model.generate(torch.tensor([list(prompt)]), max_new_tokens=max_new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                         pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, out.logits[-1][0].float()


@pytest.fixture(scope="session")
def hf_generate():
    """(model_dir, prompt, max_new_tokens) -> (greedy tokens, logits of the last step) from transformers."""
    return lambda model_dir, prompt, n: _hf_generate(str(model_dir), tuple(prompt), n)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| relative to max |ref|."""
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(argv: list[str], world: int, log_dir: Path) -> list[subprocess.Popen]:
    """Start `world` processes of `argv` with torchrun-style rank variables; stdout/stderr go to log_dir."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
            env.pop(k, None)
        procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=open(log_dir / f"out.{rank}", "w"),
                                      stderr=open(log_dir / f"err.{rank}", "w")))
    return procs


def wait_all(procs: list[subprocess.Popen], log_dir: Path, timeout: float) -> None:
    """Wait for every process; on a failure or timeout kill the rest and raise with their stderr."""
    import time

    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        logs = "\n".join(f"--- rank {r} (rc {rc}) ---\n{(log_dir / f'err.{r}').read_text()[-3000:]}" for r, rc in bad)
        raise AssertionError(f"workers failed: {bad}\n{logs}")


PYTHON = sys.executable
