"""Worker-to-worker point-to-point throughput on CPU: gloo send/recv between two processes over loopback.

That is the path the migration executor moves weights and KV on between live CPU workers (one gloo
process group of the participants, see live/migrate.py), so the live profile's link bandwidth is this
figure. The measuring process runs rank 0 and starts rank 1 as `python -m spotserve.live.p2p PORT ...`;
both build a gloo group object over a TCPStore, without touching the default process group.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta


def _group(store, rank: int, timeout_s: float):
    import torch.distributed as dist

    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=timeout_s)
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(dist.PrefixStore("p2p/", store), rank, 2, opts)


def _exchange(pg, rank: int, nbytes: int, reps: int, pings: int) -> tuple[float, float]:
    """Rank 0 sends `reps` messages of `nbytes` to rank 1 (one warm-up first), then `pings` 1-byte round
    trips. Returns (bytes/s, round-trip s), as rank 0 times them (rank 1's figures are not used)."""
    import torch

    buf = torch.ones(nbytes, dtype=torch.uint8) if rank == 0 else torch.empty(nbytes, dtype=torch.uint8)
    tick = torch.zeros(1, dtype=torch.uint8)

    def send(t, tag):
        pg.send([t], 1 - rank, tag).wait()

    def recv(t, tag):
        pg.recv([t], 1 - rank, tag).wait()

    for step in range(reps + 1):  # step 0 warms the connection up
        if step == 1:
            t0 = time.perf_counter()
        send(buf, step) if rank == 0 else recv(buf, step)
    recv(tick, 0) if rank == 0 else send(tick, 0)  # rank 1 has every byte
    bw = nbytes * reps / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for k in range(pings):
        if rank == 0:
            send(tick, k + 1)
            recv(tick, k + 1)
        else:
            recv(tick, k + 1)
            send(tick, k + 1)
    return bw, (time.perf_counter() - t0) / pings


def measure_p2p(nbytes: int = 8 << 20, reps: int = 4, pings: int = 20, timeout_s: float = 120.0
                ) -> tuple[float, float]:
    """(bytes/s, round-trip s) of gloo point-to-point between this process and a peer process it starts.
    Raises RuntimeError when the peer fails."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout_s))
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    peer = subprocess.Popen([sys.executable, "-m", "spotserve.live.p2p", str(store.port), str(nbytes), str(reps),
                             str(pings), str(timeout_s)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out = _exchange(_group(store, 0, timeout_s), 0, nbytes, reps, pings)
    except Exception as exc:
        peer.kill()
        log = peer.communicate()[0].decode(errors="replace")[-2000:]
        raise RuntimeError(f"p2p measurement failed: {exc}\npeer output:\n{log}") from None
    if peer.wait(timeout_s) != 0:
        raise RuntimeError(f"p2p peer exited with {peer.returncode}: {peer.communicate()[0][-2000:]!r}")
    return out


def _peer(argv: list[str]) -> None:
    import torch.distributed as dist

    port, nbytes, reps, pings, timeout_s = int(argv[0]), int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4])
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=timeout_s))
    _exchange(_group(store, 1, timeout_s), 1, nbytes, reps, pings)


if __name__ == "__main__":
    _peer(sys.argv[1:])
