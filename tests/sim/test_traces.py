"""Arrival parsing and the Gamma generator (its CV is the one asked for)."""
import numpy as np
import pytest
from scipy import stats

from spotserve.experiment.data import PACKAGE_DATA
from spotserve.sim.traces import (gamma_arrivals, gamma_gaps, load_arrivals, measured_cv, modulated_arrivals,
                                  parse_arrival_lines)


def test_parse_rows_sorted_with_output_len():
    arr = parse_arrival_lines(["1,2.5,512,10", "0,1.0,128,0", "", "# comment"], output_len=64)
    assert [(a.id, a.t, a.input_len, a.output_len) for a in arr] == [(0, 1.0, 128, 64), (1, 2.5, 512, 64)]


@pytest.mark.parametrize("line,msg", [
    ("0,1.0", "columns"), ("0,abc,512,0", "numbers"), ("0,-1,512,0", "arrival_s"), ("0,1.0,0,0", "input_len"),
])
def test_malformed_line_names_line_number(line, msg):
    with pytest.raises(ValueError, match=rf"f.txt:2: .*{msg}"):
        parse_arrival_lines(["0,0.5,512,0", line], source="f.txt")


def test_repeated_id_rejected():
    with pytest.raises(ValueError, match=":2: request id 0 appears twice"):
        parse_arrival_lines(["0,0.5,512,0", "0,0.7,512,0"])


def test_paper_file_is_nearly_periodic():
    arr = load_arrivals(PACKAGE_DATA / "arrivals" / "query_tpt0.35_cv6.txt")
    assert len(arr) == 1024
    assert abs(len(arr) / arr[-1].t - 0.35) < 0.01
    assert measured_cv(arr) < 0.1  # labelled cv6, really ~0.05


@pytest.mark.parametrize("cv", [0.5, 2.0, 6.0])
def test_gamma_gaps_have_requested_mean_and_cv(cv):
    gaps = gamma_gaps(0.35, cv, 400_000, np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(1 / 0.35, rel=0.03)
    # the sample CV converges slowly for heavy tails; the shape parameter is the sharper check
    k, _, scale = stats.gamma.fit(gaps[:20_000], floc=0)
    assert 1 / np.sqrt(k) == pytest.approx(cv, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08 if cv > 3 else 0.03)


def test_gamma_arrivals_rate_and_cv_and_seed():
    a = gamma_arrivals(2.0, 3.0, 20_000, seed=5)
    assert len(a) / 20_000 == pytest.approx(2.0, rel=0.1)
    assert measured_cv(a) == pytest.approx(3.0, rel=0.1)
    assert [x.t for x in gamma_arrivals(2.0, 3.0, 100, seed=5)] == [x.t for x in a if x.t < 100]
    assert all(b.t >= a_.t for a_, b in zip(a, a[1:]))


def test_modulated_arrivals_follow_the_rate_schedule():
    a = modulated_arrivals([0.5, 2.0, 0.5], 2000.0, 1.0, seed=3)
    ts = np.array([x.t for x in a])
    counts = np.histogram(ts, bins=[0, 2000, 4000, 6000])[0] / 2000
    assert counts == pytest.approx([0.5, 2.0, 0.5], rel=0.12)


def test_bad_generator_arguments():
    with pytest.raises(ValueError):
        gamma_arrivals(0.0, 1.0, 10)
    with pytest.raises(ValueError):
        gamma_arrivals(1.0, -1.0, 10)
