"""Identity bound by the broker (issue 22, items 3 and 4): a broker of this module's own with ACLs on
(tests/acl_broker.py: deploy/local-kafka --authorizer, SCRAM users a, b, worker, operator, prefixed ACLs). The
broker, not a header, decides who may write a lane: tenant a's producer writes lorabus.jobs.a but is refused
lorabus.jobs.b, lorabus.jobs.ab (another tenant's lane that shares a's prefix) and the control topic; only the
operator writes the control topic; the worker reads every lane, and a worker holding only the worker's ACLs
serves a tenant's lane end to end (at least once and exactly once)."""

import json
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError

from acl_broker import CONTROL, DLQ, OPERATOR, STATUS, WORKER, acl_broker, lorabus_topics
from helpers import running_worker, worker_config
from lorabus.worker.client import run_jobs

pytestmark = pytest.mark.kafka  # starts a broker of its own


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    topics = {**lorabus_topics(), "lorabus.jobs.ab": 1}  # no ACL names it: a's prefix must not reach it
    with acl_broker(tmp_path_factory.mktemp("kafka-acl"), topics=topics) as b:
        yield b


async def producer_for(broker, user: str) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(bootstrap_servers=broker.sasl, acks="all", request_timeout_ms=10000,
                                **broker.options(user))
    await producer.start()
    return producer


async def test_a_tenant_writes_its_own_lane_only(broker):
    producer = await producer_for(broker, "a")
    try:
        sent = await producer.send_and_wait("lorabus.jobs.a", b'{"id": "a-own"}', key=b"a-own")
        assert sent.topic == "lorabus.jobs.a" and sent.offset >= 0
        for topic in ("lorabus.jobs.b", "lorabus.jobs.ab", CONTROL):
            started = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait(topic, b'{"id": "a-in-b", "tenant": "b"}')
            assert time.monotonic() - started < 10, topic  # the broker says no at once: no timeout
    finally:
        await producer.stop()


async def test_only_the_operator_writes_the_control_topic(broker):
    operator = await producer_for(broker, OPERATOR)
    try:
        sent = await operator.send_and_wait(CONTROL, b"{}", key=b"acl-test")
        assert sent.offset >= 0
    finally:
        await operator.stop()
    # The worker reads the control topic and may describe it, but the broker refuses its writes.
    worker = await producer_for(broker, WORKER)
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await worker.send_and_wait(CONTROL, b"{}", key=b"acl-test")
    finally:
        await worker.stop()


async def test_the_worker_reads_every_lane(broker):
    sent = {}
    for tenant in ("a", "b"):
        producer = await producer_for(broker, tenant)
        try:
            for i in range(3):
                key = f"{tenant}-{i}".encode()
                await producer.send_and_wait(f"lorabus.jobs.{tenant}", b"job " + key, key=key)
                sent[key] = f"lorabus.jobs.{tenant}"
        finally:
            await producer.stop()

    consumer = AIOKafkaConsumer("lorabus.jobs.a", "lorabus.jobs.b", bootstrap_servers=broker.sasl,
                                group_id="lorabus-acl-test", auto_offset_reset="earliest", enable_auto_commit=False,
                                **broker.options(WORKER))
    await consumer.start()
    got = {}
    try:
        deadline = time.monotonic() + 30
        while not sent.keys() <= got.keys() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                got.update((r.key, r.topic) for r in records)
        await consumer.commit()  # the group's offsets: Read on the lorabus* group prefix
    finally:
        await consumer.stop()
    assert {k: got.get(k) for k in sent} == sent


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
async def test_a_worker_with_the_worker_acls_serves_a_lane(broker, tiny_model, exactly_once):
    """The worker's ACLs are enough for a real worker: topic checks, the control topic's configs, its group,
    results, status, and (exactly once) its transactional id; tenant a writes its lane, reads its results."""
    mode = "eos" if exactly_once else "alo"
    config = worker_config(broker.sasl, tiny_model, security=broker.security(WORKER), exactly_once=exactly_once,
                           group_id=f"lorabus-acl-{mode}", worker_id=f"w-acl-{mode}", jobs_topic="lorabus.jobs.a",
                           results_topic="lorabus.results.a", control_topic=CONTROL, dlq_topic=DLQ,
                           status_topic=STATUS)
    jobs = [(f"{mode}-{i}", json.dumps({"id": f"{mode}-{i}", "tenant": "a", "prompt_ids": [5, 6 + i],
                                        "max_new_tokens": 2}).encode()) for i in range(2)]
    async with running_worker(config):
        results = await run_jobs(broker.sasl, "lorabus.jobs.a", "lorabus.results.a", jobs, 120,
                                 isolation_level="read_committed" if exactly_once else "read_uncommitted",
                                 security=broker.security("a"))
    assert sorted(results) == [f"{mode}-0", f"{mode}-1"]
    assert all(r.status == "ok" and len(r.token_ids) == 2 for (r,) in results.values())
