"""Measure a cost-model profile of a (small) checkpoint on this machine's CPU, for the live backend.

The live cluster runs the same planner as the simulator, so its cost model must describe the
machine it runs on, not a T4. This measures, on a lone in-process engine, the prefill and decode step
time per layer at several batch sizes (tp = 1; a tp > 1 entry is derived from the tp = 1 one
plus a measured loopback round trip per all-reduce, marked as derived in the file), the worker-to-worker
point-to-point throughput the migration executor moves weights and KV at (gloo between two
processes, live/p2p.py) and the warm checkpoint read speed, and writes the profile JSON format of
spotserve.planner.profiles (ms per layer). The link figure is a throughput of large messages: a
small model's migration is dominated by fixed costs (process groups, rounds) it does not price.
Step times are optimistic for tp > 1 and miss the controller round trip of every step:
`python -m spotserve.live` and the experiment driver use live/calibrate.py's measurement through
the live path instead (it shares this file's link and disk figures); this one is quick and serves
tests. Both write ``reconfigure_margin_s`` (reconfigure_margin): here from the engine start time.

    python -m spotserve.live.profile --model-dir DIR --out profile.json
"""
from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from pathlib import Path

BATCHES = (1, 2, 4, 8)


_ENGINE_START: list[float] = []  # seconds of each engine construction measure() ran (the margin's input)
MIN_CONFIGURE_S = 0.2  # group formation over loopback and the controller round trips, which one process cannot time


def reconfigure_margin(configure_s: float) -> float:
    """The profile's ``reconfigure_margin_s`` for a measured configure time (process groups + engine start):
    twice it plus 0.3 s for stopping a batch and exporting its KV, with configure_s at least MIN_CONFIGURE_S;
    the planner ends a migration that long before a deadline (Policy.planning_deadline)."""
    return round(0.3 + 2 * max(configure_s, MIN_CONFIGURE_S), 4)


def _engine_times(model_dir: str, batch: int, prompt_len: int, steps: int) -> tuple[float, float]:
    """(prefill s, decode-step s) of one batch on a lone engine, best of a few runs."""
    from spotserve.engine.config import EngineConfig
    from spotserve.engine.engine import Engine
    from spotserve.engine.sequence import SamplingParams

    t0 = time.perf_counter()
    eng = Engine(EngineConfig(model_dir, max_batch=max(BATCHES), num_blocks=256))
    _ENGINE_START.append(time.perf_counter() - t0)
    best_p, best_d = float("inf"), float("inf")
    for rep in range(3):
        for i in range(batch):
            eng.add_request(f"r{rep}-{i}", [(7 * i + k) % eng.spec.vocab for k in range(prompt_len)],
                            SamplingParams(max_new_tokens=steps + 1))
        t0 = time.perf_counter()
        eng.step()
        best_p = min(best_p, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        best_d = min(best_d, (time.perf_counter() - t0) / steps)
        while eng.has_unfinished():
            eng.step()
    return best_p, best_d


def _loopback_rtt(rounds: int = 50) -> float:
    """Round-trip seconds of a 1-byte message on a loopback TCP connection (the transport gloo uses here)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def echo():
        conn, _ = srv.accept()
        with conn:
            for _ in range(rounds):
                conn.sendall(conn.recv(1))

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    with socket.create_connection(("127.0.0.1", port)) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        for _ in range(rounds):
            c.sendall(b"x")
            c.recv(1)
        rtt = (time.perf_counter() - t0) / rounds
    th.join(timeout=5)
    srv.close()
    return rtt


def _disk_read(model_dir: str) -> float:
    """Bytes/s of reading the checkpoint's weight files (page cache warm after the engine loaded them)."""
    files = list(Path(model_dir).glob("*.safetensors"))
    total, t0 = 0, time.perf_counter()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(4 << 20):
                total += len(chunk)
    return total / max(time.perf_counter() - t0, 1e-6)


def base_profile(model_dir: str, prompt_len: int = 16, slot_memory_bytes: int = 256 << 20,
                 gpus_per_instance: int = 2) -> dict:
    """The machine part of a live profile of `model_dir`, without step times: model shape, a pipeline
    hop (one loopback round trip), the worker-to-worker link bandwidth (gloo point-to-point between two
    processes: the path the migration executor moves weights and KV on) and the checkpoint read
    bandwidth. Starts one short-lived peer process (live/p2p.py)."""
    from spotserve.live.p2p import measure_p2p
    from spotserve.models.loader import CheckpointReader

    spec = CheckpointReader(model_dir).spec
    bw, p2p_rtt = measure_p2p()
    rtt = _loopback_rtt()
    return {
        "name": f"live-cpu-{spec.name}", "model": spec.name, "layer_num": spec.num_layers, "dtype": "fp32",
        "init_tokens": prompt_len, "final_fix_factor": 1.0, "embed": [],
        # a pipeline hop: one loopback message each way inside gloo
        "pp_init_comm": rtt * 1e3, "pp_incr_comm": rtt * 1e3,
        "gpu_memory_bytes": slot_memory_bytes, "gpus_per_instance": gpus_per_instance,
        "reserved_bytes": 16 << 20,
        # workers send each other weights and KV directly (no relay through the controller); on one host
        # the link within and between "instances" is the same loopback
        "bandwidth": {"intra_bytes_per_s": bw, "inter_bytes_per_s": bw, "disk_bytes_per_s": _disk_read(model_dir)},
        "link": {"method": "gloo send/recv between two processes over loopback, 8 MiB messages",
                 "bytes_per_s": bw, "round_trip_s": p2p_rtt},
    }


def measure(model_dir: str, prompt_len: int = 16, steps: int = 8, tps: tuple[int, ...] = (1, 2),
            slot_memory_bytes: int = 256 << 20, gpus_per_instance: int = 2) -> dict:
    """Measure the profile of `model_dir` on this machine in one process; returns the profile JSON object."""
    from spotserve.models.loader import CheckpointReader

    spec = CheckpointReader(model_dir).spec
    L = spec.num_layers
    _ENGINE_START.clear()
    times = {b: _engine_times(model_dir, b, prompt_len, steps) for b in BATCHES}
    starts = sorted(_ENGINE_START)
    prof = base_profile(model_dir, prompt_len, slot_memory_bytes, gpus_per_instance)
    prof["derived"] = {"reconfigure_margin_s": "0.3 s + 2 x (median engine start, at least 0.2 s)"}
    prof["reconfigure_margin_s"] = reconfigure_margin(starts[len(starts) // 2])
    rtt = prof["pp_incr_comm"] / 1e3
    for tp in tps:
        if not spec.valid_tp(tp):
            continue
        table = {}
        for b, (pre, dec) in times.items():
            # tp > 1: compute splits over tp workers; each layer adds two all-reduces (a round trip each)
            extra = 0.0 if tp == 1 else 2 * rtt
            table[f"bsz-{b}"] = {"init": (pre / L / tp + extra) * 1e3, "incr": (dec / L / tp + extra) * 1e3}
        prof[f"tp-{tp}"] = table
        if tp > 1:
            prof["derived"][f"tp-{tp}"] = "tp-1 time / tp + 2 loopback round trips per layer"
    return prof


def profile_cli(argv: list[str] | None, measure_fn, description: str) -> None:
    """The command line shared by this module and live/calibrate.py: measure, write --out, print a line.
    `measure_fn(model_dir, prompt_len, gpus_per_instance=...)` returns the profile."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--gpus-per-instance", type=int, default=2)
    args = ap.parse_args(argv)
    prof = measure_fn(args.model_dir, args.prompt_len, gpus_per_instance=args.gpus_per_instance)
    Path(args.out).write_text(json.dumps(prof, indent=1))
    print(f"wrote {args.out}: decode step {prof['tp-1']['bsz-1']['incr'] * prof['layer_num']:.2f} ms at batch 1 "
          f"(tp 1), pipeline hop {prof['pp_incr_comm']:.2f} ms")


def main(argv: list[str] | None = None) -> None:
    profile_cli(argv, measure, __doc__.splitlines()[0])


if __name__ == "__main__":
    main()
