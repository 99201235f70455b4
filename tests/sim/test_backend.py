"""SimBackend batch timing, hand-checked: prefill P = 2 s, decode step S = 0.5 s."""
import pytest

from spotserve.controller.requests import RequestManager
from spotserve.planner.types import ParallelConfig
from spotserve.sim.backend import SimBackend

from .sim_helpers import FixedPolicy, Recorder

SHAPE = ParallelConfig(1, 1, 1, 4, 1)


def setup(kv_second=True):
    rm = RequestManager()
    rm.arrive(0, 0.0, 512, 10)
    rm.arrive(1, 0.0, 512, 10)
    reqs = rm.take_batch(2, 0, 0.0)
    if kv_second:  # request 1 resumes from a moved KV cache: no prefill, 4 tokens already committed
        reqs[1].committed, reqs[1].kv_ready = 4, True
    be, rec = SimBackend(FixedPolicy()), Recorder()
    be.attach(rec)
    be.start_batch(0, SHAPE, 7, reqs)
    return be, rec


def drain(be):
    while be.next_time() < float("inf"):
        be.step()


def test_batch_runs_to_completion_with_per_request_finish_times():
    be, rec = setup()
    drain(be)
    (t, _, bid, prog, stopped), = rec.done
    # request 0: prefill gives token 1 at 2.0, 9 more steps -> 6.5; request 1: 6 steps from 2.0 -> 5.0
    assert (t, bid, stopped) == (6.5, 7, False)
    assert (prog[0].new_tokens, prog[0].first_token_t, prog[0].finish_t) == (10, 2.0, 6.5)
    assert (prog[1].new_tokens, prog[1].first_token_t, prog[1].finish_t) == (6, 2.5, 5.0)


def test_stop_between_steps_cuts_at_the_last_boundary():
    be, rec = setup()
    be.stop_batch(0, 7, 3.2)
    drain(be)
    (t, _, _, prog, stopped), = rec.done
    assert stopped and t == pytest.approx(3.0)
    assert prog[0].new_tokens == 3 and prog[1].new_tokens == 2 and prog[0].finish_t is None


def test_stop_during_prefill_yields_no_tokens():
    be, rec = setup(kv_second=False)
    be.stop_batch(0, 7, 1.5)
    drain(be)
    (t, _, _, prog, stopped), = rec.done
    assert stopped and t == 1.5 and prog[0].new_tokens == 0 and prog[1].new_tokens == 0


def test_stop_after_the_end_changes_nothing_and_abort_reports_nothing():
    be, rec = setup()
    be.stop_batch(0, 7, 100.0)
    drain(be)
    assert rec.done[0][0] == 6.5 and rec.done[0][4] is False
    be2, rec2 = setup()
    be2.t = 2.6
    prog = {p.request_id: p for p in be2.abort_batch(0, 7)}
    drain(be2)
    assert rec2.done == [] and prog[0].new_tokens == 2 and prog[1].new_tokens == 1
