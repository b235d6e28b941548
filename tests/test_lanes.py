"""Lanes without a broker (worker/lanes.py): their specs, the tenant a pattern lane's topic names, each lane's
share of the in-flight window, and the headers a tenant-fixing lane decodes its records with. Through the
broker: test_lanes_kafka.py."""

import pytest

from lorabus.worker.answers import _lane_headers
from lorabus.worker.lanes import Lane, LaneConfigError, LaneShares, LaneTable, parse_lane, tenant_of_topic_text
from lorabus.worker.reply_topics import tenant_topic_text


def test_a_lane_spec_sets_each_option():
    assert parse_lane("lorabus.jobs.acme") == Lane("lorabus.jobs.acme")
    assert parse_lane("j.a,tenant=acme,weight=4,max-inflight=32,rate=2.5,results=r.a") == Lane(
        "j.a", tenant="acme", weight=4.0, max_inflight=32, rate=2.5, results="r.a")


@pytest.mark.parametrize("spec", ["", "bad topic", "j,weight=0", "j,weight=-1", "j,weight=inf", "j,rate=x",
                                  "j,max-inflight=-1", "j,color=red", "j,tenant", "j,tenant=", "j,results=a b"])
def test_a_bad_lane_spec_is_refused_naming_the_flag(spec):
    with pytest.raises(LaneConfigError, match="^--lane "):
        parse_lane(spec)


@pytest.mark.parametrize("tenant", ["acme", "a.b", "a_b", "é x", "A-1", "租户"])
def test_a_pattern_lane_names_the_tenant_its_topic_was_written_for(tenant):
    assert tenant_of_topic_text(tenant_topic_text(tenant)) == tenant
    table = LaneTable.from_config([], "lorabus.jobs.{tenant}", "lorabus.results.{tenant}", "lorabus.jobs")
    lane = table.lane(f"lorabus.jobs.{tenant_topic_text(tenant)}")
    assert (lane.tenant, lane.results) == (tenant, f"lorabus.results.{tenant_topic_text(tenant)}")


@pytest.mark.parametrize("text", ["", "_", "_zz", "a_2", "_2E", "_ff", "a.b"])
def test_text_no_tenant_writes_names_none(text):
    assert tenant_of_topic_text(text) is None


def test_the_table_subscribes_by_name_or_by_pattern():
    single = LaneTable.from_config([], "", "", "lorabus.jobs")
    assert single.topics() == ["lorabus.jobs"] and not single.configured and single.subscription_pattern() is None
    assert single.lane("lorabus.jobs") == Lane("lorabus.jobs")  # one topic: a lane that fixes nothing
    named = LaneTable.from_config(["j.a,tenant=a,results=r.a", "j.b"], "", "", "lorabus.jobs")
    assert named.topics() == ["j.a", "j.b"] and named.named_topics() == ["j.a", "j.b", "r.a"]
    pattern = LaneTable.from_config(["lorabus.jobs.a,weight=4"], "lorabus.jobs.{tenant}", "", "lorabus.jobs")
    regex = pattern.subscription_pattern()
    assert regex == r"^lorabus\.jobs\.[A-Za-z0-9_-]+$" and pattern.lane("lorabus.jobs.a").weight == 4
    assert pattern.lane("lorabus.jobs.b") == Lane("lorabus.jobs.b", tenant="b")


@pytest.mark.parametrize("specs, pattern, results, message", [
    (["j", "j,weight=2"], "", "", "given twice"),
    ([], "lorabus.jobs", "", "--lane-pattern"),
    ([], "a.{tenant}.{tenant}", "", "--lane-pattern"),
    ([], "", "r.{tenant}", "needs --lane-pattern"),
    (["other.topic"], "lorabus.jobs.{tenant}", "", "must match it"),
])
def test_a_bad_table_is_refused(specs, pattern, results, message):
    with pytest.raises(LaneConfigError, match=message):
        LaneTable.from_config(specs, pattern, results, "lorabus.jobs")


def _shares(specs, window=256, clock=lambda: 0.0):
    return LaneShares(LaneTable.from_config(specs, "", "", "jobs"), window, clock)


def test_a_lane_alone_holds_the_whole_window_and_a_quiet_lane_that_wakes_takes_its_share():
    shares = _shares(["a", "b"])
    for _ in range(256):
        assert shares.room("a") > 0
        shares.took("a")
    assert shares.room("a") == 0  # the window is full: a is paused
    assert shares.room("b") == 128  # b is not: its first record is read at the next poll
    shares.took("b")
    assert shares.share("a") == 128 and shares.room("a") == 0  # a waits until it holds less than its half
    for _ in range(129):
        shares.done("a")
    assert shares.room("a") == 1
    shares.done("b")
    assert shares.share("a") == 256  # b idle again: a gets the window back


def test_weights_split_the_window_and_a_lane_bound_caps_its_share():
    shares = _shares(["a,weight=1", "b,weight=4", "c,max-inflight=3"], window=100)
    shares.took("a")
    shares.took("b")
    assert (shares.share("a"), shares.share("b")) == (20, 80)
    assert shares.share("c") == 3  # its bound, below the third of the window its weight would give
    assert shares.held == {"a": 1, "b": 1}


def test_a_rate_limited_lane_takes_a_burst_then_its_rate():
    now = [0.0]
    shares = _shares(["a,rate=2"], clock=lambda: now[0])
    assert shares.room("a") == 2
    shares.took("a")
    shares.took("a")
    assert shares.room("a") == 0
    now[0] = 0.5  # half a second: one more job
    assert shares.room("a") == 1
    slow = _shares(["s,rate=0.5"], clock=lambda: now[0])
    assert slow.room("s") == 1  # a rate under one a second still takes one job, then one every 2 s
    slow.took("s")
    now[0] += 1.0
    assert slow.room("s") == 0
    now[0] += 1.0
    assert slow.room("s") == 1


def test_a_tenant_fixing_lane_decodes_with_its_tenant_and_reports_what_a_header_claimed():
    lane = Lane("j.a", tenant="a")
    headers, claimed = _lane_headers(lane, [("X-Tenant-Id", b"b"), ("x-adapter-id", b"fin")])
    assert headers == [("x-adapter-id", b"fin"), ("x-tenant-id", b"a")] and claimed == "b"
    assert _lane_headers(lane, None) == ([("x-tenant-id", b"a")], None)
    assert _lane_headers(lane, [("x-tenant-id", b"\xff")])[1] == repr(b"\xff")
    open_lane = [("x-tenant-id", b"b")]
    assert _lane_headers(Lane("j"), open_lane) == (open_lane, None)  # a lane that fixes nothing: as they came


def _drain_both(shares: LaneShares, tokens: dict[str, int], ticks: int = 4000) -> dict[str, int]:
    """Two lanes with endless backlogs; each tick they take what they may and the oldest held job (of either
    lane) is answered, with its lane's tokens. The tokens served per lane."""
    held, served = [], {lane: 0 for lane in tokens}
    for _ in range(ticks):
        for lane in tokens:
            for _ in range(shares.room(lane)):
                shares.took(lane)
                held.append(lane)
        lane = held.pop(0)
        shares.done(lane, tokens[lane])
        served[lane] += tokens[lane]
    return served


@pytest.mark.parametrize("weights", [(1, 1), (1, 4)])
def test_busy_lanes_share_the_work_in_tokens_by_weight(weights):
    """Lane a's jobs are ten times the work of b's; with only the window split by jobs, a would get ten
    times b's tokens. Served tokens over weight decide instead."""
    shares = _shares([f"a,weight={weights[0]}", f"b,weight={weights[1]}"], window=16)
    served = _drain_both(shares, {"a": 500, "b": 50})
    ratio = (served["b"] / weights[1]) / (served["a"] / weights[0])
    assert 0.8 < ratio < 1.25, (served, ratio)


def test_a_lane_that_wakes_up_starts_level_and_earns_no_credit_for_its_idle_spell():
    shares = _shares(["a", "b"])
    for _ in range(100):
        shares.took("a")
        shares.done("a", 100)  # a served 10,000 tokens while b was idle
    shares.took("a")
    shares.took("b")
    assert shares.served["b"] == shares.served["a"] == 10_000  # level: neither is ahead
    assert not shares.ahead("a") and not shares.ahead("b")
    for _ in range(200):  # a's one job runs long; b keeps being served
        shares.done("b", 100)
        shares.took("b")
    assert shares.ahead("b") and shares.room("b") == 0  # more than a share's worth of jobs ahead: it waits
    assert not shares.ahead("a") and shares.room("a") > 0


def test_the_jobs_consumer_is_tuned_only_for_lanes():
    assert LaneTable.from_config([], "", "", "jobs").consumer_options() == {}  # one jobs topic: as it always ran
    assert LaneTable.from_config(["a", "b"], "", "", "jobs").consumer_options() == {"fetch_max_wait_ms": 50}
    assert LaneTable.from_config([], "j.{tenant}", "", "jobs").consumer_options() == {
        "fetch_max_wait_ms": 50, "metadata_max_age_ms": 30_000}
