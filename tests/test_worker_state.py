"""The worker's pure state, without a broker: which offset may be committed, and what the control topic
has published, activated and retired (read through the registry, with every version loaded)."""

import random

import pytest

from lorabus.schemas import AdapterActivate, AdapterPublish, AdapterRetire, Job, JobError
from lorabus.worker.control_log import ControlLog
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load


def test_commits_up_to_the_lowest_offset_in_flight():
    offsets = PartitionOffsets()
    assert offsets.committable() is None  # nothing taken yet
    for offset in (10, 11, 12):
        offsets.begin(offset)
    assert offsets.committable() == 10
    offsets.done(11)
    assert offsets.committable() == 10  # 10 is still unanswered
    offsets.done(10)
    assert offsets.committable() == 12
    offsets.committed = 12
    assert offsets.committable() is None  # nothing new since the last commit
    offsets.done(12)
    assert offsets.committable() == 13


def test_random_completion_orders_never_commit_past_an_unanswered_record():
    rng = random.Random(7)
    for _ in range(200):
        offsets, taken = PartitionOffsets(), list(range(rng.randrange(1, 30)))
        for offset in taken:
            offsets.begin(offset)
        order = taken[:]
        rng.shuffle(order)
        answered = set()
        for offset in order:
            offsets.done(offset)
            answered.add(offset)
            commit = offsets.committable()
            assert commit is not None and all(o in answered for o in range(commit))
            assert commit == min(set(taken) - answered, default=len(taken))


def _publish(name, version, tenants=None):
    return AdapterPublish(name, version, f"/adapters/{name}-{version}", tenants=tenants)


class _Control:
    """A control log fed one event at a time, and a registry over it where every published version has
    loaded (safe activation has its own tests in tests/test_control_log.py)."""

    def __init__(self):
        self.log, self.health = ControlLog(), AdapterHealth()
        self.registry = AdapterRegistry(self.log, self.health)

    def __call__(self, event) -> AdapterRegistry:
        if isinstance(event, AdapterPublish):
            self.health.set(f"{event.name}@{event.version}", Load.READY)
        self.log.apply(self.log.end_offset, event)
        return self.registry


def _knows(registry: AdapterRegistry, adapter: str) -> bool:
    return registry.knows_job(Job(id="j", tenant="acme", prompt="x", adapter=adapter))


def test_first_version_becomes_active_and_activate_moves_it():
    control = _Control()
    registry = control(_publish("fin", "v1"))
    assert registry.serving("fin") == "v1"
    control(_publish("fin", "v2"))  # a later version waits for activate
    assert registry.serving("fin") == "v1" and control.log.candidates("fin") == ["v1", "v2"]
    assert registry.resolve("fin", "acme").key == "fin@v1"
    assert registry.resolve("fin@v2", "acme").key == "fin@v2"
    control(AdapterActivate("fin", "v2"))
    assert registry.resolve("fin", "acme").key == "fin@v2" and control.log.activated("fin") == "v2"
    control(AdapterActivate("fin", "v9"))  # never published: stored, but nothing changes ...
    assert registry.resolve("fin", "acme").key == "fin@v2" and control.log.activated("fin") == "v2"
    assert _knows(registry, "fin") and _knows(registry, "fin@v1") and not _knows(registry, "fin@v9")
    assert not _knows(registry, "other")
    control(_publish("fin", "v9"))  # ... until that version is published (and has loaded)
    assert registry.resolve("fin", "acme").key == "fin@v9" and _knows(registry, "fin@v9")


def test_unknown_and_forbidden_adapters_are_job_errors_that_hide_the_active_version():
    registry = _Control()(_publish("private", "v7-secret", tenants=["owner"]))
    with pytest.raises(JobError) as err:
        registry.resolve("nope", "acme")
    assert err.value.code == "adapter_not_found"
    with pytest.raises(JobError) as err:
        registry.resolve("private", "acme")
    assert err.value.code == "forbidden" and "v7-secret" not in err.value.message
    assert registry.resolve("private", "owner").version == "v7-secret"


def test_retiring_the_active_version_falls_back_to_the_next_one():
    # The worker applies every retire (refusing the active version is the CLI's job): the name falls
    # back to its next candidate, and a retired version is not found.
    control = _Control()
    control(_publish("fin", "v1"))
    registry = control(_publish("fin", "v2"))
    control(AdapterRetire("fin", "v1"))  # v1 is active: retired all the same, v2 serves
    assert not _knows(registry, "fin@v1") and registry.resolve("fin", "acme").key == "fin@v2"
    with pytest.raises(JobError) as err:
        registry.resolve("fin@v1", "acme")
    assert err.value.code == "adapter_not_found"
    control(_publish("fin", "v3"))
    control(AdapterActivate("fin", "v3"))
    control(AdapterRetire("fin", "v3"))  # the activated version: back to v2
    assert registry.resolve("fin", "acme").key == "fin@v2" and control.log.candidates("fin") == ["v2"]
    control(AdapterRetire("fin", "v7"))  # never published: nothing changes
    assert control.log.candidates("fin") == ["v2"]
    control(AdapterRetire("fin", "v2"))  # the last one: the name is gone
    assert not _knows(registry, "fin") and registry.serving("fin") is None
    with pytest.raises(JobError) as err:
        registry.resolve("fin", "acme")
    assert err.value.code == "adapter_not_found"
