"""Benchmark: re-attaching weights held by the context daemon vs reloading them.

For one model checkpoint (written once with random weights; ~1 GB OPT-style on CPU by default,
`--spec opt-6.7b` for the issue's GPU figure) it measures, each in a fresh process so nothing is
cached in the interpreter:
  reattach      connect to the daemon and map every weight buffer as a tensor (no copy)
  reattach+touch  the same, then read every byte once (CPU: page faults on the shm mapping)
  reload_warm   safetensors.torch.load_file with the file in the page cache (on CPU it maps the
                file lazily, so only +touch, which reads every byte, measures a real load)
  reload_cold   the same after evicting the file's pages with posix_fadvise(DONTNEED)
  from_pretrained  transformers AutoModelForCausalLM.from_pretrained, warm page cache
Times exclude interpreter start and imports (printed by the child around the work itself).

`--executor` (CPU, 2 gloo processes) also measures the migration executor against the raw
point-to-point bandwidth of the same run: the same bytes per direction sent as one message.
  weights-move     a whole replica moves to the other worker (contiguous slices, sent with no staging)
  weights-reslice  (pp 2, tp 1) -> (pp 1, tp 2) on the same two workers (row-parallel slices are staged)
  kv-blocks        the KV cache of --kv-requests requests of --kv-tokens tokens moves (weights stay)
Prints a table; `--json PATH` writes the same figures.
Usage: python scripts/bench_migration.py [--device cpu|cuda] [--spec NAME] [--repeat N] [--executor]
       [--skip-reattach] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

CHILD = {
    "reattach": r"""
import sys, time, torch
from spotserve.daemon import DaemonClient
sock, token, device, touch_all = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if device == "cuda":
    torch.cuda.init()
t0 = time.perf_counter()
c = DaemonClient(sock, token)
tensors = {b.name: c.attach(b) for b in c.list() if b.name.startswith("w/")}
if touch_all:
    total = sum(touch(t) for t in tensors.values())
if device == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - t0, sum(t.numel() * t.element_size() for t in tensors.values()))
""",
    "reload": r"""
import sys, time, glob, torch
from safetensors.torch import load_file
path, device, touch_all = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t0 = time.perf_counter()
n = 0
for f in sorted(glob.glob(path + "/*.safetensors")):
    tensors = load_file(f, device=device)
    if touch_all:
        total = sum(touch(t) for t in tensors.values())
    n += sum(t.numel() * t.element_size() for t in tensors.values())
if device == "cuda":
    torch.cuda.synchronize()
print(time.perf_counter() - t0, n)
""",
    "from_pretrained": r"""
import sys, time, torch
from transformers import AutoModelForCausalLM
path, device = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
if device == "cuda":
    m.to("cuda")
    torch.cuda.synchronize()
print(time.perf_counter() - t0, sum(p.numel() * p.element_size() for p in m.parameters()))
""",
}


def bench_spec(name: str):
    """The benchmark's model: a named spec, or "cpu-1g" (OPT-style, 8 x 2048, ~1.0 GB in fp16)."""
    from spotserve.models.spec import OPT_6_7B, get_spec

    if name == "cpu-1g":
        return replace(OPT_6_7B, name="cpu-1g", num_layers=8, hidden=2048, num_heads=32, ffn=8192)
    return get_spec(name)


TOUCH = """
import torch
def touch(t):
    # Read every byte once; int64 sums run at memory speed (a uint8 sum widening to int64 does not).
    b = t.reshape(-1).view(torch.uint8)
    n8 = b.numel() // 8 * 8
    return int(b[:n8].view(torch.int64).sum()) + int(b[n8:].sum())
"""


def child(kind: str, *args: str) -> tuple[float, int]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run([sys.executable, "-c", TOUCH + CHILD[kind], *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{out.stderr[-3000:]}")
    seconds, nbytes = out.stdout.split()[-2:]
    return float(seconds), int(nbytes)


def drop_file_cache(path: Path, method: str = "fadvise") -> str:
    """Evicts the checkpoint's pages from the page cache; returns the method used. "fadvise" touches
    this checkpoint only (the CPU host is shared); "drop_caches" (root, device machine) drops all."""
    if method == "drop_caches":
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches=3"
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def warm(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--spec", default="cpu-1g", help="model spec name, or cpu-1g (default)")
    ap.add_argument("--model-dir", default=None, help="checkpoint folder (written once if missing)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported")
    ap.add_argument("--skip-from-pretrained", action="store_true")
    ap.add_argument("--json", default=None, help="write the figures to this path")
    ap.add_argument("--no-touch", action="store_true", help="skip the +touch rows (fewer runs)")
    ap.add_argument("--skip-reattach", action="store_true", help="skip the re-attach vs reload part")
    ap.add_argument("--executor", action="store_true", help="executor vs raw point-to-point (2 gloo processes)")
    ap.add_argument("--exec-layers", type=int, default=4, help="decoder layers of the executor's model")
    ap.add_argument("--staging-mb", type=int, default=256, help="executor staging budget per worker (MiB)")
    ap.add_argument("--depth", type=int, default=4, help="executor rounds in flight")
    ap.add_argument("--solo-kb", type=int, default=1024, help="moves this large travel alone (KiB)")
    ap.add_argument("--kv-requests", type=int, default=64)
    ap.add_argument("--kv-tokens", type=int, default=128)
    ap.add_argument("--cold-method", choices=["fadvise", "drop_caches"], default="fadvise",
                    help="drop_caches (root; the whole host's page cache) or fadvise (the checkpoint's pages)")
    args = ap.parse_args(argv)
    result: dict = {}
    if not args.skip_reattach:
        result = bench_reattach(args)
    if args.executor:
        result["executor"] = bench_executor(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def bench_executor(args) -> dict:
    """Runs scripts/executor_worker.py on 2 gloo processes; prints and returns its figures."""
    import socket

    out = Path(tempfile.mkdtemp(prefix="bexec"))
    cfg = {"spec": args.spec, "layers": args.exec_layers, "staging": args.staging_mb << 20,
           "solo": args.solo_kb << 10, "depth": args.depth, "kv_requests": args.kv_requests, "kv_tokens": args.kv_tokens,
           "repeat": args.repeat, "scenarios": ["weights-move", "weights-reslice", "kv-blocks"]}
    (out / "cfg.json").write_text(json.dumps(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("executor_worker.py")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        procs.append(subprocess.Popen([sys.executable, str(worker), str(out / "cfg.json"), str(out / "res.json")],
                                      env=env, stderr=open(out / f"err.{rank}", "w")))
    for p in procs:
        p.wait()
    if any(p.returncode for p in procs):
        raise RuntimeError("executor workers failed:\n" + "\n".join((out / f"err.{r}").read_text()[-2000:]
                                                                    for r in range(2)))
    res = json.loads((out / "res.json").read_text())
    print(f"\nexecutor vs raw point-to-point, {res['spec']} ({args.exec_layers} layers, fp16), 2 gloo processes, "
          f"staging {args.staging_mb} MiB, depth {args.depth}")
    print(f"{'scenario':<16} {'MB':>8} {'raw GB/s':>9} {'exec GB/s':>10} {'ratio':>6} {'msgs':>5} {'direct':>6} "
          f"{'rounds':>6}  host ms of the last run (rank 0)")
    for name, r in res["results"].items():
        host = " ".join(f"{k[:-2]} {v:.1f}" for k, v in r["host_ms"].items())
        print(f"{name:<16} {r['bytes'] / 1e6:8.1f} {r['raw_GBps']:9.2f} {r['executor_GBps']:10.2f} {r['ratio']:6.2f} "
              f"{r['messages_sent']:5d} {r['direct_messages']:6d} {r['rounds']:6d}  {host}")
    return res


def bench_reattach(args) -> dict:

    import torch

    from spotserve.daemon import DaemonConfig, DaemonProcess
    from spotserve.daemon.store import attach_shard
    from spotserve.models.checkpoint import write_random_checkpoint

    spec = bench_spec(args.spec)
    ckpt = Path(args.model_dir or Path(tempfile.gettempdir()) / f"spotserve-bench-{spec.name}")
    if not (ckpt / "config.json").exists():
        t0 = time.perf_counter()
        write_random_checkpoint(spec, ckpt, seed=0, dtype="fp16")
        print(f"wrote {ckpt} in {time.perf_counter() - t0:.1f}s", flush=True)
    ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))

    device = "cpu" if args.device == "cpu" else "cuda:0"
    daemon = DaemonProcess.start(DaemonConfig(name=f"bench{os.getpid()}", device=device,
                                              run_dir=tempfile.mkdtemp(prefix="sd", dir="/tmp")))
    rows: dict[str, dict] = {}

    def record(name: str, kind: str, *child_args: str, before=None):
        times, nbytes = [], 0
        for _ in range(args.repeat):
            if before:
                before()
            s, nbytes = child(kind, *child_args)
            times.append(s)
        times.sort()
        rows[name] = {"seconds": times[len(times) // 2], "min_s": times[0], "bytes": nbytes}
        print(f"  {name:<18} {rows[name]['seconds']:8.3f} s", flush=True)

    try:
        with daemon.client() as c:
            t0 = time.perf_counter()
            _, report, read = attach_shard(c, ckpt, 1, 0, 1, 0, dtype=torch.float16)
            populate = time.perf_counter() - t0
        if args.device == "cuda":
            # The populating client's tensors went away with it; the daemon still owns the memory.
            torch.cuda.synchronize()
        sock, tok, dev = str(daemon.socket_path), daemon.token, args.device
        record("reattach", "reattach", sock, tok, dev, "0")
        if not args.no_touch:
            record("reattach+touch", "reattach", sock, tok, dev, "1")
        warm(ckpt)
        methods = []
        for touched in ("0",) if args.no_touch else ("0", "1"):
            suffix = "+touch" if touched == "1" else ""
            record("reload_warm" + suffix, "reload", str(ckpt), dev, touched, before=lambda: warm(ckpt))
            record("reload_cold" + suffix, "reload", str(ckpt), dev, touched,
                   before=lambda: methods.append(drop_file_cache(ckpt, args.cold_method)))
        if not args.skip_from_pretrained:
            record("from_pretrained", "from_pretrained", str(ckpt), dev, before=lambda: warm(ckpt))
    finally:
        daemon.stop()

    result = {"device": args.device, "spec": spec.name, "checkpoint_bytes": ckpt_bytes,
              "daemon_bytes": report.loaded_bytes, "populate_seconds": populate,
              "populate_checkpoint_bytes": read, "cold_method": methods[-1] if methods else None,
              "repeat": args.repeat, "cpu_count": os.cpu_count(),
              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None, "results": rows}
    base = rows["reattach"]["seconds"]
    print(f"\n{spec.name} ({ckpt_bytes / 1e9:.2f} GB fp16) on {args.device}; cold = {result['cold_method']}")
    print(f"{'method':<18} {'median s':>9} {'GB/s':>7} {'x reattach':>11}")
    for name, r in rows.items():
        gbps = r["bytes"] / r["seconds"] / 1e9 if r["seconds"] > 0 else float("inf")
        print(f"{name:<18} {r['seconds']:9.3f} {gbps:7.2f} {r['seconds'] / base:11.1f}")
    return result


if __name__ == "__main__":
    sys.exit(main())
