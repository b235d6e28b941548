"""The control plane answering back, without a broker: checks before a control event is sent
(`validate_event`), what a worker's status says about it afterwards (`event_outcome`), the fleet view
(`render_status`, `fleet_json`), and the CLI's exit codes with the Kafka reads and writes stubbed."""

import hashlib
import json

import pytest

from lorabus.schemas import (AdapterActivate, AdapterPublish, AdapterRetire, AdapterWarm, RouteDelete, RouteSet,
                             RouteStatus, RouteTarget, VersionStatus, WorkerStatus)
from lorabus.worker import cli, client
from lorabus.worker.cli import broker, control_checks, fleet_view
from lorabus.worker.control_log import ControlLog
from lorabus.worker.cli.control_checks import event_outcome, validate_event
from lorabus.worker.cli.fleet_view import render_status
from cli_fakes import NOW, FakeBroker, fake_status, run_cli

def _log(*events) -> ControlLog:
    log = ControlLog()
    for offset, event in enumerate(events):
        log.apply(offset, event)
    return log


def _route(task, *targets, event_id, tenant=None) -> RouteSet:
    return RouteSet(task=task, tenant=tenant, targets=[RouteTarget(adapter=a, weight=w) for a, w in targets],
                    event_id=event_id)


@pytest.fixture
def adapter_dir(tmp_path):
    root = tmp_path / "fin-v1"
    root.mkdir()
    (root / "adapter_config.json").write_text("{}")
    (root / "adapter_model.safetensors").write_bytes(b"weights")
    return root


FIN = _log(AdapterPublish("fin", "v1", "/a/v1"), AdapterPublish("fin", "v2", "/a/v2"), AdapterActivate("fin", "v2"))


# ---- validate_event --------------------------------------------------------------------------------

def test_activate_and_warm_need_a_published_version_and_name_the_published_ones():
    assert validate_event(AdapterActivate("fin", "v1"), FIN) == []
    (problem,) = validate_event(AdapterActivate("fin", "v9"), FIN)
    assert "fin@v9 is not published" in problem and "v2, v1" in problem
    (problem,) = validate_event(AdapterWarm("other", "v1"), FIN)
    assert problem == "other@v1 is not published (other has no published version)"
    retired = _log(AdapterPublish("fin", "v1", "/a"), AdapterPublish("fin", "v2", "/b"), AdapterRetire("fin", "v1"))
    (problem,) = validate_event(AdapterWarm("fin", "v1"), retired)
    assert "fin@v1 is not published" in problem and "published versions of fin: v2" in problem


def test_retire_of_the_activated_or_only_live_version_needs_force():
    (problem,) = validate_event(AdapterRetire("fin", "v2"), FIN)
    assert "the version the control log activates" in problem and "activate another version first" in problem
    assert validate_event(AdapterRetire("fin", "v2"), FIN, force=True) == []
    assert validate_event(AdapterRetire("fin", "v1"), FIN) == []  # v2 stays
    only = _log(AdapterPublish("solo", "v1", "/a"))
    (problem,) = validate_event(AdapterRetire("solo", "v1"), only)
    assert "only live version of solo" in problem
    assert validate_event(AdapterRetire("solo", "v1"), only, force=True) == []
    (problem,) = validate_event(AdapterRetire("fin", "v7"), FIN, force=True)  # force does not invent versions
    assert "fin@v7 is not published" in problem


def test_route_targets_must_be_published():
    assert validate_event(_route("ner", ("fin@v1", 90), ("fin@v2", 10), event_id="e1"), FIN) == []
    problems = validate_event(_route("ner", ("fin@v1", 90), ("fin@v3", 5), ("new@v1", 5), event_id="e1"), FIN)
    assert problems == ["route target fin@v3 is not published (published versions of fin: v2, v1)",
                        "route target new@v1 is not published (new has no published version)"]


def test_route_delete_needs_a_route_in_force():
    log = _log(AdapterPublish("fin", "v1", "/a"), _route("ner", ("fin@v1", 1), event_id="e1", tenant="acme"))
    assert validate_event(RouteDelete(task="ner", tenant="acme"), log) == []
    (problem,) = validate_event(RouteDelete(task="ner"), log)
    assert problem == "there is no route for task ner (every tenant) to delete; routes of task ner: task ner (tenant acme)"
    log.apply(2, RouteDelete(task="ner", tenant="acme"))
    (problem,) = validate_event(RouteDelete(task="ner", tenant="acme"), log)
    assert problem == "there is no route for task ner (tenant acme) to delete"


def test_publish_checks_the_local_adapter_directory(adapter_dir, tmp_path):
    empty = ControlLog()
    assert validate_event(AdapterPublish("fin", "v1", str(adapter_dir)), empty) == []
    assert validate_event(AdapterPublish("fin", "v1", f"file://{adapter_dir}"), empty) == []  # URIs are resolved
    assert validate_event(AdapterPublish("fin", "v1", f"file://localhost{adapter_dir}"), empty) == []
    (problem,) = validate_event(AdapterPublish("fin", "v1", str(tmp_path / "nope")), empty)
    assert problem == f"adapter path {tmp_path / 'nope'}: no such directory"
    (adapter_dir / "adapter_model.safetensors").unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"pickle")
    (problem,) = validate_event(AdapterPublish("fin", "v1", f"file://{adapter_dir}"), empty)
    assert problem == f"adapter path file://{adapter_dir} has no adapter_model.safetensors"
    for path, text in (("https://host/fin", "only local directories and file:// URIs"),
                       ("file://otherhost/a", "names host 'otherhost'"), ("relative/dir", "is not absolute")):
        (problem,) = validate_event(AdapterPublish("fin", "v1", path), empty)
        assert text in problem, problem


def test_publish_sha256_must_match_the_local_weights(adapter_dir):
    actual = hashlib.sha256(b"weights").hexdigest()
    empty = ControlLog()
    assert validate_event(AdapterPublish("fin", "v1", str(adapter_dir), sha256=actual.upper()), empty) == []
    (problem,) = validate_event(AdapterPublish("fin", "v1", str(adapter_dir), sha256="0" * 64), empty)
    assert problem.startswith("sha256 " + "0" * 64 + " does not match") and actual in problem


def test_check_schema_applies_the_workers_rules_in_one_line():
    event = AdapterActivate("fin", "v1", event_id="e")
    assert control_checks.check_schema(event) == event
    with pytest.raises(ValueError, match=r"^Expected `str` matching regex .* - at `\$.name`$"):
        control_checks.check_schema(AdapterActivate("bad name", "v1"))
    with pytest.raises(ValueError, match=r"at `\$.sha256`"):
        control_checks.check_schema(AdapterPublish("fin", "v1", "/a", sha256="not-hex"))
    with pytest.raises(ValueError, match="at most once"):
        control_checks.check_schema(_unchecked_route())


def _unchecked_route():
    """A route that __post_init__ would refuse, built around it (as a careless caller might)."""
    route = _route("ner", ("fin@v1", 1), event_id="e")
    route.targets = [RouteTarget(adapter="fin@v1", weight=1), RouteTarget(adapter="fin@v1", weight=2)]
    return route


# ---- event_outcome ---------------------------------------------------------------------------------

def test_nothing_is_decided_before_the_worker_has_read_the_event():
    failed = [("fin@v3", "failed", "sha256 mismatch")]
    for event in (AdapterPublish("fin", "v3", "/a"), AdapterRetire("fin", "v1"), RouteDelete(task="ner")):
        assert event_outcome(event, 7, fake_status("w1", 7, versions=failed)) == "pending"
        assert event_outcome(event, 7, fake_status("w1", 3, versions=failed)) == "pending"


def test_publish_outcome_follows_the_load():
    event = AdapterPublish("fin", "v3", "/a")
    assert event_outcome(event, 7, fake_status("w1", 8)) == "ok"  # not loaded there (not needed yet): fine
    assert event_outcome(event, 7, fake_status("w1", 8, versions=[("fin@v3", "loading", None)])) == "pending"
    assert event_outcome(event, 7, fake_status("w1", 8, versions=[("fin@v3", "ready", None)])) == "ok"
    assert event_outcome(event, 7, fake_status("w1", 9, versions=[("fin@v3", "failed", "fin@v3: no adapter_config.json")])) \
        == ("failed", "fin@v3: no adapter_config.json")


def test_activate_is_ok_once_the_version_serves_and_failed_when_it_cannot_load():
    event = AdapterActivate("fin", "v2")
    loading = fake_status("w1", 5, serving={"fin": "v1"}, versions=[("fin@v1", "ready", None), ("fin@v2", "loading", None)])
    assert event_outcome(event, 4, loading) == "pending"
    assert event_outcome(event, 4, fake_status("w1", 5, serving={"fin": "v2"}, versions=[("fin@v2", "loading", None)])) \
        == "pending"  # serving by name, but its jobs still wait for the load
    assert event_outcome(event, 4, fake_status("w1", 5, serving={"fin": "v2"}, versions=[("fin@v2", "ready", None)])) == "ok"
    broken = fake_status("w1", 5, serving={"fin": "v1"}, versions=[("fin@v2", "failed", "rank 64 above --max-lora-rank 16")])
    assert event_outcome(event, 4, broken) == ("failed", "rank 64 above --max-lora-rank 16")


def test_warm_outcome():
    event = AdapterWarm("fin", "v3")
    assert event_outcome(event, 0, fake_status("w1", 1)) == "pending"
    assert event_outcome(event, 0, fake_status("w1", 1, versions=[("fin@v3", "ready", None)])) == "ok"
    assert event_outcome(event, 0, fake_status("w1", 1, versions=[("fin@v3", "failed", None)])) == ("failed", "failed to load")


def test_route_outcome_follows_the_route_in_force():
    event = _route("ner", ("fin@v1", 95), ("fin@v3", 5), event_id="e-17", tenant="acme")
    old = RouteStatus("ner", "acme", "e-12", [RouteTarget(adapter="fin@v1", weight=1)], pending_event_id="e-17")
    other_tenant = RouteStatus("ner", None, "e-17", [RouteTarget(adapter="fin@v1", weight=1)])
    assert event_outcome(event, 3, fake_status("w1", 4, routes=[old, other_tenant])) == "pending"
    new = RouteStatus("ner", "acme", "e-17", [RouteTarget(adapter="fin@v1", weight=95),
                                              RouteTarget(adapter="fin@v3", weight=5)])
    assert event_outcome(event, 3, fake_status("w1", 4, routes=[new])) == "ok"
    failed = fake_status("w1", 4, routes=[old], versions=[("fin@v1", "ready", None), ("fin@v3", "failed", "bad shapes")])
    assert event_outcome(event, 3, failed) == ("failed", "fin@v3: bad shapes")


def test_retire_and_route_delete_are_ok_once_read():
    assert event_outcome(AdapterRetire("fin", "v1"), 2, fake_status("w1", 3)) == "ok"
    assert event_outcome(RouteDelete(task="ner"), 2, fake_status("w1", 3)) == "ok"


# ---- render_status / fleet_json --------------------------------------------------------------------

def _fleet():
    log = _log(AdapterPublish("fin", "v1", "/a/v1"), AdapterPublish("fin", "v2", "/a/v2"),
               AdapterPublish("fin", "v3", "/a/v3"), AdapterActivate("fin", "v3", event_id="act-3"),
               _route("ner", ("fin@v1", 90), ("fin@v2", 10), event_id="e-12"),
               _route("ner", ("fin@v1", 50), ("fin@v2", 50), event_id="e-17"))
    in_force = RouteStatus("ner", None, "e-17", [RouteTarget(adapter="fin@v1", weight=50),
                                                 RouteTarget(adapter="fin@v2", weight=50)])
    behind = RouteStatus("ner", None, "e-12", [RouteTarget(adapter="fin@v1", weight=90),
                                               RouteTarget(adapter="fin@v2", weight=10)])
    statuses = {
        "w1": fake_status("w1", 6, serving={"fin": "v3"}, activated={"fin": "v3"}, resident=["fin@v3", "fin@v1"],
                      versions=[("fin@v1", "ready", None), ("fin@v2", "ready", None), ("fin@v3", "ready", None)],
                      routes=[in_force], jobs_inflight=3),
        "w2": fake_status("w2", 6, serving={"fin": "v2"}, activated={"fin": "v3"}, resident=["fin@v2"],
                      versions=[("fin@v2", "ready", None), ("fin@v3", "failed", "fin@v3: sha256 mismatch"),
                                ("fin@v1", "loading", None)],
                      routes=[RouteStatus("ner", None, "e-12", behind.targets, pending_event_id="e-17")]),
        "w3": fake_status("w3", 4, ts_ms=NOW - 45_000, serving={"fin": "v3"}, routes=[behind]),
    }
    return log, statuses


def test_render_status_shows_workers_versions_failures_and_routes():
    log, statuses = _fleet()
    text = render_status(log, statuses, NOW)
    lines = text.splitlines()
    assert lines[0] == "control log: end offset 6; 1 adapter name, 1 route"
    assert "workers: 3 reporting, 2 live" in lines
    w1 = next(line for line in lines if line.startswith("  w1 "))
    assert "live" in w1 and "0 (up to date)" in w1 and "fin@v3 fin@v1" in w1
    w3 = next(line for line in lines if line.startswith("  w3 "))
    assert "silent for 45 s" in w3 and " 2 " in w3  # two records behind the end of the log
    assert "  fin: activated v3; live versions v3 v1 v2" in lines
    assert any(line.split()[:5] == ["w2", "serves", "v2", "(not", "v3)"] and "loading v1" in line for line in lines), text
    assert "    FAILED fin@v3 on w2: fin@v3: sha256 mismatch" in lines
    assert "  task ner (every tenant): newest e-17 @5: fin@v1=50 fin@v2=50 (sticky user)" in lines
    route_rows = {line.split()[0]: line for line in lines[lines.index(
        "  task ner (every tenant): newest e-17 @5: fin@v1=50 fin@v2=50 (sticky user)") + 1:][:3]}
    assert route_rows["w1"].endswith("in force")
    assert route_rows["w2"].endswith("pending (loading or failed); e-12 still serving")
    assert route_rows["w3"].endswith("not read yet; serving e-12")
    events = lines[lines.index("latest control events (applied = read by the worker's last status):") + 1:]
    assert events[0].split()[:2] == ["@5", "route.set"] and events[0].endswith("applied by w1, w2; not yet w3")
    assert any(line.split()[0] == "@3" and "act-3" in line and line.endswith("applied by w1, w2, w3") for line in events)


def test_render_status_columns_are_aligned():
    log, statuses = _fleet()
    lines = render_status(log, statuses, NOW).splitlines()
    header = next(line for line in lines if line.startswith("  WORKER"))
    rows = [line for line in lines if line.startswith(("  w1 ", "  w2 ", "  w3 "))][:3]
    for column in ("STATE", "APPLIED", "BEHIND"):
        at = header.index(column)
        assert all(row[at - 1] == " " and row[at] != " " for row in rows), (column, rows)


def test_render_status_of_an_empty_fleet():
    text = render_status(ControlLog(), {}, NOW)
    assert "(no worker has published a status)" in text and "adapters: none published" in text
    assert "routes: none" in text


def test_fleet_json_has_the_log_state_and_each_status():
    log, statuses = _fleet()
    view = json.loads(json.dumps(fleet_view.fleet_json(log, statuses, NOW)))
    assert view["control_log"]["end_offset"] == 6
    assert view["control_log"]["adapters"]["fin"] == {"activated": "v3", "live_versions": ["v3", "v1", "v2"]}
    assert [r["event_id"] for r in view["control_log"]["routes"][0]["routes"]] == ["e-17", "e-12"]
    assert [(w, s["live"], s["behind"]) for w, s in view["workers"].items()] == [("w1", True, 0), ("w2", True, 0),
                                                                                 ("w3", False, 2)]
    assert view["workers"]["w2"]["versions"][1] == {"adapter": "fin@v3", "state": "failed",
                                                    "reason": "fin@v3: sha256 mismatch", "source": None}


def test_a_worker_is_silent_after_three_of_its_intervals():
    assert fleet_view.is_live(fake_status("w", 0, ts_ms=NOW - 6000), NOW)
    assert not fleet_view.is_live(fake_status("w", 0, ts_ms=NOW - 6001), NOW)
    assert fleet_view.is_live(fake_status("w", 0, ts_ms=NOW - 25_000, interval_ms=10_000), NOW)


# ---- the CLI, with the broker stubbed --------------------------------------------------------------

def test_cli_refuses_before_sending_and_force_skips_only_state_checks(monkeypatch, capsys):
    broker = FakeBroker(monkeypatch, _log(AdapterPublish("fin", "v1", "/a")))
    assert run_cli("activate", "fin", "v2") == 2
    err = capsys.readouterr().err
    assert err == ("lorabus activate: fin@v2 is not published (published versions of fin: v1)\n"
                   "lorabus activate: nothing sent (--force sends it anyway)\n")
    assert run_cli("rollout", "retire", "fin", "v1") == 2
    assert "only live version of fin" in capsys.readouterr().err
    assert run_cli("rollout", "activate", "bad name", "v1", "--force") == 2
    assert capsys.readouterr().err.startswith("lorabus rollout activate: invalid event: Expected `str` matching regex")
    assert broker.sent == []
    assert run_cli("rollout", "activate", "fin", "v2", "--force") == 0
    out = capsys.readouterr().out
    (event,) = broker.sent
    assert (event.name, event.version) == ("fin", "v2") and out == f"sent adapter.activate {event.event_id}\n"


def test_cli_publish_sends_an_absolute_path_and_keeps_uris(monkeypatch, capsys, adapter_dir):
    broker = FakeBroker(monkeypatch, ControlLog())
    monkeypatch.chdir(adapter_dir.parent)
    assert run_cli("rollout", "publish", "fin", "v1", adapter_dir.name, "--tenants", "a,b") == 0
    assert run_cli("publish", "fin", "v2", f"file://{adapter_dir}") == 0
    assert [(e.path, e.tenants) for e in broker.sent] == [(str(adapter_dir), ["a", "b"]), (f"file://{adapter_dir}", None)]
    assert run_cli("publish", "fin", "v3", str(adapter_dir.parent / "missing")) == 2
    assert "no such directory" in capsys.readouterr().err and len(broker.sent) == 2


@pytest.mark.parametrize("states, rc, lines", [
    ({"w1": ("ready", None), "w2": ("ready", None)}, 0, ["w1: ok", "w2: ok"]),
    ({"w1": ("ready", None), "w2": ("failed", "fin@v2: bad shapes")}, 1, ["w1: ok", "w2: failed: fin@v2: bad shapes"]),
    ({"w1": ("ready", None), "w2": ("loading", None)}, 3, ["w1: ok", "w2: pending"]),
    ({}, 4, []),
])
def test_cli_wait_exit_codes(monkeypatch, capsys, states, rc, lines):
    def statuses(offset):
        serving = {w: ("v2" if state == "ready" else "v1") for w, (state, _) in states.items()}
        fleet_now = {w: fake_status(w, offset + 1, serving={"fin": serving[w]}, versions=[("fin@v2", state, reason)])
                     for w, (state, reason) in states.items()}
        fleet_now["gone"] = fake_status("gone", 0, ts_ms=NOW - 600_000)  # silent: not waited for
        return fleet_now

    broker = FakeBroker(monkeypatch, _log(AdapterPublish("fin", "v1", "/a"), AdapterPublish("fin", "v2", "/b")),
                        statuses)
    assert run_cli("rollout", "activate", "fin", "v2", "--wait", "--timeout", "0.2") == rc
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"sent adapter.activate {broker.sent[0].event_id}", *lines]
    if rc == 3:
        assert "still pending on w2" in err
    if rc == 4:
        assert "no live worker reported on lorabus.status within 0.2 s" in err


def test_cli_flags_and_defaults():
    args = cli.build_parser().parse_args(["status", "--json"])
    assert (args.json, args.status_topic, args.control_topic) == (True, "lorabus.status", "lorabus.control")
    args = cli.build_parser().parse_args(["rollout", "publish", "fin", "v1", "/a", "--wait", "--force"])
    assert (args.wait, args.force, args.timeout, args.status_topic) == (True, True, 60.0, "lorabus.status")
    args = cli.build_parser().parse_args(["publish", "fin", "v1", "/a", "--status-topic", "st"])
    assert (args.wait, args.force, args.status_topic) == (False, False, "st")


def test_cli_status_renders_and_prints_json(monkeypatch, capsys):
    log, statuses = _fleet()

    async def read_control_log(bootstrap, topic, timeout_s=30.0, security=None, signed=None):
        return log

    async def read_statuses(bootstrap, topic, timeout_s=30.0, security=None, max_bytes=None):
        return statuses

    async def status_topic_warnings(bootstrap, topic, security=None):
        return []

    monkeypatch.setattr(client, "read_control_log", read_control_log)
    monkeypatch.setattr(client, "read_statuses", read_statuses)
    monkeypatch.setattr(client, "status_topic_warnings", status_topic_warnings)
    monkeypatch.setattr(broker, "_now_ms", lambda: NOW)
    assert cli.main(["status", "--status-topic", "st"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("control topic lorabus.control, status topic st\n")
    assert "FAILED fin@v3 on w2: fin@v3: sha256 mismatch" in out
    assert cli.main(["status", "--json"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["status_topic"] == "lorabus.status" and sorted(view["workers"]) == ["w1", "w2", "w3"]
