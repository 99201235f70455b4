"""The `python -m spotserve.generate` launcher: alone, under mpirun, and with a worker killed mid-generation."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine_helpers import PYTHON, ROOT, spawn_workers
from spotserve.engine.config import EngineConfig
from spotserve.engine.engine import Engine
from spotserve.engine.sequence import SamplingParams

PROMPTS = [[11, 42, 7, 99, 3, 150, 64], [5, 8]]


def _argv(model_dir, *extra):
    argv = [PYTHON, "-m", "spotserve.generate", "--model-dir", model_dir, "--max-new-tokens", "6",
            "--block-size", "4"]
    for p in PROMPTS:
        argv += ["--prompt-ids", ",".join(map(str, p))]
    return argv + list(extra)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


@pytest.mark.timeout(120)
def test_single_process_launch(ckpts, hf_generate):
    """Without mpirun the launcher runs one worker and prints the generated ids as JSON."""
    res = subprocess.run(_argv(ckpts["opt-tiny"]), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["pp"], out["tp"], out["model"]) == (1, 1, "opt-tiny")
    assert out["outputs"] == [hf_generate(ckpts["opt-tiny"], p, 6)[0] for p in PROMPTS]


@pytest.mark.timeout(300)
@pytest.mark.mpi
@pytest.mark.parametrize("np_,layout,sampled", [(3, ["--tp", "3"], False), (4, ["--dp", "2", "--pp", "2"], True)],
                         ids=["tp3", "dp2-pp2-sampled"])
def test_mpirun_launch(ckpts, hf_generate, np_, layout, sampled):
    """Under mpirun the workers find each other from MPI ranks; rank 0 prints the outputs once.
    Greedy runs match transformers; seeded sampling matches the single-process engine."""
    mpirun = shutil.which("mpirun", path=str(Path(PYTHON).parent)) or shutil.which("mpirun")
    assert mpirun, "mpirun not found next to the interpreter or on PATH"
    model = ckpts["llama-tiny"]
    extra = layout + (["--temperature", "0.9", "--top-p", "0.8", "--seed", "5"] if sampled else [])
    argv = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", str(np_)] + _argv(model, *extra)
    res = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, res.stdout
    out = json.loads(lines[0])
    if not sampled:
        assert out["outputs"] == [hf_generate(model, p, 6)[0] for p in PROMPTS]
        return
    engine = Engine(EngineConfig(model, block_size=4))
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(6, temperature=0.9, top_p=0.8, seed=5 + i))
    alone = engine.run()
    assert out["outputs"] == [alone[str(i)] for i in range(len(PROMPTS))]


def _wait_for(path: Path, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text():
            return True
        time.sleep(0.1)
    return False


# (victim rank, signal, collective timeout): a crash is seen at once (connections close); a frozen
# worker (SIGSTOP) only through the timeout; rank 0 also hosts the rendezvous store.
FAULTS = [(2, signal.SIGKILL, 30), (0, signal.SIGSTOP, 6)]
POSITIONS = {0: "stage 0, shard 0", 2: "stage 1, shard 0"}


@pytest.mark.timeout(240)
@pytest.mark.mpi
@pytest.mark.parametrize("victim,sig,timeout_s", FAULTS, ids=["kill-rank2", "freeze-rank0"])
def test_lost_worker_is_reported(ckpts, tmp_path, victim, sig, timeout_s):
    """Kill or freeze one of 4 workers (pp=2, tp=2) mid-generation: the others exit with status 3
    within the timeout and name the lost rank, instead of hanging."""
    argv = _argv(ckpts["gpt-neox-tiny"], "--pp", "2", "--tp", "2", "--log-steps", "--step-delay-s", "0.3",
                 "--timeout-s", str(timeout_s))
    argv[argv.index("--max-new-tokens") + 1] = "100"
    procs = spawn_workers(argv, 4, tmp_path)
    try:
        assert _wait_for(tmp_path / f"err.{victim}", '"step": 3', 150), (tmp_path / f"err.{victim}").read_text()
        procs[victim].send_signal(sig)
        hit_at = time.monotonic()
        for rank, p in enumerate(procs):
            if rank != victim:
                p.wait(timeout=3 * timeout_s + 30)
        elapsed = time.monotonic() - hit_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    who = f"lost peer rank {victim} (replica 0, {POSITIONS[victim]})"
    for rank in sorted(set(range(4)) - {victim}):
        err = (tmp_path / f"err.{rank}").read_text()
        assert procs[rank].returncode == 3, f"rank {rank}: rc {procs[rank].returncode}\n{err[-2000:]}"
        events = [json.loads(line) for line in err.splitlines() if line.startswith('{"event": "error"')]
        assert events and events[-1]["lost"] == [victim], err[-2000:]
        assert who in events[-1]["message"]
        assert (tmp_path / f"out.{rank}").read_text() == ""  # no partial output printed
    assert elapsed < 3 * timeout_s + 30
