"""The worker's pure state, without a broker: which offset may be committed, and what the control topic
has published and activated."""

import random

import pytest

from lorabus.schemas import AdapterPublish, JobError
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.registry import AdapterRegistry


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


def test_first_version_becomes_active_and_activate_moves_it():
    registry = AdapterRegistry()
    assert registry.publish(_publish("fin", "v1")) is True
    assert registry.publish(_publish("fin", "v2")) is False  # a later version waits for activate
    assert registry.resolve("fin", "acme").key == "fin@v1"
    assert registry.resolve("fin@v2", "acme").key == "fin@v2"
    assert registry.activate("fin", "v2") is True
    assert registry.resolve("fin", "acme").key == "fin@v2"
    assert registry.activate("fin", "v9") is False  # never published: nothing changes
    assert registry.resolve("fin", "acme").key == "fin@v2"
    assert registry.knows("fin") and registry.knows("fin@v1") and not registry.knows("fin@v9")
    assert not registry.knows("other")


def test_unknown_and_forbidden_adapters_are_job_errors_that_hide_the_active_version():
    registry = AdapterRegistry()
    registry.publish(_publish("private", "v7-secret", tenants=["owner"]))
    with pytest.raises(JobError) as err:
        registry.resolve("nope", "acme")
    assert err.value.code == "adapter_not_found"
    with pytest.raises(JobError) as err:
        registry.resolve("private", "acme")
    assert err.value.code == "forbidden" and "v7-secret" not in err.value.message
    assert registry.resolve("private", "owner").version == "v7-secret"


def test_retire_forgets_a_version_but_never_the_active_one():
    registry = AdapterRegistry()
    registry.publish(_publish("fin", "v1"))
    registry.publish(_publish("fin", "v2"))
    assert "active version" in registry.retire("fin", "v1")  # v1 is active: refused, nothing changes
    assert registry.knows("fin@v1")
    assert registry.activate("fin", "v2")
    assert registry.retire("fin", "v1") is None
    assert not registry.knows("fin@v1") and registry.resolve("fin", "acme").key == "fin@v2"
    with pytest.raises(JobError) as err:
        registry.resolve("fin@v1", "acme")
    assert err.value.code == "adapter_not_found"
    assert "not published" in registry.retire("fin", "v1")
