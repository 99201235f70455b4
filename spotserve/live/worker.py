"""Worker process of the live cluster: one per slot (GPU), runs the engine for its position.

    python -m spotserve.live.worker --connect HOST:PORT --token-file F --name INSTANCE/gK --model-dir DIR

It connects to the controller, says hello, heartbeats from a thread and executes commands in
order, replying to each with the command's seq: `configure` (with a migration map: run the
migration executor with the other participants, then join the process group of its new replica
and build the engine from the migrated weights; see live/migrate.py), `add_requests` (resume
requests from committed tokens; "kv_local" ones import the KV piece this worker holds), `step`,
`export` (park this worker's KV pieces of requests here, out of the engine, and reply their token
counts only), `release`, `shutdown`. Process groups are fresh per config id: the migration group
over the participants (key prefix m<id>/) and the replica's group (c<id>/r<replica>/), over a
TCPStore hosted by the controller; gloo on CPU, NCCL on GPU (cfg "device": "cuda", one GPU per
slot: INSTANCE/gK uses cuda:K). When the controller goes away the worker keeps its context and
reconnects for --reconnect-s seconds, saying hello again with what it holds (a restarted controller
adopts it); then it exits. With the engine setting "daemon" the weight shards live in the slot's
context daemon (live/context.py): a worker process restarted on the same slot re-attaches them at
start and says so in its hello (`holds`, `attached_bytes`), reading nothing from the checkpoint.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time

from spotserve.live import protocol as P


class Worker:
    """Command executor of one slot; `sock` is connected and authenticated by the shared token."""

    def __init__(self, sock: socket.socket, token: bytes, name: str, model_dir: str, heartbeat_s: float = 0.2,
                 daemon_name: str | None = None, daemon_dir: str | None = None):
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
        self.kv_local: dict = {}  # request id -> RequestKV held here (parked at a stop, or migrated in)
        self.device = "cpu"
        # the slot's context daemon (engine setting "daemon"): weights in its buffers outlive this process
        self.daemon_name, self.daemon_dir = daemon_name, daemon_dir
        self.daemon = None  # live/context.SlotContext once started or found
        self.attached_bytes = 0  # weight bytes re-attached from the daemon at start (a restart)
        self._new_shards: dict | None = None  # HF name -> daemon buffer of the shards a migration allocates

    # --- wire --------------------------------------------------------------------------------
    def send(self, mtype: str, body: dict, seq: int = 0) -> None:
        with self._send_lock:
            P.send(self.sock, P.Message(mtype, body, seq), self.token)

    def warm_up(self) -> None:
        """Import torch, the engine and the migration executor (preload) and read the checkpoint's spec,
        so the slot is ready at hello (a first migration then waits for no import)."""
        from spotserve.models.loader import CheckpointReader

        preload()
        self.spec = CheckpointReader(self.model_dir).spec
        if self.daemon_name:
            from spotserve.live.context import restore_context

            restore_context(self)

    def serve(self, address: tuple[str, int] | None = None, reconnect_s: float = 0.0) -> None:
        """Hello, then execute commands until shutdown. When the controller goes away the worker keeps
        its process and context (weights, parked KV) and reconnects to `address` for up to
        `reconnect_s` seconds, saying hello again with what it holds (see serve_sessions); past that,
        or with reconnect_s 0, it returns."""
        self.warm_up()
        serve_sessions(self, address, reconnect_s)
        if self.daemon is not None:  # leaving for good (shutdown, or no controller came back): free the context
            self.daemon.stop()

    def handle(self, msg: P.Message) -> tuple[str, dict]:
        b = msg.body
        if msg.type == "configure":
            return "ok", self.configure(b["config_id"], b["config"], b["position"], b.get("migration"))
        if self.engine is None and msg.type in ("add_requests", "step", "export"):
            raise RuntimeError(f"{msg.type} before configure")
        if msg.type == "add_requests":
            self.add_requests(b["requests"])
            return "ok", {}
        if msg.type == "step":
            tokens = self.engine.step()
            return "tokens", {"config_id": self.config_id, "step": b["step"], "tokens": tokens}
        if msg.type == "export":
            return "kv", {"pieces": {}, "parked": self.park(b["ids"], b["release"])}
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
        from spotserve.live.migrate import leave_group

        if self.world is not None and self.world.watch is not None:
            self.world.watch.stop()
        self.world = None
        leave_group()

    def _holds(self) -> list | None:
        return list(self.layout) if self.layout is not None else None

    def _drop_context(self) -> None:
        self.weights, self.layout, self.kv_local = None, None, {}
        if self.daemon is not None:
            self.daemon.begin(set())
            self.daemon.commit(None, None)  # nothing held: a restarted worker re-attaches nothing

    def configure(self, config_id: int, cfg: dict, pos: dict | None, migration: dict | None = None) -> dict:
        """Build the engine of `pos` in `cfg` (idempotent per config id); position None: go idle.

        With `migration` (live/migrate.py's map) the weights and KV pieces come from the migration
        executor run with every participant; without it (a controller that plans no migration) the
        weights are kept when the position's slice is unchanged, else read from the checkpoint.
        Returns what was done: bytes read from the checkpoint, executor stats, lost and held KV.
        """
        from spotserve.live.migrate import device_of
        from spotserve.models.loader import CheckpointReader, load_shard

        if config_id == self.config_id:
            return {"reused": True, "loaded_bytes": 0, "load_s": 0.0, "holds": self._holds()}
        t0 = time.perf_counter()
        self.engine, self.ctx = None, None
        self._leave_group()
        self.config_id = config_id
        if self.spec is None:
            self.spec = CheckpointReader(self.model_dir).spec
        if cfg:
            self.device = device_of(self.name, cfg)
            if self.device.startswith("cuda"):
                import torch

                torch.cuda.set_device(torch.device(self.device))  # NCCL groups use the current device
        if migration is not None:
            return self._migrate(config_id, cfg, pos, migration, t0)
        self.kv_local = {}
        if pos is None:
            self._drop_context()
            return {"reused": False, "loaded_bytes": 0, "load_s": 0.0, "holds": None}
        layout = (cfg["pp"], cfg["tp"], pos["stage"], pos["shard"])
        loaded = 0
        use_daemon = self._use_daemon(cfg)
        if layout != self.layout:
            self.weights = None  # drop the old slices before reading the new ones
            if use_daemon:
                from spotserve.live.context import attach_layout

                self.weights, loaded = attach_layout(self, layout, cfg.get("dtype", "fp32"))
            else:
                self.weights = {k: v.to(self.device) for k, v in load_shard(
                    self.model_dir, cfg["pp"], pos["stage"], cfg["tp"], pos["shard"],
                    dtype=cfg.get("dtype", "fp32")).items()}
                loaded = sum(t.numel() * t.element_size() for t in self.weights.values())
            self.loaded_bytes += loaded
            self.layout = layout
        self._start_engine(config_id, cfg, pos)
        if use_daemon:
            from spotserve.live.context import held_buffers

            self.daemon.release_unused(held_buffers(self))
        return {"reused": loaded == 0, "loaded_bytes": loaded, "load_s": time.perf_counter() - t0,
                "holds": self._holds()}

    def _migrate(self, config_id: int, cfg: dict, pos: dict | None, msg: dict, t0: float) -> dict:
        """Run this worker's part of a migration, then start the engine of its new position (if any)."""
        from spotserve.daemon.executor import MigrationExecutor
        from spotserve.live.context import buffer_names, held_buffers
        from spotserve.live.migrate import backend_of, join_group, leave_group, network_gpus, parse_migration
        from spotserve.live.migrate import usable_transfers
        from spotserve.models.loader import TORCH_DTYPES

        m = parse_migration(msg)
        me = self.name
        new_pos = m.new.position(me)
        if (new_pos is None) != (pos is None) or (pos is not None and (
                new_pos.replica, new_pos.stage, new_pos.shard) != (pos["replica"], pos["stage"], pos["shard"])):
            raise ValueError(f"{me}: position {pos} disagrees with the migration's new layout ({new_pos})")
        old_pos = m.old.position(me) if m.old is not None else None
        weights = {}
        if old_pos is not None and me in m.live:
            held = (*m.old.shape(old_pos.replica), old_pos.stage, old_pos.shard)
            if held != self.layout or self.weights is None:
                raise ValueError(f"{me}: the migration counts on its weights of {held}, it holds {self.layout}")
            weights = self.weights
        dtype = TORCH_DTYPES[cfg.get("dtype", "fp32")]
        self._new_shards = None
        use_daemon = self._use_daemon(cfg)
        if use_daemon:
            # new shards go to daemon buffers named by content; the held ones the migration reads or keeps stay
            if not weights:  # not a source: its buffers are released, so no tensor may still map them
                self.weights, self.layout = None, None
            self.daemon.begin(held_buffers(self))
            if new_pos is not None:
                new_layout = (*m.new.shape(new_pos.replica), new_pos.stage, new_pos.shard)
                self._new_shards = buffer_names(self.spec, new_layout)
        timeout = float(cfg.get("migration_timeout_s", max(30.0, float(cfg.get("timeout_s", 10.0)))))
        ex = MigrationExecutor(self.spec, me, m.ranks, dtype=dtype, device=self.device, checkpoint=self.model_dir,
                               staging_bytes=int(cfg.get("staging_bytes", (64 if self.device == "cpu" else 512) << 20)),
                               alloc=self._alloc)
        transfers = usable_transfers(self.spec, m)
        # new tensors and staging are made here, so the move itself (stats.seconds) does no cudaMalloc
        prepared = ex.prepare(m.old, m.new, transfers, m.requests, live=m.live, allocate=True)
        # Only GPUs with messages to send or receive form the group (every participant resolves the
        # same moves, so all agree on it): a load from the checkpoint alone needs no group at all.
        net = network_gpus(prepared.resolution)
        ex.ranks = {g: k for k, g in enumerate(net)} if me in net else {me: 0}
        kv = {r.request_id: self.kv_local[r.request_id] for r in m.requests if r.request_id in self.kv_local}
        t_group = time.perf_counter()
        if me in net:
            join_group(cfg["store_host"], cfg["store_port"], f"m{config_id}/", net.index(me), len(net),
                       backend_of(self.device), timeout)
        group_s = time.perf_counter() - t_group
        try:
            outcome = ex.run(m.old, m.new, transfers, weights, kv=kv, requests=m.requests, live=m.live,
                             prepared=prepared)
        finally:
            t_leave = time.perf_counter()
            leave_group()
            group_s += time.perf_counter() - t_leave
        weights = None  # the old shards no longer held are released below: no reference may outlive that
        st = outcome.stats
        self.loaded_bytes += st.checkpoint_bytes
        kv_in = {}
        for mv in outcome.resolution.moves:
            if mv.kind == "kv" and mv.dst == me and mv.src not in (None, me):
                kv_in[mv.name] = kv_in.get(mv.name, 0) + mv.nbytes
        self.weights, self.kv_local = None, {}
        if new_pos is None:
            self.layout = None
        else:
            pp, tp = m.new.shape(new_pos.replica)
            self.weights, self.layout = outcome.weights, (pp, tp, new_pos.stage, new_pos.shard)
            self.kv_local = dict(outcome.kv)
        if use_daemon:
            self.daemon.commit(self.layout, dtype)  # complete: a restarted worker may re-attach it
        if new_pos is not None:
            self._start_engine(config_id, cfg, pos)
        if use_daemon:  # the old shards the new layout does not keep, now that its engine is up
            self.daemon.release_unused(held_buffers(self))
        stats = {k: getattr(st, k) for k in ("sent_bytes", "received_bytes", "local_bytes", "checkpoint_bytes",
                                             "messages_sent", "messages_received", "rounds", "aliased")}
        stats.update(seconds=round(st.seconds, 6), prepare_seconds=round(st.prepare_seconds, 6),
                     alloc_seconds=round(st.prepared_alloc_seconds, 6),
                     group_seconds=round(group_s, 6), group_size=len(net) if me in net else 0)
        return {"reused": st.checkpoint_bytes == 0, "loaded_bytes": st.checkpoint_bytes,
                "load_s": time.perf_counter() - t0, "holds": self._holds(), "migration": stats,
                "lost_kv": sorted(outcome.lost_kv), "kv_held": sorted(self.kv_local), "kv_in": kv_in}

    def _alloc(self, name: str, shape: tuple, dtype):
        """New tensors of a migration (weight shards by HF name, received KV pieces as kv/<id>); with the
        daemon on, weight shards are daemon buffers (sealed when the migration completes)."""
        import torch

        if self._new_shards is not None and name in self._new_shards:
            return self.daemon.alloc(self._new_shards[name], shape, dtype)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def _use_daemon(self, cfg: dict) -> bool:
        """Whether this configure keeps weights in the slot's daemon (engine setting "daemon"); starts
        the daemon (or finds the one a previous process of this slot left) the first time."""
        if not cfg.get("daemon") or not self.daemon_name:
            return False
        if self.daemon is None:
            from spotserve.live.context import SlotContext

            self.daemon = SlotContext.open(self.daemon_name, self.daemon_dir, self.device)
        return True

    def _start_engine(self, config_id: int, cfg: dict, pos: dict) -> None:
        """Join the replica's process group for `config_id` and build the engine on the held weights."""
        import torch

        from spotserve.engine.config import EngineConfig
        from spotserve.engine.dist import DistContext, PeerWatch, World, make_contexts
        from spotserve.engine.engine import Engine
        from spotserve.live.migrate import backend_of, join_group

        pp, tp, stage, shard, replica = cfg["pp"], cfg["tp"], pos["stage"], pos["shard"], pos["replica"]
        timeout = float(cfg.get("timeout_s", 10.0))
        world = pp * tp
        if world == 1:
            ctx = DistContext.single(timeout)
        else:
            backend = backend_of(self.device)
            rank = stage * tp + shard
            store = join_group(cfg["store_host"], cfg["store_port"], f"c{config_id}/r{replica}/", rank, world,
                               backend, timeout)
            self.world = World(rank, world, timeout, backend, store, PeerWatch(store, rank, world, 0.25).start())
            ctx = make_contexts(self.world, 1, pp, tp)
        econf = EngineConfig(self.model_dir, pp=pp, tp=tp, block_size=cfg.get("block_size", 16),
                             num_blocks=cfg.get("num_blocks", 256), max_batch=cfg.get("max_batch", 32),
                             micro_batches=cfg.get("micro_batches", 1), dtype=cfg.get("dtype", "fp32"),
                             device=self.device, timeout_s=timeout, cuda_graphs=bool(cfg.get("cuda_graphs", True)))
        torch.set_num_threads(1)
        self.engine = Engine(econf, ctx, self.spec, self.weights)
        self.ctx = ctx

    # --- requests ----------------------------------------------------------------------------
    def add_requests(self, reqs: list) -> None:
        """Resume requests from their committed tokens; "kv_local" ones continue from the KV piece this
        worker holds for them (ValueError when it holds none), the others prefill prompt + output."""
        from spotserve.engine.engine import RequestState
        from spotserve.engine.sequence import SamplingParams

        for r in reqs:
            state = RequestState(r["id"], list(r["prompt"]), list(r["output"]), SamplingParams(**r["params"]))
            kv = self.kv_local.pop(r["id"], None)
            if r.get("kv_local") and kv is None:
                raise ValueError(f"{self.name}: no KV piece of request {r['id']} here (config {self.config_id})")
            self.engine.import_request(state, kv if r.get("kv_local") else None)

    def park(self, ids: list, release: bool) -> dict:
        """Keep the KV pieces of requests `ids` here (out of the engine when `release`); returns request
        id -> cached positions (None for a request that is not live here or has no KV yet)."""
        out = {}
        for rid in ids:
            if rid not in self.engine.scheduler.seqs:
                out[rid] = None
                continue
            _, kv = self.engine.export_request(rid)
            if kv is not None:
                self.kv_local[rid] = kv
            out[rid] = None if kv is None else int(kv.num_tokens)
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
    ap.add_argument("--reconnect-s", type=float, default=30.0,
                    help="after losing the controller, keep the context and reconnect for this long (0: exit)")
    ap.add_argument("--daemon-name", help="the slot's context daemon (used with the engine setting 'daemon')")
    ap.add_argument("--daemon-dir", help="folder of the daemon's socket and token (default: the daemon's own)")
    args = ap.parse_args(argv)
    if args.reconnect_s < 0:
        sys.exit(f"worker {args.name}: --reconnect-s must be >= 0, got {args.reconnect_s}")
    host, _, port = args.connect.rpartition(":")
    with open(args.token_file, "rb") as f:
        token = f.read().strip()
    try:
        sock = socket.create_connection((host, int(port)), timeout=30)
    except OSError as exc:
        sys.exit(f"worker {args.name}: cannot reach the controller at {args.connect}: {exc}")
    _tune(sock)
    Worker(sock, token, args.name, args.model_dir, args.heartbeat_s, args.daemon_name,
           args.daemon_dir).serve((host, int(port)), args.reconnect_s)
    # skip interpreter teardown: a process group with a lost peer can block in its destructor
    os._exit(0)



def preload() -> None:
    """Import what a worker needs before its first command (the fork server imports it once for all)."""
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    from spotserve.daemon import executor  # noqa: F401
    from spotserve.engine import engine  # noqa: F401
    from spotserve.live import context  # noqa: F401
    from spotserve.models import loader  # noqa: F401


# --- controller sessions: a worker outlives a lost controller for a grace window ----------------------
def hello_body(w: Worker, resumed: bool) -> dict:
    """The hello of worker `w`: slot and pid, and what it holds, so that a restarted controller can
    adopt it: the config id, the (pp, tp, stage, shard) of its weights, and the position of its engine
    ({config_id, replica, stage, shard, pp, tp} of the last configure that built one, or None)."""
    return {"worker": w.name, "pid": os.getpid(), "host": socket.gethostname(), "resumed": resumed,
            "config_id": int(w.config_id), "holds": list(w.layout) if w.layout is not None else None,
            "position": getattr(w, "position", None) if w.engine is not None else None,
            "daemon": w.daemon.name if w.daemon is not None else None, "attached_bytes": int(w.attached_bytes)}


def serve_sessions(w: Worker, address: tuple[str, int] | None, reconnect_s: float) -> None:
    """Run controller sessions on `w` until a shutdown command, or until the controller stays away for
    `reconnect_s` (from the loss of the last session that was accepted: one that brought a command
    or lasted a second; a refused hello, e.g. a wrong token, does not extend the window)."""
    resumed, lost_at = False, None
    while True:
        t0 = time.monotonic()
        ended, heard = _session(w, resumed)
        if ended == "shutdown":
            return
        if heard or lost_at is None or time.monotonic() - t0 >= 1.0:
            lost_at = time.monotonic()
        try:
            w.sock.close()
        except OSError:
            pass
        if address is None or reconnect_s <= 0:
            return
        print(f"worker {w.name}: controller lost, keeping config {w.config_id} and reconnecting to "
              f"{address[0]}:{address[1]} for {reconnect_s:g}s", file=sys.stderr, flush=True)
        sock = _reconnect(address, lost_at + reconnect_s)
        if sock is None:
            print(f"worker {w.name}: no controller within {reconnect_s:g}s, exiting", file=sys.stderr, flush=True)
            return
        w.sock, resumed = sock, True


def _session(w: Worker, resumed: bool) -> tuple[str, bool]:
    """One connection: hello, heartbeats, commands in order. Returns (how it ended: "shutdown" or
    "lost", whether any command arrived)."""
    stop = threading.Event()
    heard = False
    try:
        w.send("hello", hello_body(w, resumed))
        threading.Thread(target=_heartbeat, args=(w, w.sock, stop), name="heartbeat", daemon=True).start()
        while True:
            try:
                msg = P.recv(w.sock, w.token)
            except (ConnectionError, OSError, P.ProtocolError):
                return "lost", heard
            heard = True
            if msg.type == "shutdown":
                w.send("ok", {}, msg.seq)
                return "shutdown", heard
            try:
                mtype, body = w.handle(msg)
            except Exception as exc:  # a failed command is reported, the worker stays up for the next config
                mtype, body = "error", {"message": f"{w.name}: {type(exc).__name__}: {exc}"[:2000]}
            if msg.type == "configure" and mtype == "ok":
                _note_position(w, msg.body)
            w.send(mtype, body, msg.seq)
    except OSError:
        return "lost", heard
    finally:
        stop.set()


def _note_position(w: Worker, body: dict) -> None:
    """Remember the position a configure gave the engine (reported at the next hello)."""
    pos, cfg = body.get("position"), body.get("config") or {}
    if w.engine is None or pos is None or "pp" not in cfg:
        w.position = None
        return
    w.position = {"config_id": int(body["config_id"]), "replica": int(pos["replica"]), "stage": int(pos["stage"]),
                  "shard": int(pos["shard"]), "pp": int(cfg["pp"]), "tp": int(cfg["tp"])}


def _heartbeat(w: Worker, sock: socket.socket, stop: threading.Event) -> None:
    """Pings on one connection until it fails or its session ends."""
    while not stop.wait(w.heartbeat_s):
        try:
            with w._send_lock:
                P.send(sock, P.Message("ping", {}), w.token)
        except OSError:
            return


def _reconnect(address: tuple[str, int], deadline: float) -> socket.socket | None:
    """A new connection to the controller, retried until `deadline` (monotonic); None if none came."""
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection(address, timeout=1.0)
        except OSError:
            time.sleep(0.25)
            continue
        _tune(sock)
        return sock
    return None


def _tune(sock: socket.socket) -> None:
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


if __name__ == "__main__":
    main()
