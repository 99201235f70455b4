"""Worker process of the live cluster: one per slot (GPU), runs the engine for its position.

    python -m spotserve.live.worker --connect HOST:PORT --token-file F --name INSTANCE/gK --model-dir DIR

It connects to the controller, says hello, heartbeats from a thread and executes commands in
order, replying to each with the command's seq: `configure` (join the process group of its
replica for a config id and build the engine; weights kept when the position's slice is
unchanged, else read slice by slice from the checkpoint), `add_requests` (resume requests from
committed tokens, with their KV pieces when the controller kept them), `step`, `export` (hand this
worker's KV piece of requests back), `release`, `shutdown`. Process groups are fresh per config id
and replica: a gloo group over a TCPStore hosted by the controller, key prefix c<id>/r<replica>/.
When the controller goes away the worker exits.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from datetime import timedelta

from spotserve.live import protocol as P


class Worker:
    """Command executor of one slot; `sock` is connected and authenticated by the shared token."""

    def __init__(self, sock: socket.socket, token: bytes, name: str, model_dir: str, heartbeat_s: float = 0.2):
        self.sock, self.token, self.name, self.model_dir = sock, token, name, model_dir
        self.heartbeat_s = heartbeat_s
        self._send_lock = threading.Lock()
        self.engine = None
        self.ctx = None
        self.world = None
        self.config_id = -1
        self.layout = None  # (pp, tp, stage, shard) of the weights held
        self.weights = None
        self.spec = None
        self.loaded_bytes = 0  # bytes read from the checkpoint, all configs together

    # --- wire --------------------------------------------------------------------------------
    def send(self, mtype: str, body: dict, seq: int = 0) -> None:
        with self._send_lock:
            P.send(self.sock, P.Message(mtype, body, seq), self.token)

    def _beat(self) -> None:
        while True:
            time.sleep(self.heartbeat_s)
            try:
                self.send("ping", {})
            except OSError:
                return

    def warm_up(self) -> None:
        """Import torch and the engine and read the checkpoint's spec, so the slot is ready at hello."""
        import torch  # noqa: F401

        from spotserve.engine import engine  # noqa: F401
        from spotserve.models.loader import CheckpointReader

        self.spec = CheckpointReader(self.model_dir).spec

    def serve(self) -> None:
        """Hello, then execute commands until shutdown or the controller disconnects."""
        self.warm_up()
        self.send("hello", {"worker": self.name, "pid": os.getpid()})
        threading.Thread(target=self._beat, name="heartbeat", daemon=True).start()
        while True:
            try:
                msg = P.recv(self.sock, self.token)
            except (ConnectionError, OSError):
                return
            if msg.type == "shutdown":
                self.send("ok", {}, msg.seq)
                return
            try:
                mtype, body = self.handle(msg)
            except Exception as exc:  # a failed command is reported, the worker stays up for the next config
                mtype, body = "error", {"message": f"{self.name}: {type(exc).__name__}: {exc}"[:2000]}
            self.send(mtype, body, msg.seq)

    def handle(self, msg: P.Message) -> tuple[str, dict]:
        b = msg.body
        if msg.type == "configure":
            return "ok", self.configure(b["config_id"], b["config"], b["position"])
        if self.engine is None and msg.type in ("add_requests", "step", "export"):
            raise RuntimeError(f"{msg.type} before configure")
        if msg.type == "add_requests":
            self.add_requests(b["requests"])
            return "ok", {}
        if msg.type == "step":
            tokens = self.engine.step()
            return "tokens", {"config_id": self.config_id, "step": b["step"], "tokens": tokens}
        if msg.type == "export":
            return "kv", {"pieces": self.export(b["ids"], b["release"])}
        if msg.type == "release":
            for rid in b["ids"]:
                if self.engine is not None and rid in self.engine.scheduler.seqs:
                    self.engine.release(rid)
            return "ok", {}
        if msg.type == "ping":
            return "pong", {}
        raise ValueError(f"unexpected command {msg.type!r}")

    # --- configuration -----------------------------------------------------------------------
    def _leave_group(self) -> None:
        import torch.distributed as dist

        if self.world is not None and self.world.watch is not None:
            self.world.watch.stop()
        self.world = None
        if dist.is_initialized():
            dist.destroy_process_group()

    def configure(self, config_id: int, cfg: dict, pos: dict | None) -> dict:
        """Build the engine of `pos` in `cfg` (idempotent per config id); position None: go idle."""
        from spotserve.engine.config import EngineConfig
        from spotserve.engine.dist import DistContext, PeerWatch, World, make_contexts
        from spotserve.engine.engine import Engine
        from spotserve.models.loader import CheckpointReader, load_shard

        if config_id == self.config_id:
            return {"reused": True, "loaded_bytes": 0, "load_s": 0.0}
        t0 = time.perf_counter()
        self.engine, self.ctx = None, None
        self._leave_group()
        self.config_id = config_id
        if pos is None:
            return {"reused": False, "loaded_bytes": 0, "load_s": 0.0}
        import torch
        import torch.distributed as dist

        pp, tp, stage, shard, replica = cfg["pp"], cfg["tp"], pos["stage"], pos["shard"], pos["replica"]
        timeout = float(cfg.get("timeout_s", 10.0))
        if self.spec is None:
            self.spec = CheckpointReader(self.model_dir).spec
        layout = (pp, tp, stage, shard)
        loaded = 0
        if layout != self.layout:
            self.weights = None  # drop the old slices before reading the new ones
            self.weights = load_shard(self.model_dir, pp, stage, tp, shard, dtype=cfg.get("dtype", "fp32"))
            loaded = sum(t.numel() * t.element_size() for t in self.weights.values())
            self.loaded_bytes += loaded
            self.layout = layout
        world = pp * tp
        if world == 1:
            ctx = DistContext.single(timeout)
        else:
            if cfg["store_host"] in ("127.0.0.1", "localhost"):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            base = dist.TCPStore(cfg["store_host"], cfg["store_port"], is_master=False,
                                 timeout=timedelta(seconds=timeout))
            store = dist.PrefixStore(f"c{config_id}/r{replica}/", base)
            rank = stage * tp + shard
            dist.init_process_group("gloo", store=dist.PrefixStore("pg/", store), rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout))
            self.world = World(rank, world, timeout, "gloo", store, PeerWatch(store, rank, world, 0.25).start())
            ctx = make_contexts(self.world, 1, pp, tp)
        econf = EngineConfig(self.model_dir, pp=pp, tp=tp, block_size=cfg.get("block_size", 16),
                             num_blocks=cfg.get("num_blocks", 256), max_batch=cfg.get("max_batch", 32),
                             micro_batches=cfg.get("micro_batches", 1), dtype=cfg.get("dtype", "fp32"),
                             timeout_s=timeout)
        torch.set_num_threads(1)
        self.engine = Engine(econf, ctx, self.spec, self.weights)
        self.ctx = ctx
        return {"reused": loaded == 0, "loaded_bytes": loaded, "load_s": time.perf_counter() - t0}

    # --- requests ----------------------------------------------------------------------------
    def add_requests(self, reqs: list) -> None:
        from spotserve.engine.engine import RequestState
        from spotserve.engine.kv_reshard import RequestKV, assemble
        from spotserve.engine.sequence import SamplingParams

        cfg = self.engine.config
        for r in reqs:
            state = RequestState(r["id"], list(r["prompt"]), list(r["output"]), SamplingParams(**r["params"]))
            kv = None
            if r.get("kv"):
                pieces = [RequestKV.from_bytes(bytes(blob)) for blob in r["kv"]]
                kv = assemble(pieces, self.spec, cfg.pp, cfg.tp, self.ctx.stage, self.ctx.shard,
                              block_size=cfg.block_size)
            self.engine.import_request(state, kv)

    def export(self, ids: list, release: bool) -> dict:
        out = {}
        for rid in ids:
            if rid not in self.engine.scheduler.seqs:
                out[rid] = None
                continue
            _, kv = self.engine.export_request(rid)
            out[rid] = None if kv is None else kv.to_bytes()
            if release:
                self.engine.release(rid)
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="spotserve live worker (one per slot)")
    ap.add_argument("--connect", required=True, help="controller HOST:PORT")
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--name", required=True, help="slot name, INSTANCE/gK")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--heartbeat-s", type=float, default=0.2)
    args = ap.parse_args(argv)
    host, _, port = args.connect.rpartition(":")
    with open(args.token_file, "rb") as f:
        token = f.read().strip()
    try:
        sock = socket.create_connection((host, int(port)), timeout=30)
    except OSError as exc:
        sys.exit(f"worker {args.name}: cannot reach the controller at {args.connect}: {exc}")
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    Worker(sock, token, args.name, args.model_dir, args.heartbeat_s).serve()
    # skip interpreter teardown: a process group with a lost peer can block in its destructor
    os._exit(0)


if __name__ == "__main__":
    main()
