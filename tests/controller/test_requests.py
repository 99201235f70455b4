"""RequestManager: FIFO batching, commits, interruption modes, and every request ends with a fate."""
import pytest

from spotserve.controller.requests import RequestManager


def test_fifo_batches_and_completion():
    rm = RequestManager()
    for i in range(5):
        rm.arrive(i, float(i), 8, 3)
    b = rm.take_batch(2, replica=0, now=5.0)
    assert [r.id for r in b] == [0, 1] and rm.queued == 3 and rm.n_running == 2
    rm.commit(b[0], 3, 6.0)
    rm.complete(b[0], 7.0)
    assert b[0].latency == 7.0 and b[0].first_token_t == 6.0 and rm.tokens_out == 3
    with pytest.raises(ValueError):
        rm.complete(b[1], 7.0)  # nothing committed yet


def test_interrupt_modes_and_front_of_queue():
    rm = RequestManager()
    for i in range(3):
        rm.arrive(i, 0.0, 8, 10)
    a, b = rm.take_batch(2, 0, 0.0)
    rm.commit(a, 4, 1.0)
    rm.commit(b, 4, 1.0)
    rm.interrupt(a, "kv")
    rm.interrupt(b, "none")
    assert list(rm.queue) == [1, 0, 2]
    assert a.committed == 4 and a.kv_ready and a.recomputed_tokens == 0
    assert b.committed == 0 and not b.kv_ready and b.recomputed_tokens == 4
    c = rm.take_batch(1, 0, 2.0)[0]
    rm.interrupt(c, "tokens")
    assert c.committed == 0 and not c.kv_ready and c.interruptions == 2
    with pytest.raises(ValueError):
        rm.interrupt(c, "kv")  # not running


def test_overlong_request_rejected_with_reason_and_fates_add_up():
    rm = RequestManager(max_seq_len=100)
    rm.arrive(0, 0.0, 90, 20)
    rm.arrive(1, 0.0, 10, 10)
    rm.arrive(2, 0.0, 10, 10)
    (r1,) = rm.take_batch(1, 0, 0.0)
    rm.commit(r1, 10, 1.0)
    rm.complete(r1, 1.0)
    rm.finalize()
    c = rm.counts()
    assert rm.requests[0].state == "rejected" and "exceed" in rm.requests[0].reason
    assert (c["arrived"], c["completed"], c["rejected"], c["unfinished"]) == (3, 1, 1, 1)
    assert c["arrived"] == c["completed"] + c["rejected"] + c["unfinished"]


def test_duplicate_and_bad_commit():
    rm = RequestManager()
    rm.arrive(0, 0.0, 4, 2)
    with pytest.raises(ValueError):
        rm.arrive(0, 1.0, 4, 2)
    (r,) = rm.take_batch(4, 0, 0.0)
    with pytest.raises(ValueError):
        rm.commit(r, 3, 0.0)


def test_take_batch_skips_requests_the_replica_must_not_take_and_keeps_their_place():
    rm = RequestManager()
    for i in range(5):
        rm.arrive(i, float(i), 8, 3)
    b = rm.take_batch(2, replica=1, now=5.0, accept=lambda q: q.id % 2 == 1)
    assert [r.id for r in b] == [1, 3] and all(r.replica == 1 for r in b)
    assert list(rm.queue) == [0, 2, 4] and rm.n_running == 2
    assert rm.take_batch(4, replica=0, now=6.0, accept=lambda q: False) == [] and list(rm.queue) == [0, 2, 4]
