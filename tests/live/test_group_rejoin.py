"""A worker whose group join failed (its peer never came: died, or the rendezvous timed out) joins the
next group with peers that never failed. torch numbers a process's groups and names their store keys
by that number; without spotserve.engine.dist.fresh_group_names the failed join leaves this process
one number ahead and the next rendezvous waits on keys its peer never writes (seen live: a replica
re-formed after a failed migration timed out for good)."""
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(120)

PEER = textwrap.dedent("""
    import sys, time, torch, torch.distributed as dist
    from spotserve.live.migrate import join_group, leave_group
    port, rank, fail_first = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    if fail_first:  # a 2-rank group whose other rank never shows up
        try:
            join_group("127.0.0.1", port, "dead/", 0, 2, "gloo", 1.0)
            raise SystemExit("the lone join should have timed out")
        except SystemExit:
            raise
        except Exception:
            pass
    join_group("127.0.0.1", port, "live/", rank, 2, "gloo", 20.0)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    leave_group()
    print("SUM", int(t.item()))
""")


def test_a_failed_join_does_not_shift_the_next_groups_keys(tmp_path):
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    procs = [subprocess.Popen([sys.executable, str(script), str(store.port), str(r), f], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r, f in ((0, "1"), (1, "0"))]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("SUM 3" in o for o in outs), outs
