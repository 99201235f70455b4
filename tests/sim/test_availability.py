"""Availability trace parsing (JSON lines and g4dn CSV) and on-demand labelling."""
import pytest

from spotserve.cloud.availability import (label_ondemand_replacements, load_availability, parse_availability_lines,
                                          parse_g4dn_csv_lines)
from spotserve.experiment.data import PACKAGE_DATA

AV = PACKAGE_DATA / "availability"


def test_paper_trace_counts_match_readme():
    assert load_availability(AV / "trace_0304_real.txt").counts() == [
        (0.0, 7), (240.0, 8), (360.0, 10), (600.0, 9), (900.0, 10), (1200.0, 8), (1320.0, 8)]
    b = load_availability(AV / "trace_0506_real.txt")
    assert b.duration == 1020.0 and [c for _, c in b.counts()][:5] == [10, 8, 7, 8, 9]


def test_g4dn_csv_full_trace():
    t = load_availability(AV / "g4dn.csv")
    assert t.max_instances() == 24
    assert t.duration == pytest.approx(38760.0)  # 10.8 hours
    assert t.counts()[0] == (480.0, 1)


def test_ondemand_replacements_labelled():
    a = label_ondemand_replacements(load_availability(AV / "trace_0304_ondemand.txt"))
    assert a.ondemand == {"node-10", "node-11", "node-12"}
    b = label_ondemand_replacements(load_availability(AV / "trace_0506_ondemand.txt"))
    assert b.ondemand == {"node-10", "node-11", "node-12"}
    assert not label_ondemand_replacements(load_availability(AV / "trace_0304_real.txt")).ondemand


@pytest.mark.parametrize("line,msg", [
    ('[1000, "add"]', "expected"), ('[1000, "grow", {"nodes": ["x"]}]', "op must be"),
    ('not json', "not valid JSON"), ('[-5, "add", {"nodes": ["x"]}]', "t_ms"),
    ('[1000, "remove", {"nodes": ["zzz"]}]', "not held"), ('[1000, "add", {"nodes": ["a"]}]', "added twice"),
    ('[10, "add", {"nodes": ["q"]}]', "goes back"), ('[2000, "other", {"required_tpt": "x"}]', "required_tpt"),
])
def test_malformed_json_line_names_line_number(line, msg):
    lines = ['# header', '[0, "add", {"nodes": ["a", "b"]}]', '[500, "remove", {"nodes": ["b"]}]', line]
    with pytest.raises(ValueError, match=rf"t.txt:4: .*{msg}"):
        parse_availability_lines(lines, "t.txt")


def test_done_ends_trace_and_other_sets_rate():
    t = parse_availability_lines(['[0, "add", {"nodes": ["a"]}]', '[300, "other", {"nodes": [], "required_tpt": 0.8}]',
                                  '[900, "DONE", {"nodes": []}]', '[1000, "add", {"nodes": ["b"]}]'])
    assert t.duration == 0.9 and t.events[1].required_tpt == 0.8 and len(t.events) == 3


@pytest.mark.parametrize("line,msg", [("1,add", "3 columns"), ("x,add,n", "not a number"), ("1,grow,n", "op must"),
                                      ("1,remove,zz", "not held")])
def test_malformed_csv_line(line, msg):
    with pytest.raises(ValueError, match=rf"g.csv:2: .*{msg}"):
        parse_g4dn_csv_lines(["0,add,n1", line], "g.csv")


def test_replay_notice_one_grace_before_reclaim():
    from spotserve.cloud.replay import replay_events
    t = parse_availability_lines(['[0, "add", {"nodes": ["a", "b"]}]', '[20000, "add", {"nodes": ["c"]}]',
                                  '[40000, "remove", {"nodes": ["a", "c"], "required_tpt": 0.5}]'])
    ev = [(e.t, e.kind, e.instance, e.deadline) for e in replay_events(t, 30.0)]
    assert ev == [(0.0, "add", "a", None), (0.0, "add", "b", None), (10.0, "notice", "a", 40.0),
                  (20.0, "add", "c", None), (20.0, "notice", "c", 40.0),  # notice no earlier than its add
                  (40.0, "reclaim", "a", None), (40.0, "reclaim", "c", None), (40.0, "rate", "", None)]
    assert [e.t for e in replay_events(t, 30.0, time_scale=0.5)][2] == 5.0
