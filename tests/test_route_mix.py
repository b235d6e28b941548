"""A route target that is a weighted mix, without a broker: the wire shape (old plain targets decode and
keep their control keys; exactly one of adapter/mix; members pinned to versions), the control-key digest,
the registry (a mix target counts as loaded once every member has; its jobs resolve as that mix, tenant
checked per member), the CLI's `mix:` target syntax and the fleet view."""

import hashlib
import json

import msgspec
import pytest

from lorabus.scheduler.adapter_manager import mix_key
from lorabus.schemas import (DECODE_ERRORS, AdapterPublish, AdapterRetire, Job, JobError, MixMember, RouteSet,
                             RouteTarget, RouteStatus, decode_control, encode)
from lorabus.worker.control_log import ControlLog, control_key
from lorabus.worker.cli.control_checks import event_outcome, validate_event
from lorabus.worker.cli.fleet_view import render_status
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load
from lorabus.worker.wire import provenance
from cli_fakes import NOW, FakeBroker, fake_status, run_cli

READY, FAILED, LOADING = Load.READY, Load.FAILED, Load.LOADING


def mix(*members, weight=1) -> RouteTarget:
    return RouteTarget(mix=[MixMember(ref, w) for ref, w in members], weight=weight)


def plain(ref, weight=1) -> RouteTarget:
    return RouteTarget(adapter=ref, weight=weight)


def route(*targets, eid, task="ner", tenant=None) -> RouteSet:
    return RouteSet(task=task, tenant=tenant, targets=list(targets), event_id=eid)


def fold(*events) -> ControlLog:
    log = ControlLog()
    for offset, event in enumerate(events):
        log.apply(offset, event)
    return log


PUBLISHED = (AdapterPublish("fin", "v1", "/a/fin1"), AdapterPublish("fin", "v2", "/a/fin2"),
             AdapterPublish("sum", "v1", "/a/sum1", tenants=["acme"]))
MIXED = mix(("fin@v2", 0.7), ("sum@v1", -0.3), weight=10)


# ---- the wire shape ----------------------------------------------------------------------------------

def test_a_plain_target_keeps_its_old_json_and_its_old_control_key():
    old = (b'{"type":"route.set","task":"ner","targets":[{"adapter":"fin@v1","weight":95},'
           b'{"adapter":"fin@v2","weight":5}],"event_id":"e-1"}')
    event = decode_control(old)
    assert [(t.adapter, t.mix, t.weight) for t in event.targets] == [("fin@v1", None, 95), ("fin@v2", None, 5)]
    assert encode(plain("fin@v1", 95)) == b'{"adapter":"fin@v1","weight":95}'
    # The digest of a route set before mixes existed: records already on a compacted log keep their key.
    body = b'["user",[{"adapter":"fin@v1","weight":95},{"adapter":"fin@v2","weight":5}]]'
    assert control_key(event) == f"route:ner:*:{hashlib.sha256(body).hexdigest()[:16]}"


def test_a_mix_target_round_trips():
    event = route(plain("fin@v1", 90), MIXED, eid="e-1")
    back = decode_control(encode(event))
    assert back == event and back.targets[1].versions() == ["fin@v2", "sum@v1"]
    assert json.loads(encode(MIXED)) == {"weight": 10, "mix": [{"adapter": "fin@v2", "weight": 0.7},
                                                               {"adapter": "sum@v1", "weight": -0.3}]}


@pytest.mark.parametrize("target, fragment", [
    ({"weight": 1}, "exactly one of `adapter` and `mix`"),
    ({"adapter": "fin@v1", "mix": [{"adapter": "fin@v2", "weight": 1}], "weight": 1}, "exactly one of"),
    ({"mix": [{"adapter": "fin", "weight": 1}], "weight": 1}, "exact version ('name@version'), not 'fin'"),
    ({"mix": [], "weight": 1}, "length >= 1"),
    ({"mix": [{"adapter": "fin@v1", "weight": 0}], "weight": 1}, "must not be 0"),
    ({"mix": [{"adapter": f"a{i}@v1", "weight": 1} for i in range(9)], "weight": 1}, "length <= 8"),
])
def test_bad_route_targets_are_refused(target, fragment):
    body = json.dumps({"type": "route.set", "task": "ner", "targets": [target]}).encode()
    with pytest.raises(DECODE_ERRORS) as err:
        decode_control(body)
    assert fragment in str(err.value)


def test_a_route_names_each_mix_once_in_any_member_order():
    with pytest.raises(ValueError, match="each mix"):
        route(mix(("fin@v1", 0.5), ("sum@v1", 1.0)), mix(("sum@v1", 1.0), ("fin@v1", 0.5)), eid="e")
    # Another weight is another mix; a member may also be a plain target of the same route.
    route(mix(("fin@v1", 0.5), ("sum@v1", 1.0)), mix(("fin@v1", 0.25), ("sum@v1", 1.0)), plain("fin@v1"), eid="e")


def test_the_control_key_digest_covers_the_mix():
    keys = {control_key(route(t, eid="e")) for t in (
        mix(("fin@v2", 0.7), ("sum@v1", -0.3)), mix(("fin@v2", 0.7), ("sum@v1", 0.3)),
        mix(("fin@v1", 0.7), ("sum@v1", -0.3)), mix(("fin@v2", 0.7)), plain("fin@v2"))}
    assert len(keys) == 5
    # The same route set again (another event id) is the same key: it moves, it does not pile up.
    assert control_key(route(MIXED, eid="a")) == control_key(route(MIXED, eid="b"))


# ---- the registry --------------------------------------------------------------------------------------

def registry(*extra, states=None) -> AdapterRegistry:
    health = AdapterHealth()
    for key, state in (states or {}).items():
        health.set(key, state, f"{key}: boom" if state is FAILED else None)
    return AdapterRegistry(fold(*PUBLISHED, route(plain("fin@v1"), eid="old"), *extra), health)


@pytest.mark.parametrize("sum_state, in_force, to_load", [
    (READY, "new", []),
    (None, "old", ["sum@v1"]),  # one member not loaded yet: the previous route keeps serving
    (LOADING, "old", []),
    (FAILED, "old", []),  # a member that failed to load: the mix target never serves
])
def test_a_mix_target_is_loaded_only_when_every_member_has(sum_state, in_force, to_load):
    states = {"fin@v1": READY, "fin@v2": READY} | ({"sum@v1": sum_state} if sum_state else {})
    reg = registry(route(plain("fin@v1", 0), MIXED, eid="new"), states=states)
    assert reg.route_in_force("ner", "acme").event_id == in_force
    assert reg.to_load() == to_load


def test_a_job_routed_to_a_mix_target_resolves_as_that_mix():
    reg = registry(route(MIXED, eid="new"), states={"fin@v1": READY, "fin@v2": READY, "sum@v1": READY})
    job = Job(id="j-1", tenant="acme", task="ner", user="u-1", prompt="x")
    resolved = reg.resolve_job(job)
    assert resolved.key == mix_key([("fin@v2", 0.7), ("sum@v1", -0.3)])
    assert [(m.key, w) for m, w in resolved.mix] == [("fin@v2", 0.7), ("sum@v1", -0.3)]
    assert resolved.route.event_id == "new"
    fields = provenance(resolved)
    assert (fields["task"], fields["route_event_id"]) == ("ner", "new")
    assert [(m.adapter, m.version, m.weight) for m in fields["mix"]] == [("fin", "v2", 0.7), ("sum", "v1", -0.3)]
    # Tenant limits hold for every member: sum@v1 is acme's only; the message names the task, not the member.
    with pytest.raises(JobError) as err:
        reg.resolve_job(Job(id="j-2", tenant="other", task="ner", prompt="x"))
    assert err.value.code == "forbidden" and "ner" in err.value.message and "sum" not in err.value.message


def test_a_mix_target_through_a_retired_member_never_takes_effect():
    reg = registry(route(MIXED, eid="new"), states={"fin@v1": READY, "fin@v2": READY, "sum@v1": READY})
    assert reg.route_in_force("ner", None).event_id == "new"
    reg.log.apply(reg.log.end_offset, AdapterRetire("sum", "v1"))
    assert reg.route_in_force("ner", None).event_id == "old"
    assert reg.resolve_job(Job(id="j", tenant="acme", task="ner", prompt="x")).key == "fin@v1"


# ---- the CLI and the fleet view ------------------------------------------------------------------------

def test_cli_sends_a_mix_target_and_checks_every_member(monkeypatch, capsys):
    broker = FakeBroker(monkeypatch, fold(*PUBLISHED))
    assert run_cli("rollout", "route", "ner", "fin@v1=90", "mix:fin@v2*0.7+sum@v1*-0.3=10") == 0
    (event,) = broker.sent
    assert event.targets == [plain("fin@v1", 90), MIXED]
    capsys.readouterr()
    assert run_cli("rollout", "route", "ner", "mix:fin@v2*0.7+sum@v9*1=10") == 2
    assert "member of route target mix:fin@v2*0.7+sum@v9*1.0: sum@v9 is not published" in capsys.readouterr().err
    assert run_cli("rollout", "route", "ner", "mix:fin*0.7=10") == 2  # a route pins versions
    assert "exact version" in capsys.readouterr().err
    assert run_cli("rollout", "route", "ner", "mix:fin@v2=10") == 2
    assert "no *weight" in capsys.readouterr().err
    assert len(broker.sent) == 1


def test_fleet_view_and_outcome_name_a_mix_target_and_its_members():
    event = route(plain("fin@v1", 90), MIXED, eid="e-2")
    log = fold(*PUBLISHED, event)
    assert validate_event(event, log) == []
    in_force = fake_status("w1", 4, routes=[RouteStatus("ner", None, "e-2", event.targets)])
    text = render_status(log, {"w1": in_force}, NOW)
    assert "  task ner (every tenant): newest e-2 @3: fin@v1=90 mix:fin@v2*0.7+sum@v1*-0.3=10 (sticky user)" \
        in text.splitlines()
    assert event_outcome(event, 3, in_force) == "ok"
    failing = fake_status("w1", 4, versions=[("sum@v1", "failed", "bad sha256")])
    assert event_outcome(event, 3, failing) == ("failed", "sum@v1: bad sha256")
    assert msgspec.json.decode(encode(in_force)).get("routes")[0]["targets"][1]["mix"][1]["weight"] == -0.3
