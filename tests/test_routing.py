"""Task routes without a broker: the documented sticky hash, weighted splits, tenant precedence, and how
the registry resolves a job by adapter, by route, or to the base model."""

import hashlib
import math

import msgspec
import pytest

from lorabus.schemas import AdapterPublish, Job, JobError, RouteDelete, RouteSet, RouteTarget, decode_control
from lorabus.worker.control_log import ControlLog
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load
from lorabus.worker.routing import pick_target, sticky_point

Z_999 = 3.2905  # two-sided 99.9% normal quantile


def _route(*weights, task="ner", tenant=None, sticky="user", event_id="e-1"):
    targets = [RouteTarget(adapter=f"fin@v{i + 1}", weight=w) for i, w in enumerate(weights)]
    return RouteSet(task=task, targets=targets, tenant=tenant, sticky=sticky, event_id=event_id)


def test_sticky_point_is_the_documented_hash():
    # docs/rollouts.md (Routing) and worker/routing.py: first 8 bytes, big-endian, of SHA-256(task + "\0" + key), mod the total.
    digest = hashlib.sha256("ner\0user-42".encode()).digest()
    assert sticky_point("ner", "user-42", 100) == int.from_bytes(digest[:8], "big") % 100


def test_a_canary_gets_its_share_and_users_stay_put():
    users = [f"user-{i}" for i in range(2000)]
    route = _route(95, 5)
    first = [pick_target(route, u, f"job-{i}").adapter for i, u in enumerate(users)]
    share = first.count("fin@v2") / len(users)
    half = Z_999 * math.sqrt(0.05 * 0.95 / len(users))
    assert 0.05 - half <= share <= 0.05 + half, share
    # Same users, other job ids: same versions.
    assert [pick_target(route, u, f"again-{i}").adapter for i, u in enumerate(users)] == first
    # Growing the canary (listed last) only moves users onto it.
    grown = [pick_target(_route(50, 50), u, "j").adapter for u in users]
    assert all(g == "fin@v2" for f, g in zip(first, grown) if f == "fin@v2")
    assert 0.5 - Z_999 * math.sqrt(0.25 / len(users)) <= grown.count("fin@v2") / len(users) <= 0.5 + Z_999 * math.sqrt(0.25 / len(users))


def test_sticky_by_id_or_without_a_user_spreads_one_users_jobs():
    by_id = _route(50, 50, sticky="id")
    assert len({pick_target(by_id, "same-user", f"job-{i}").adapter for i in range(50)}) == 2
    by_user = _route(50, 50)
    assert len({pick_target(by_user, "same-user", f"job-{i}").adapter for i in range(50)}) == 1
    assert len({pick_target(by_user, None, f"job-{i}").adapter for i in range(50)}) == 2  # no user: the id


def test_zero_weight_targets_get_nothing():
    route = _route(0, 7, 0)
    assert {pick_target(route, f"u{i}", "j").adapter for i in range(300)} == {"fin@v2"}


def _registry(*events, ready=()) -> AdapterRegistry:
    """A registry over a control log holding `events` at offsets 0, 1, ...; `ready` versions have loaded."""
    log = ControlLog()
    for offset, event in enumerate(events):
        log.apply(offset, event)
    health = AdapterHealth()
    for key in ready:
        health.set(key, Load.READY)
    return AdapterRegistry(log, health)


def _published(*refs):
    return [AdapterPublish(*ref.split("@"), f"/a/{ref}") for ref in refs]


def test_a_tenants_own_route_wins_over_the_tasks_route():
    registry = _registry(*_published("fin@v1", "fin@v2"), _route(1, task="ner", event_id="all"),
                         _route(0, 1, task="ner", tenant="acme", event_id="acme"), ready=("fin@v1", "fin@v2"))
    assert registry.route_in_force("ner", "acme").tenant == "acme"
    assert registry.route_in_force("ner", "other").tenant is None
    assert registry.route_in_force("sum", "acme") is None
    assert registry.log.routes("ner", "acme")[0].event_id == "acme"
    registry.log.apply(registry.log.end_offset, RouteDelete(task="ner", tenant="acme"))
    assert registry.log.routes("ner", "acme") == []
    assert registry.route_in_force("ner", "acme").tenant is None  # back to the task's route
    assert registry.route_in_force("ner", "acme").event_id == "all"


@pytest.mark.parametrize("body,fragment", [
    (b'{"type": "route.set", "task": "ner", "targets": []}', "length"),
    (b'{"type": "route.set", "task": "ner", "targets": [{"adapter": "fin", "weight": 1}]}', "adapter"),
    (b'{"type": "route.set", "task": "ner", "targets": [{"adapter": "fin@v1", "weight": 0}]}', "sum"),
    (b'{"type": "route.set", "task": "ner", "targets": [{"adapter": "fin@v1", "weight": -1}]}', "weight"),
    (b'{"type": "route.set", "task": "ner", "targets": [{"adapter": "fin@v1", "weight": 1}, '
     b'{"adapter": "fin@v1", "weight": 2}]}', "once"),
    (b'{"type": "route.set", "task": "ner", "targets": [{"adapter": "fin@v1", "weight": 1}], "sticky": "ip"}', "sticky"),
    (b'{"type": "route.delete", "task": "a b"}', "task"),
])
def test_bad_route_events_are_refused(body, fragment):
    with pytest.raises(msgspec.ValidationError, match=fragment):
        decode_control(body)


def _job(**fields):
    return Job(**{"id": "j-1", "tenant": "acme", "prompt": "x", **fields})


def test_registry_resolves_by_adapter_then_route_then_base():
    registry = _registry(*_published("fin@v1", "fin@v2"),
                         AdapterPublish("private", "v1", "/a/p", tenants=["owner"]), _route(0, 1),
                         ready=("fin@v1", "fin@v2", "private@v1"))
    assert registry.resolve_job(_job()) is None  # no adapter, no task: the base model
    explicit = registry.resolve_job(_job(adapter="fin@v1", task="ner"))
    assert explicit.key == "fin@v1" and explicit.route is None  # an explicit adapter wins over the route
    routed = registry.resolve_job(_job(task="ner", user="u"))
    assert routed.key == "fin@v2" and routed.route.event_id == "e-1"
    with pytest.raises(JobError) as err:
        registry.resolve_job(_job(task="summarize"))
    assert err.value.code == "adapter_not_found" and "summarize" in err.value.message
    assert not registry.knows_job(_job(task="summarize"))
    log = registry.log
    log.apply(log.end_offset, RouteSet(task="secret", targets=[RouteTarget(adapter="private@v1", weight=1)]))
    with pytest.raises(JobError) as err:
        registry.resolve_job(_job(task="secret"))
    assert err.value.code == "forbidden" and "v1" not in err.value.message
    assert registry.resolve_job(_job(task="secret", tenant="owner")).key == "private@v1"
    # A route through a version that is not published never serves: its jobs get adapter_not_found.
    log.apply(log.end_offset, RouteSet(task="ghost", targets=[RouteTarget(adapter="fin@v9", weight=1)]))
    with pytest.raises(JobError) as err:
        registry.resolve_job(_job(task="ghost"))
    assert err.value.code == "adapter_not_found"
