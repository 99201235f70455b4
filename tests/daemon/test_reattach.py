"""An engine-like process loads its shard into the daemon and is SIGKILLed; a new process
re-attaches the same bytes reading zero checkpoint bytes; a load killed half-way is redone."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import pytest
import torch

from spotserve.daemon.store import weight_buffer_name
from spotserve.models.checkpoint import write_random_checkpoint
from spotserve.models.loader import load_shard
from spotserve.models.sharding import shard_shape, shard_slice
from spotserve.models.spec import get_spec

pytestmark = pytest.mark.timeout(120)

# The "engine": attach (or load) position (stage, rank) of a pp x tp split, report, then serve forever.
ENGINE = r"""
import hashlib, json, sys, time, torch
from spotserve.daemon import DaemonClient
from spotserve.daemon.store import attach_shard
sock, token, ckpt, pp, stage, tp, rank = sys.argv[1:8]
client = DaemonClient(sock, token)
tensors, report, read = attach_shard(client, ckpt, int(pp), int(stage), int(tp), int(rank))
digest = {n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest() for n, t in tensors.items()}
print(json.dumps({"digest": digest, "attached": report.attached, "loaded": report.loaded,
                  "loaded_bytes": report.loaded_bytes, "checkpoint_bytes": read}), flush=True)
if sys.argv[8] == "stay":
    time.sleep(600)
"""


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def run_engine(daemon, ckpt, pos, stay: bool) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", ENGINE, str(daemon.socket_path), daemon.token, str(ckpt),
                             *map(str, pos), "stay" if stay else "exit"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line, f"engine exited with {proc.wait()}"
    return proc, json.loads(line)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "opt-tiny"
    write_random_checkpoint(get_spec("opt-tiny"), path, seed=3, dtype="fp16")
    return path


def test_sigkilled_engine_reattaches_identical_bytes_without_reading_the_checkpoint(start_daemon, checkpoint):
    pos = (2, 1, 2, 1)  # pp=2, stage 1, tp=2, rank 1: has layers, final norm and the tied head
    expected = {n: digest(t) for n, t in load_shard(checkpoint, *pos).items()}
    d = start_daemon()
    first, out1 = run_engine(d, checkpoint, pos, stay=True)
    first.send_signal(signal.SIGKILL)
    assert first.wait(10) == -signal.SIGKILL
    assert out1["loaded"] == len(expected) and out1["attached"] == 0
    assert out1["checkpoint_bytes"] == out1["loaded_bytes"] > 0
    second, out2 = run_engine(d, checkpoint, pos, stay=False)
    assert second.wait(30) == 0
    assert out2["checkpoint_bytes"] == 0 and out2["loaded"] == 0 and out2["attached"] == len(expected)
    assert out2["digest"] == out1["digest"] == expected


def test_load_killed_half_way_is_redone(start_daemon, checkpoint):
    pos = (1, 0, 1, 0)
    expected = {n: digest(t) for n, t in load_shard(checkpoint, *pos).items()}
    d = start_daemon()
    _, out1 = run_engine(d, checkpoint, pos, stay=False)
    # Simulate an engine that died while rewriting one buffer: contents garbage, seal missing.
    spec = get_spec("opt-tiny")
    name = "model.decoder.layers.2.fc1.weight"
    bname = weight_buffer_name(name, shard_slice(spec, name, 1, 0))
    with d.client() as c:
        assert c.release(bname)
        info = c.allocate(bname, shard_shape(spec, name, 1, 0), "float16")
        c.attach(info).fill_(13.0)
    _, out2 = run_engine(d, checkpoint, pos, stay=False)
    assert out2["loaded"] == 1 and out2["attached"] == len(expected) - 1
    assert out2["checkpoint_bytes"] == out2["loaded_bytes"] == info.nbytes
    assert out2["digest"] == out1["digest"] == expected
