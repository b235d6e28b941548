"""Producer-side helpers: send jobs and control events, and collect the results that answer them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from lorabus.schemas import ControlEvent, JobResult, RouteDelete, RouteSet, decode_result, encode


def control_key(event: ControlEvent) -> bytes:
    """The record key of a control event: the adapter name, or the route's task and tenant."""
    if isinstance(event, (RouteSet, RouteDelete)):
        return f"route:{event.task}:{event.tenant or '*'}".encode()
    return event.name.encode()


async def publish_control(bootstrap: str, topic: str, events: list[ControlEvent],
                          signer: Callable[[bytes], tuple[str, bytes]] | None = None) -> None:
    """Send control events; `signer` (e.g. `ControlKeys.sign`) turns a record value into its signature header."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for event in events:
            value = encode(event)
            headers = [signer(value)] if signer is not None else None
            await producer.send_and_wait(topic, value, key=control_key(event), headers=headers)
    finally:
        await producer.stop()


async def topic_partitions(bootstrap: str, topic: str, wait_s: float = 10.0) -> list[TopicPartition]:
    """The partitions of a topic, waiting a little for a just-created topic to appear."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.monotonic() + wait_s
        while True:
            (described,) = await admin.describe_topics([topic])
            if described["error_code"] == 0 and described["partitions"]:
                return [TopicPartition(topic, p["partition"]) for p in sorted(described["partitions"], key=lambda p: p["partition"])]
            if time.monotonic() > deadline:
                raise LookupError(f"topic {topic} does not exist")
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def _end_positions(consumer: AIOKafkaConsumer, bootstrap: str, topic: str) -> list[TopicPartition]:
    parts = await topic_partitions(bootstrap, topic)
    consumer.assign(parts)
    await consumer.seek_to_end(*parts)
    for tp in parts:  # resolve the lazy seek now, so only results produced after this are read
        await consumer.position(tp)
    return parts


async def run_jobs(
    bootstrap: str,
    jobs_topic: str,
    results_topic: str,
    jobs: list[tuple[str, bytes]],
    timeout_s: float = 120.0,
    on_result=None,
    headers: list[list[tuple[str, bytes]]] | None = None,
    isolation_level: str = "read_uncommitted",
) -> dict[str, list[JobResult]]:
    """Send (job id, raw record value) pairs and wait until every id has a result; returns id → results.
    Use `isolation_level="read_committed"` to see only the results of committed transactions."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await consumer.start()
    await producer.start()
    results: dict[str, list[JobResult]] = {}
    try:
        await _end_positions(consumer, bootstrap, results_topic)
        for i, (job_id, value) in enumerate(jobs):
            await producer.send(jobs_topic, value, key=job_id.encode(), headers=headers[i] if headers else None)
        await producer.flush()
        wanted = {job_id for job_id, _ in jobs}
        deadline = time.monotonic() + timeout_s
        while not wanted <= results.keys() and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    result = decode_result(record.value)
                    if result.id in wanted:
                        results.setdefault(result.id, []).append(result)
                        if on_result is not None:
                            on_result(result)
        return results
    finally:
        await producer.stop()
        await consumer.stop()
