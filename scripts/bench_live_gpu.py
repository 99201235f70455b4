"""Live reconfiguration on two GPUs (issue #9): forced changes with requests in flight vs the reparallelization
baseline from a cold page cache, and a SIGKILL without notice; the same script rehearses on CPU.

    python scripts/bench_live_gpu.py --device cuda --json out.json          (2 GPUs, opt-6.7b fp16, NCCL)
    python scripts/bench_live_gpu.py --device cpu --json out.json           (rehearsal: opt-tiny fp32, gloo)

One process tree: this process is the controller (LiveService: the policy core + LiveBackend), with one
worker process per GPU as two instances of one GPU each (i0/g0 on GPU 0, i1/g0 on GPU 1), so a SIGKILL of
one worker leaves the other GPU serving. Phases (each writes the JSON as it ends; past --deadline-s the
rest is skipped and says so):
  checkpoint   a random checkpoint of --model (generated on the GPU when there is one), reused if present
  p2p          NCCL (gloo) point-to-point bandwidth of two processes (scripts/bench_two_gpu.py --phases p2p)
  spotserve    the service starts on (1,1,2); a reference wave of requests runs uninterrupted; then one
               wave per change (1,1,2) -> (2,1,1) -> (1,2,1) -> (1,1,2), each forced (Controller.reconfigure)
               once every request has --trigger tokens: bytes moved (executor stats of the configure
               replies) vs the plan's bytes, migration seconds and implied bandwidth vs p2p, time from the
               call to the first token on the new config, the longest token gap (stall), tokens vs the
               reference.
  reparallelization  the same changes on a service run as the baseline: the page cache is dropped before
               each change, weights are read from disk, interrupted requests are recomputed.
  kill         a fresh spotserve service on (1,1,2); during a wave worker i1/g0 is SIGKILLed (no notice):
               time until every affected request's next token on GPU 0 (last: a survivor that hangs in a
               collective with the dead peer cannot cost the other phases their figures).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from live_gpu_session import CHANGES, Session  # noqa: E402  (a sibling module of this script)

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GPU = {"model": "opt-6.7b", "dtype": "fp16", "requests": 8, "prompt_len": 512, "output_len": 64, "trigger": 16,
       "block_size": 16, "timeout_s": 30.0, "heartbeat_timeout_s": 10.0, "wave_timeout_s": 150.0,
       "kill_timeout_s": 90.0}
CPU = {"model": "opt-tiny", "dtype": "fp32", "requests": 8, "prompt_len": 16, "output_len": 32, "trigger": 8,
       "block_size": 8, "timeout_s": 10.0, "heartbeat_timeout_s": 3.0, "wave_timeout_s": 60.0,
       "kill_timeout_s": 40.0}


class Deadline(RuntimeError):
    """The run's deadline came before this phase could finish."""


class Bench:
    """Settings, the deadline and the result (written after every phase and every change)."""

    def __init__(self, args):
        self.args, self.t0 = args, time.monotonic()
        self.s = dict(GPU if args.device == "cuda" else CPU)
        for k in ("model", "requests", "prompt_len", "output_len", "trigger"):
            if getattr(args, k) is not None:
                self.s[k] = getattr(args, k)
        if not 0 < self.s["trigger"] < self.s["output_len"]:
            raise ValueError(f"--trigger must be in (0, output_len={self.s['output_len']})")
        self.run_dir: Path | None = None  # run folders and logs (main sets it)
        self.gpus = 0  # GPUs on this host (0 on cpu)
        self.ref: list[list[int]] | None = None  # the uninterrupted reference wave's tokens (first service)
        self.result = {"device": args.device, "settings": self.s, "changes": [",".join(map(str, c)) for c in CHANGES],
                       "env": {k: os.environ.get(k) for k in NVLS_OFF}, "phases_s": {}, "errors": {},
                       "missing": [], "skipped": []}

    def left(self) -> float:
        return self.args.deadline_s - (time.monotonic() - self.t0)

    def check(self, need_s: float, what: str) -> None:
        if self.left() < need_s:
            raise Deadline(f"{what}: {self.left():.0f} s left of the deadline, needs ~{need_s:.0f} s")

    def missing(self, note: str) -> None:
        if note not in self.result["missing"]:
            self.result["missing"].append(note)

    def save(self) -> None:
        self.result["wall_s"] = round(time.monotonic() - self.t0, 2)
        if self.args.json:
            Path(self.args.json).write_text(json.dumps(self.result, indent=1) + "\n")

    def phase(self, name: str, fn, need_s: float = 0.0):
        """Run one phase; its error (or the deadline) is recorded and the next phase still runs."""
        t0 = time.monotonic()
        try:
            self.check(need_s, name)
            out = fn()
        except Deadline as exc:
            self.result["skipped"].append(str(exc))
            print(f"phase {name}: skipped ({exc})", flush=True)
            out = None
        except Exception:
            self.result["errors"][name] = traceback.format_exc()[-4000:]
            print(f"phase {name} failed:\n{self.result['errors'][name]}", flush=True)
            out = None
        self.result["phases_s"][name] = round(time.monotonic() - t0, 2)
        print(f"phase {name}: {self.result['phases_s'][name]:.1f} s", flush=True)
        self.save()
        return out


# --- checkpoint, p2p, profile -----------------------------------------------------------------------------
def model_spec(name: str):
    """A registered spec, or opt-1.3b (the public facebook/opt-1.3b shape, to save device time)."""
    from spotserve.models.spec import get_spec

    if name == "opt-1.3b":
        return replace(get_spec("opt-6.7b"), name="opt-1.3b", num_layers=24, hidden=2048, num_heads=32, ffn=8192)
    return get_spec(name)


def write_checkpoint(spec, out: Path, dtype: str, device: str, seed: int = 0) -> dict:
    """A random HF checkpoint (same names, shapes, files and init scales as spotserve.models.checkpoint), its
    values drawn on `device` (a GPU writes 13 GB in seconds; the CPU writer takes minutes). Reused if present."""
    import torch
    from safetensors.torch import save_file

    from spotserve.models import hf
    from spotserve.models.checkpoint import DEFAULT_MAX_SHARD_BYTES, init_std, plan_shards
    from spotserve.models.loader import TORCH_DTYPES

    if (out / "config.json").is_file():
        return {"dir": str(out), "reused": True, "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))}
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    shapes, groups = hf.tensor_shapes(spec), plan_shards(spec, dtype, DEFAULT_MAX_SHARD_BYTES)
    n, wmap, total = len(groups), {}, 0
    for i, names in enumerate(groups):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name in names:
            g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            mean, std = init_std(name, shapes[name])
            t = torch.randn(shapes[name], generator=g, device=device) * std + mean
            tensors[name] = t.to(TORCH_DTYPES[dtype]).cpu()
            wmap[name] = fname
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": wmap}))
    (out / "config.json").write_text(json.dumps(hf.hf_config(spec, dtype), indent=2) + "\n")  # last: complete
    if device == "cuda":
        torch.cuda.empty_cache()  # this process is the controller: leave the GPUs to the workers
    os.sync()
    return {"dir": str(out), "reused": False, "bytes": total, "files": n, "seconds": round(time.perf_counter() - t0, 2),
            "generated_on": device}


def fs_type(path: Path) -> str:
    """Type of the file system holding `path` (tmpfs pages cannot be dropped: reads stay warm)."""
    best, kind = "", "?"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def measure_p2p(device: str, timeout_s: float, out: Path) -> dict:
    """GB/s worker 0 -> 1 by message size, from two processes (bench_two_gpu's p2p phase)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "bench_two_gpu.py"), "--phases", "p2p", "--device", device, "--model", "opt-tiny",
           "--timeout", "60", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if p.returncode != 0 or not out.is_file():
        raise RuntimeError(f"p2p measurement failed (rc {p.returncode}):\n{(p.stdout + p.stderr)[-2000:]}")
    rows = json.loads(out.read_text())["phases"]["p2p"]
    return {k: round(v["GBps"], 3) for k, v in rows.items() if isinstance(v, dict)}


def bench_profile(spec, dtype: str, requests: int, gpu_memory_bytes: int, p2p_bps: float, disk_bps: float,
                  gpu: bool) -> dict:
    """A cost-model profile that admits the shapes this bench forces (tp 1 and 2, batch = `requests`).

    Layer times are a roofline guess (the changes are forced, so they only decide the optimizer's own
    choices: the start layout and the layout after the SIGKILL); tp=2 halves a layer plus 10%. Bandwidths
    are this run's p2p figure and a page-cache read, so the controller's readiness estimates stay below
    what really happens and never hold a ready replica back."""
    from spotserve.models.spec import DTYPE_BYTES

    d = DTYPE_BYTES[dtype]
    layer_bytes = spec.layer_params() * d
    mem_bps, flops = (2.5e12, 4e14) if gpu else (5e9, 5e10)
    prof = {"name": f"bench-live-{spec.name}", "model": spec.name, "layer_num": spec.num_layers, "dtype": dtype,
            "init_tokens": 512, "final_fix_factor": 1.0, "embed": [], "pp_init_comm": 0.05, "pp_incr_comm": 0.05,
            "gpu_memory_bytes": int(gpu_memory_bytes), "gpus_per_instance": 1,
            "reserved_bytes": 1 << 30 if gpu else 16 << 20,
            "bandwidth": {"intra_bytes_per_s": p2p_bps, "inter_bytes_per_s": p2p_bps, "disk_bytes_per_s": disk_bps}}
    for tp, share in ((1, 1.0), (2, 0.55)):
        if spec.valid_tp(tp):
            incr = layer_bytes / mem_bps * 1e3 * share + 0.01
            init = max(2 * spec.layer_params() * 512 * requests / flops * 1e3, incr) * share
            prof[f"tp-{tp}"] = {f"bsz-{requests}": {"init": init, "incr": incr}}
    return prof


def gpu_memory_bytes() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout.split()
    return int(min(int(x) for x in out) * 2**20 * 0.9)


# --- phases, table, CLI -------------------------------------------------------------------------------------
def run_live(bench: Bench, approach: str, model_dir: Path, profile: Path, prompts, p2p_bps, kill: bool) -> dict:
    """One service of `approach` started on (1,1,2): the reference wave (the first service only), then the
    forced changes, or (kill) one wave with a SIGKILL (its own service, run last: a survivor that cannot
    recover must not cost the other phases their numbers)."""
    out: dict = {"approach": approach}
    if kill:
        bench.result["kill"] = out
    else:
        bench.result["approaches"][approach] = out
    per_change = 25.0 if bench.args.device == "cuda" else 5.0

    async def go():
        ses = Session(bench, "kill" if kill else approach, approach, model_dir, profile, prompts)
        try:
            await ses.start()
            out["start"] = ses.start_info
            if bench.ref is None:
                out["reference"] = await ses.reference()
                bench.ref = ses.ref
            ses.ref = bench.ref
            bench.save()
            if kill:
                await ses.kill(out)
                return
            out["changes"] = []
            for src, dst in zip(CHANGES, CHANGES[1:]):
                bench.check(per_change, f"{approach} change {src}->{dst}")
                out["changes"].append(await ses.change(src, dst, p2p_bps, cold=approach == "reparallelization"))
                bench.save()
        finally:
            if hasattr(ses, "svc"):
                out["reconfigurations"] = ses.svc.controller.reconfigurations if hasattr(ses.svc, "controller") else 0
                await ses.close()
    asyncio.run(go())
    return out


def speedups(res: dict) -> list[dict]:
    """Per change: the baseline's time to the first token on the new config and stall over spotserve's."""
    sp = res["approaches"].get("spotserve", {}).get("changes", [])
    rp = res["approaches"].get("reparallelization", {}).get("changes", [])
    ratio = lambda x, y: round(x / y, 2) if x and y else None  # noqa: E731
    return [{"change": f"{a['from']}->{a['to']}", "ttft_x": ratio(b["ttft_new_config_s"], a["ttft_new_config_s"]),
             "stall_x": ratio(b["stall_s"], a["stall_s"])} for a, b in zip(sp, rp)]


def print_table(res: dict) -> None:
    gb = lambda x: f"{x / 1e9:.3f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    f = lambda x, p=3: f"{x:.{p}f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    ck = res.get("checkpoint") or {}
    print(f"\n{res.get('model', '?')} {res['settings']['dtype']} on {res['device']}; checkpoint "
          f"{gb(ck.get('bytes'))} GB "
          f"({'reused' if ck.get('reused') else f(ck.get('seconds'), 1) + ' s to write'}, fs {ck.get('fs', '?')}); "
          f"p2p GB/s {res.get('p2p') or '-'}")
    print(f"{'change':<14}{'approach':<19}{'pred GB':>9}{'moved GB':>9}{'w/kv':>6}{'migr s':>8}{'GB/s':>8}{'disk':>6}"
          f"{'%p2p':>6}{'ttft s':>8}{'all s':>8}{'stall s':>8}{'step s':>8}{'same':>5}{'done':>6}")
    for name, a in res["approaches"].items():
        ref = a.get("reference")
        if ref:
            print(f"{'reference':<14}{name:<19}{'':>60}{f(ref['max_gap_s']):>8}{f(ref['step_s_median'], 4):>8}")
        for c in a.get("changes", []):
            ex = c["executor"] or {}
            bm = c["bytes_match"]
            match = "-" if bm is None else ("y" if bm["weights"] else "N") + "/" + \
                ("y" if bm["kv"] else "blk" if bm["kv_whole_blocks"] else "N")
            print(f"{c['from'] + '->' + c['to']:<14}{name:<19}{gb(c['plan']['predicted_bytes']):>9}"
                  f"{gb(ex.get('moved_bytes')):>9}{match:>6}{f(c['migration_s']):>8}{f(c['implied_GBps'], 1):>8}"
                  f"{f(c['disk_GBps'], 1):>6}"
                  f"{f(c['pct_of_p2p'], 0):>6}{f(c['ttft_new_config_s']):>8}{f(c['every_next_token_s']):>8}"
                  f"{f(c['stall_s']):>8}{f(c['step_s_median'], 4):>8}{'yes' if c['tokens_identical'] else 'NO':>5}"
                  f"{c['completed']:>3}/{c['requests']}")
    k = res.get("kill")
    if k and "victim" in k:
        print(f"SIGKILL {k['victim']} (spotserve): detected {f(k['detect_s'])} s, every affected request's next token "
              f"{f(k['every_next_token_s'])} s ({k['affected']} requests), then {k['config_after']}; tokens "
              f"{'identical' if k['tokens_identical'] else 'DIFFER'}, {k['completed']}/{k['requests']} completed")
    for s in res.get("speedup", []):
        print(f"speed-up {s['change']}: time to first token on the new config x{s['ttft_x']}, stall x{s['stall_x']}")
    for m in res["missing"] + res["skipped"]:
        print(f"NOTE {m}")
    for k, v in res["errors"].items():
        print(f"ERROR {k}: {v.strip().splitlines()[-1] if v else v}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cpu")
    ap.add_argument("--model", help="spec name (or opt-1.3b); default opt-6.7b on cuda, opt-tiny on cpu")
    ap.add_argument("--model-dir", help="checkpoint folder (written when it holds none)")
    ap.add_argument("--model-root", help="parent of --model-dir's default, MODEL-DTYPE (default: /var/tmp/"
                    "spotserve-live-gpu on cuda, the work folder on cpu)")
    ap.add_argument("--work-dir", help="run folders and logs (default: a new temporary folder)")
    ap.add_argument("--requests", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--output-len", type=int)
    ap.add_argument("--trigger", type=int, help="tokens every request has when a change is forced")
    ap.add_argument("--phases", default="checkpoint,p2p,spotserve,reparallelization,kill")
    ap.add_argument("--deadline-s", type=float, default=330.0, help="skip what cannot finish before this")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device == "cuda":
        for k, v in NVLS_OFF.items():
            os.environ.setdefault(k, v)  # every process started from here inherits them
    bench = Bench(args)
    res = bench.result
    res["approaches"] = {}
    phases = args.phases.split(",")
    bench.run_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-live-gpu-"))
    bench.run_dir.mkdir(parents=True, exist_ok=True)
    bench.gpus = len(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.split("\n")) - 1 \
        if args.device == "cuda" else 0
    spec = model_spec(bench.s["model"])
    default_root = Path(args.model_root or ("/var/tmp/spotserve-live-gpu" if args.device == "cuda" else bench.run_dir))
    model_dir = Path(args.model_dir or default_root / f"{spec.name}-{bench.s['dtype']}")
    res["model"] = spec.name
    if "checkpoint" in phases or not (model_dir / "config.json").is_file():
        res["checkpoint"] = bench.phase("checkpoint", lambda: write_checkpoint(spec, model_dir, bench.s["dtype"],
                                                                              args.device))
        if res["checkpoint"]:
            res["checkpoint"]["fs"] = fs_type(model_dir)
    p2p = {}
    if "p2p" in phases:
        p2p = bench.phase("p2p", lambda: measure_p2p(args.device, min(120.0, max(10.0, bench.left())),
                                                     bench.run_dir / "p2p.json"), need_s=20) or {}
    res["p2p"] = p2p
    p2p_bps = max(p2p.values()) * 1e9 if p2p else None
    if not p2p_bps:
        bench.missing("p2p bandwidth not measured: no %-of-p2p figures")
    if not (model_dir / "config.json").is_file():
        res["errors"]["live"] = f"no checkpoint at {model_dir}"
        bench.save()
        print_table(res)
        return 1
    import random

    from spotserve.models.loader import CheckpointReader

    spec = CheckpointReader(model_dir).spec
    cuda = args.device == "cuda"
    profile = bench.run_dir / "profile.json"
    profile.write_text(json.dumps(bench_profile(spec, bench.s["dtype"], bench.s["requests"],
                                                gpu_memory_bytes() if cuda else 4 << 30,
                                                p2p_bps or (100e9 if cuda else 1e9), 10e9 if cuda else 2e9, cuda)))
    rng = random.Random(0)
    prompts = [[rng.randrange(4, spec.vocab) for _ in range(bench.s["prompt_len"])] for _ in range(bench.s["requests"])]
    need = 60.0 if cuda else 10.0
    for name in ("spotserve", "reparallelization", "kill"):
        if name in phases:
            approach = "spotserve" if name == "kill" else name
            bench.phase(name, lambda a=approach, k=name == "kill": run_live(bench, a, model_dir, profile, prompts,
                                                                             p2p_bps, kill=k), need_s=need)
    res["speedup"] = speedups(res)
    bench.save()
    print_table(res)
    if not args.work_dir and not res["errors"]:
        shutil.rmtree(bench.run_dir, ignore_errors=True)  # kept (logs) when something failed
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
