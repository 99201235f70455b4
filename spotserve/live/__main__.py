"""`python -m spotserve.live`: serve a checkpoint on a live cluster of worker processes, with the HTTP API.

    python -m spotserve.live --model-dir DIR --instances i0,i1            # one host, local launcher
    mpirun -hostfile HOSTS -np N python -m spotserve.live --model-dir DIR --trace T.txt --time-scale 0.05
        # rank 0: controller + HTTP API; ranks 1..N-1: per-host agents that start/kill instances

A restart with the same --state (a new process, or under mpirun a new job) reuses the previous
controller's token and worker address, so workers that outlived it (--reconnect-s) are adopted.

Availability: --instances (fixed start set), --trace (availability trace, time-scaled; notices
--grace-s before each removal), the /admin/* endpoints, and --imds-url (AWS spot instance-action
poller, one instance). Requests: the HTTP API, and optionally --arrivals FILE (replayed).
--exit-when-done stops once the trace is over and every request finished, printing a summary.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def _args(argv):
    ap = argparse.ArgumentParser(prog="python -m spotserve.live", description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--profile", help="cost-model profile JSON (default: RUN_DIR/profile.json, measured through "
                                      "the live path on first use: python -m spotserve.live.calibrate)")
    ap.add_argument("--run-dir", default="spotserve-live")
    ap.add_argument("--state", help="SQLite state path (default RUN_DIR/state.sqlite); reuse it to resume")
    ap.add_argument("--instances", default="", help="comma-separated instances to start with")
    ap.add_argument("--trace", help="availability trace (JSON-lines or g4dn CSV)")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--arrivals", help="arrival file to replay (id,arrival_s,input_len,...)")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--gpus-per-instance", type=int, default=2)
    ap.add_argument("--approach", default="spotserve")
    ap.add_argument("--rate", type=float, default=1.0, help="arrival rate (req/s) the optimizer plans for")
    ap.add_argument("--grace-s", type=float, default=5.0)
    ap.add_argument("--host", default="127.0.0.1", help="address of the worker server and the HTTP API")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port (0: any)")
    ap.add_argument("--no-http", action="store_true")
    ap.add_argument("--api-key-file", help="file holding the API key (or env SPOTSERVE_API_KEY)")
    ap.add_argument("--imds-url", help="poll this AWS instance-metadata endpoint for --imds-instance")
    ap.add_argument("--imds-instance")
    ap.add_argument("--exit-when-done", action="store_true")
    ap.add_argument("--step-pause-s", type=float, default=0.0, help="pause between decode steps (demos)")
    ap.add_argument("--reconnect-s", type=float, default=30.0,
                    help="workers outlive a lost controller this long; a restart with the same --state adopts them")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="workers' device: cuda gives slot INSTANCE/gK the GPU K, NCCL between workers")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="weights and KV (default fp32 on cpu, fp16 on cuda)")
    ap.add_argument("--daemon", action="store_true",
                    help="keep each slot's weight shards in a context daemon (a crashed worker re-attaches them)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap.parse_args(argv)


def _mpi_share(payload: bytes | None) -> tuple[int, int, bytes]:
    """(rank, size, payload broadcast from rank 0) over MPI, as raw bytes (no pickle)."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    buf = np.zeros(1024, dtype=np.uint8)
    if rank == 0:
        buf[:2] = (len(payload) >> 8, len(payload) & 0xFF)
        buf[2:2 + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    comm.Bcast(buf, root=0)
    n = (int(buf[0]) << 8) | int(buf[1])
    return rank, size, bytes(buf[2:2 + n])


async def serve_http(app, host: str, port: int):
    """Start uvicorn on the running loop; returns (server, bound port)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.02)
    return server, sock.getsockname()[1]


async def _main(args, agents: int, rank0_hook=None) -> int:
    from spotserve.api.app import create_app
    from spotserve.cloud.availability import load_availability
    from spotserve.live.replay import initial_instances, replay_arrivals, schedule_trace
    from spotserve.live.service import LiveConfig, LiveService
    from spotserve.sim.traces import load_arrivals

    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    profile = args.profile
    if profile is None:  # measured through the live path, cached in the run dir (a restart reuses it)
        from spotserve.live.calibrate import cached_profile

        profile = await cached_profile(args.model_dir, run, args.gpus_per_instance,
                                       say=lambda m: print(m, file=sys.stderr, flush=True))
    trace = load_availability(args.trace) if args.trace else None
    instances = [s for s in args.instances.split(",") if s] or (initial_instances(trace) if trace else [])
    if not instances:
        raise SystemExit("no instances: give --instances or a --trace with instances at time 0")
    cfg = LiveConfig(args.model_dir, profile, str(run), gpus_per_instance=args.gpus_per_instance,
                     approach=args.approach, rate=args.rate, grace_s=args.grace_s, state_path=args.state,
                     host=args.host, output_len=args.output_len, reconnect_s=args.reconnect_s)
    cfg.engine.update(device=args.device, dtype=args.dtype or ("fp16" if args.device == "cuda" else "fp32"),
                      daemon=args.daemon)
    # the token: the one the state store's previous controller used (its workers, which may outlive it,
    # authenticate with it), else a fresh one; under mpirun too (a restart there is a new job), rank 0
    # then broadcasts it to the agents
    svc = LiveService(cfg)
    address = await svc.listen()
    if rank0_hook is not None:
        rank0_hook(address.encode() + b"\n" + svc.token)
    await svc.start(instances, agents=agents)
    svc.backend.step_pause_s = args.step_pause_s
    server = None
    if not args.no_http:
        key = os.environ.get("SPOTSERVE_API_KEY")
        if args.api_key_file:
            key = Path(args.api_key_file).read_text().strip()
        server, port = await serve_http(create_app(svc, api_key=key), args.host, args.port)
        pids = {n: c.pid for n, c in sorted(svc.pool.conns.items()) if c.alive and not c.is_agent}
        print(json.dumps({"event": "listening", "pid": os.getpid(), "http": f"http://{args.host}:{port}",
                          "workers": address, "worker_pids": pids, "adopted": sorted(svc.adopted)}), flush=True)
    if args.imds_url:
        from spotserve.cloud.aws import SpotNoticePoller

        poller = SpotNoticePoller(args.imds_url)
        asyncio.ensure_future(poller.run(lambda grace: svc.notice(args.imds_instance, grace)))
    if trace is not None:
        schedule_trace(svc, trace, args.time_scale)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    arrivals = None
    if args.arrivals:
        arrivals = asyncio.ensure_future(replay_arrivals(svc, load_arrivals(args.arrivals, args.output_len),
                                                         args.time_scale))
    if args.exit_when_done:
        end = trace.duration * args.time_scale if trace else 0.0
        while not stop.is_set():
            await asyncio.sleep(0.2)
            if arrivals is not None and not arrivals.done():
                continue
            if svc.backend.now() >= end and all(r.done for r in svc.requests.values()):
                break
        print(json.dumps(svc.summary()), flush=True)
    else:
        await stop.wait()
    if server is not None:
        server.should_exit = True
    await svc.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if any(k in os.environ for k in _MPI_ENV):
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
        if MPI.COMM_WORLD.Get_rank() != 0:
            from spotserve.live.agent import run_agent

            rank, _, payload = _mpi_share(None)
            address, token = payload.split(b"\n", 1)
            run_agent(address.decode(), token, rank, args.model_dir, str(Path(args.run_dir) / f"agent{rank}"),
                      reconnect_s=args.reconnect_s)
            return 0
        return asyncio.run(_main(args, size - 1, rank0_hook=lambda p: _mpi_share(p)))
    return asyncio.run(_main(args, 0))


if __name__ == "__main__":
    sys.exit(main())
