"""Static decode steps at tp > 1 and pp > 1: the same tokens and logits as tp = 1, the same capture keys on every rank.

The CPU test runs the static step eagerly over gloo (2 processes): it checks the padding, the
micro-batch rows and the send/recv of hidden states between stages that the graphs replay, and that
every rank meets the same (batch bucket, context bucket) keys in the same order (what lets the
shards of a tp group capture matching collectives). The gpu test runs the same cases over NCCL on
2 GPUs with CUDA graphs on and off: graphs must give the tokens of the eager step and of tp = 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine_helpers import PYTHON, rel_err, spawn_workers, wait_all
from spotserve.engine.graphs import check_same_key, micro_rows

HARNESS = Path(__file__).with_name("graph_harness.py")
# Batches 2 -> 3 (bucket 4) -> 4 -> shrinking to 1; contexts cross 16 and 32 (context buckets 16, 32, 64);
# arrivals at steps 3 and 5 make mixed prefill + decode steps between the static ones.
REQUESTS = [
    {"id": "a", "prompt": [11, 42, 7, 99, 3, 150, 64], "max_new_tokens": 30, "arrive_step": 0},
    {"id": "b", "prompt": [5, 8], "max_new_tokens": 12, "arrive_step": 0},
    {"id": "c", "prompt": [120, 1, 77, 30, 30, 9, 141, 2, 60, 13], "max_new_tokens": 22, "arrive_step": 3},
    {"id": "d", "prompt": list(range(3, 33)), "max_new_tokens": 6, "arrive_step": 5},
]
LAYOUTS = {"tp1": dict(pp=1, tp=1), "tp2": dict(pp=1, tp=2), "pp2": dict(pp=2, tp=1),
           "pp2-mb2": dict(pp=2, tp=1, micro_batches=2)}


def _run(tmp: Path, backend: str, cases: list[dict], timeout: float) -> Path:
    (tmp / "cases.json").write_text(json.dumps({"backend": backend, "cases": cases}))
    procs = spawn_workers([PYTHON, str(HARNESS), str(tmp / "cases.json"), str(tmp)], 2, tmp)
    wait_all(procs, tmp, timeout=timeout)
    return tmp


def _reports(out: Path, name: str) -> list[dict]:
    found = sorted(out.glob(f"{name}.rank*.json"))
    assert found, f"case {name} wrote no report"
    return [json.loads(p.read_text()) for p in found]


def _check_against(out: Path, name: str, ref: str, tol: float) -> None:
    """Case `name` generated ref's tokens, its logits within `tol` of ref's at every step."""
    mine, theirs = _reports(out, name), _reports(out, ref)
    assert mine[0]["outputs"] == theirs[0]["outputs"], (name, ref)
    got, want = load_file(str(out / f"{name}.safetensors")), load_file(str(out / f"{ref}.safetensors"))
    assert set(got) == set(want) == {r["id"] for r in REQUESTS}
    for rid in want:
        assert got[rid].shape == want[rid].shape
        assert rel_err(got[rid], want[rid]) < tol, (name, ref, rid, rel_err(got[rid], want[rid]))


def _check_keys(out: Path, names: list[str]) -> list[list[int]]:
    """Every rank of every case met the same decode keys in the same order; returns them."""
    keys = [r["keys"] for name in names for r in _reports(out, name)]
    assert all(k == keys[0] for k in keys), keys
    return keys[0]


def test_micro_rows_cover_the_padded_batch():
    assert micro_rows(8, 1) == [(0, 8)]
    assert micro_rows(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert micro_rows(1, 4) == [(0, 1)]  # never an empty micro-batch
    for size in range(1, 20):
        for m in range(1, 6):
            rows = micro_rows(size, m)
            assert rows[0][0] == 0 and rows[-1][1] == size and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
            assert all(hi > lo for lo, hi in rows)


class _FakeComm:
    """A tp group of two where the peer reports `peer_key`."""

    size = 2

    def __init__(self, peer_key):
        self.peer_key = peer_key
        self.calls = 0

    def all_gather(self, t):
        self.calls += 1
        return [t, torch.tensor(self.peer_key, dtype=t.dtype)]


def test_shards_must_agree_on_the_capture_key():
    same = _FakeComm((4, 32))
    check_same_key(same, (4, 32), "cpu")
    assert same.calls == 1
    with pytest.raises(RuntimeError, match=r"disagree.*\(4, 32\), \(4, 64\).*out of lockstep"):
        check_same_key(_FakeComm((4, 64)), (4, 32), "cpu")

    class Lone:
        size = 1

        def all_gather(self, t):
            raise AssertionError("a lone shard has nobody to agree with")

    check_same_key(Lone(), (1, 16), "cpu")


@pytest.mark.mpi
@pytest.mark.timeout(240)
def test_static_decode_over_tp_and_pp_on_cpu(ckpts, hf_generate, tmp_path):
    """tp=2, pp=2 and pp=2 with 2 micro-batches (gloo, static step run eagerly) = tp=1 = transformers."""
    families = ["opt-tiny", "llama-tiny"]
    cases = [dict(layout, name=f"{fam}-{lay}", model_dir=ckpts[fam], device="cpu", requests=REQUESTS)
             for fam in families for lay, layout in LAYOUTS.items()]
    out = _run(tmp_path, "gloo", cases, timeout=200)
    for fam in families:
        names = [f"{fam}-{lay}" for lay in LAYOUTS]
        for name in names:
            reports = _reports(out, name)
            assert len(reports) == (1 if name.endswith("tp1") else 2)
            assert all(r["static_steps"] > 0 and r["graphs"] == 0 for r in reports), reports
        keys = _check_keys(out, names)
        assert {k[0] for k in keys} >= {2, 4} and {k[1] for k in keys} >= {16, 32, 64}, keys
        for name in names[1:]:
            _check_against(out, name, names[0], 1e-4)
        ref = _reports(out, names[0])[0]["outputs"]
        for r in REQUESTS:
            assert ref[r["id"]] == hf_generate(ckpts[fam], r["prompt"], r["max_new_tokens"])[0], (fam, r["id"])


def _check_near(out: Path, name: str, ref: str, tol: float = 1e-2, tie: float = 2e-2) -> int:
    """fp16: case `name` follows ref's tokens up to a step where ref nearly ties its token with name's
    (margin <= tie x max |logit|: a rounding flip), logits within `tol` until then; returns the flips."""
    mine, theirs = _reports(out, name)[0]["outputs"], _reports(out, ref)[0]["outputs"]
    got, want = load_file(str(out / f"{name}.safetensors")), load_file(str(out / f"{ref}.safetensors"))
    flips = 0
    for rid, ref_tokens in theirs.items():
        tokens = mine[rid]
        t = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(ref_tokens))
        assert len(tokens) == len(ref_tokens), (name, ref, rid, tokens, ref_tokens)
        if t > 0:
            assert rel_err(got[rid][:t], want[rid][:t]) < tol, (name, ref, rid, rel_err(got[rid][:t], want[rid][:t]))
        if t < len(ref_tokens):
            row = want[rid][t].float()
            gap = float(row[ref_tokens[t]] - row[tokens[t]])
            assert gap <= tie * float(row.abs().max()), (name, ref, rid, t, gap)
            flips += 1
    return flips


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_decode_graphs_over_tp_and_pp_on_two_gpus(ckpts, tmp_path):
    """NCCL on 2 GPUs, fp16 (what the CUDA kernels serve): tp=2 and pp=2 replayed from CUDA graphs give
    the tokens and logits of the same layouts run eagerly, and those of tp=1 up to fp16 near-ties;
    every rank captured the same keys in the same order."""
    assert torch.cuda.device_count() >= 2, f"needs 2 GPUs, found {torch.cuda.device_count()}"
    families = ["opt-tiny", "gpt-neox-tiny", "llama-tiny"]
    cases = []
    for fam in families:
        for lay, layout in LAYOUTS.items():
            for graphs in (True, False):
                cases.append(dict(layout, name=f"{fam}-{lay}-{'graph' if graphs else 'eager'}", model_dir=ckpts[fam],
                                  device="cuda", dtype="fp16", cuda_graphs=graphs, requests=REQUESTS))
    out = _run(tmp_path, "nccl", cases, timeout=160)
    for case in cases:
        reports = _reports(out, case["name"])
        captured = [r["graphs"] for r in reports]
        print(f"{case['name']}: graphs per rank {captured}, static steps {[r['static_steps'] for r in reports]}, "
              f"{[round(r['seconds'], 2) for r in reports]} s")
        assert all(r["static_steps"] > 0 for r in reports)
        assert all(c > 0 for c in captured) if case["cuda_graphs"] else captured == [0] * len(reports), captured
    for fam in families:
        names = [c["name"] for c in cases if c["name"].startswith(fam + "-")]
        keys = _check_keys(out, names)
        assert {k[0] for k in keys} >= {2, 4} and {k[1] for k in keys} >= {16, 32, 64}, keys
        for lay in LAYOUTS:  # the graph replays the eager step's kernels: same tokens, logits to rounding
            _check_against(out, f"{fam}-{lay}-graph", f"{fam}-{lay}-eager", 1e-3)
        flips = {name: _check_near(out, name, f"{fam}-tp1-eager") for name in names}
        print(f"{fam}: fp16 near-tie flips vs tp1 {flips}")


def test_static_step_parts_rerun_from_their_inputs(ckpts):
    """A capture runs the step's parts twice (warm-up, then under capture) and replays them later:
    running the same parts again must give the same logits (no state carried over from the last run)."""
    from spotserve.engine.batch import Work
    from spotserve.engine.config import EngineConfig
    from spotserve.engine.engine import Engine
    from spotserve.engine.sequence import SamplingParams

    engine = Engine(EngineConfig(ckpts["opt-tiny"], block_size=4, num_blocks=32, max_batch=4))
    dec = engine.runner.decoder
    assert dec.chunks > 1
    for i, p in enumerate([[11, 42, 7, 99, 3], [5, 8], [120, 1, 77]]):
        engine.add_request(str(i), p, SamplingParams(8))
    engine.step()  # prefill
    batch = engine.scheduler.schedule()
    work = [Work(s.req_id, s.pending, s.num_cached, engine.blocks.table(s.req_id), s.params, len(s.output))
            for s in batch]
    tokens, logits = dec.run(work)
    want = logits.clone()
    parts = dec._parts(dec.keys[-1], 0, dec.bucket(len(work)))
    for _ in range(2):
        for part in parts:
            part()
        assert torch.equal(dec.logits[:len(work)], want)


def test_graphs_are_released_before_the_process_groups(ckpts):
    """World.close releases every decoder's graphs first: NCCL destroys no communicator a live graph
    captured (it would wait forever), so tp > 1 graphs must go before the groups do."""
    from spotserve.engine import dist, graphs
    from spotserve.engine.config import EngineConfig
    from spotserve.engine.engine import Engine

    assert graphs.release_all in dist.BEFORE_DESTROY
    engines = [Engine(EngineConfig(ckpts["llama-tiny"], block_size=4, num_blocks=8, max_batch=2)) for _ in range(2)]
    for e in engines:  # stand-ins for captured graphs (none are captured on the CPU)
        e.runner.decoder.graphs[(1, 16)] = [object()]
    engines[0].release_graphs()
    assert not engines[0].runner.decoder.graphs and engines[1].runner.decoder.graphs
    graphs.release_all()
    assert not engines[1].runner.decoder.graphs
