"""Controller state in SQLite: idempotent commits and recovery after a killed controller."""
import multiprocessing as mp
import os
import signal

import pytest

from spotserve.live.state import StateStore


def test_commit_is_idempotent_and_detects_conflicts(tmp_path):
    s = StateStore(tmp_path / "state.db")
    s.add("r1", [1, 2, 3], {"max_tokens": 4})
    assert s.commit("r1", 0, [10, 11]) == 2
    assert s.commit("r1", 1, [11, 12]) == 3  # overlap re-sent after a retry
    assert s.commit("r1", 0, [10]) == 3
    with pytest.raises(ValueError, match="conflicts"):
        s.commit("r1", 2, [99])
    with pytest.raises(ValueError, match="gap"):
        s.commit("r1", 5, [1])
    with pytest.raises(KeyError):
        s.commit("nope", 0, [1])
    assert s.get("r1").tokens == [10, 11, 12]


def _writer(path, ready):
    s = StateStore(path)
    s.add("a", [1], {})
    s.add("b", [2], {})
    s.commit("a", 0, [5, 6, 7])
    s.finish("b", "completed")
    s.add("c", [3], {})
    ready.set()
    signal.pause()


def test_state_survives_sigkill_of_the_controller(tmp_path):
    path = tmp_path / "state.db"
    ready = mp.get_context("spawn").Event()
    p = mp.get_context("spawn").Process(target=_writer, args=(str(path), ready))
    p.start()
    assert ready.wait(30)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    s = StateStore(path)
    left = {r.id: r for r in s.unfinished()}
    assert set(left) == {"a", "c"}
    assert left["a"].tokens == [5, 6, 7] and left["a"].status == "running"
    assert s.get("b").status == "completed"


def test_request_manager_restore_resumes_from_the_commit():
    from spotserve.controller.requests import QUEUED, RequestManager

    rm = RequestManager(max_seq_len=64)
    q = rm.restore(7, 3.0, 10, 20, 5)
    assert (q.state, q.committed, q.remaining, q.kv_ready, q.first_token_t) == (QUEUED, 5, 15, False, 3.0)
    assert list(rm.queue) == [7]
    assert rm.restore(8, 3.0, 10, 20, 0).first_token_t is None
    for bad in (-1, 20, 21):
        with pytest.raises(ValueError, match="restoring"):
            rm.restore(9, 3.0, 10, 20, bad)
    assert 9 not in rm.requests


def test_transaction_groups_commits_and_rolls_back_on_error(tmp_path):
    st = StateStore(tmp_path / "s.sqlite")
    st.add("a", [1, 2], {"max_new_tokens": 4})
    st.add("b", [3], {"max_new_tokens": 4})
    with st.transaction():
        st.commit("a", 0, [7])
        st.commit("b", 0, [8])
    with pytest.raises(ValueError, match="conflicts"):
        with st.transaction():
            st.commit("a", 1, [9])
            st.commit("b", 0, [5])  # conflicts with the committed 8: the whole step is undone
    assert st.get("a").tokens == [7] and st.get("b").tokens == [8]
    st.close()


def test_meta_values_survive_reopening(tmp_path):
    s = StateStore(tmp_path / "state.db")
    assert s.get_meta("cluster") is None and s.get_meta("cluster", {}) == {}
    s.set_meta("cluster", {"port": 1234, "instances": {"i0": ["i0/g0"]}})
    s.set_meta("cluster", {"port": 4321, "instances": {}})  # replaced, not added
    s.close()
    s = StateStore(tmp_path / "state.db")
    assert s.get_meta("cluster") == {"port": 4321, "instances": {}}
    s.close()
