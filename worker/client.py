"""Producer-side helpers: send jobs and control events, collect the results that answer them, and read
the control topic (as state) and the status topic (each worker's view) back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from lorabus.schemas import DECODE_ERRORS, ControlEvent, JobResult, WorkerStatus, decode_result, decode_status, encode
from lorabus.worker.aiokafka_compat import install_tolerant_records
from lorabus.worker.control_log import ControlLog, SkippedRecord, control_key, key_text, read_record
from lorabus.worker.kafka_security import KafkaSecurity, client_options


async def publish_control(bootstrap: str, topic: str, events: list[ControlEvent],
                          signer: Callable[[bytes], tuple[str, bytes]] | None = None,
                          security: KafkaSecurity | None = None) -> list[int]:
    """Send control events, each under its canonical record key (worker/control_log.py), in order;
    `signer` (e.g. `ControlKeys.sign`) turns a record value into its signature header. Returns the
    offsets the records landed at."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                **client_options(security))
    offsets = []
    try:  # stopped even when start fails (a refused login): no unclosed client behind
        await producer.start()
        for event in events:
            value = encode(event)
            headers = [signer(value)] if signer is not None else None
            sent = await producer.send_and_wait(topic, value, key=control_key(event).encode(), headers=headers)
            offsets.append(sent.offset)
    finally:
        await producer.stop()
    return offsets


async def _read_to_end(bootstrap: str, topic: str, timeout_s: float,
                       security: KafkaSecurity | None) -> tuple[list[ConsumerRecord], int]:
    """Every record of `topic` from the beginning up to its end offsets as of this call, and the largest
    end offset; a topic that does not exist reads as empty."""
    try:
        parts = await topic_partitions(bootstrap, topic, wait_s=0, security=security)
    except LookupError:
        return [], 0
    install_tolerant_records()  # any producer may have written here: a bad header key must not stop the read
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                **client_options(security))
    try:
        await consumer.start()
        consumer.assign(parts)
        ends = await consumer.end_offsets(parts)
        await consumer.seek_to_beginning(*parts)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while True:
            # Compaction leaves gaps, so "done" is the position reaching the end, not a record count.
            remaining = [tp for tp in parts if await consumer.position(tp) < ends[tp]]
            if not remaining:
                return records, max(ends.values(), default=0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to its end offsets took longer than {timeout_s} s")
            for tp, batch in (await consumer.getmany(*remaining, timeout_ms=200)).items():
                records += [r for r in batch if r.offset < ends[tp]]
    finally:
        await consumer.stop()


async def read_control_log(bootstrap: str, topic: str, timeout_s: float = 30.0,
                           security: KafkaSecurity | None = None) -> ControlLog:
    """The control topic as a worker folds it (worker/control_log.py), read from the beginning to its end
    offset as of this call: undecodable records and records not under their event's canonical key are
    skipped, tombstones clear their key. `end_offset` is the topic's end offset. Signatures are not
    checked: a worker that requires them ignores unsigned records this still folds in."""
    records, end = await _read_to_end(bootstrap, topic, timeout_s, security)
    log = ControlLog()
    for record in records:
        key = key_text(record.key)
        if record.value is None:
            if key is not None:
                log.clear(record.offset, key)
            continue
        try:
            log.apply(record.offset, read_record(key, record.value))
        except SkippedRecord:
            continue
    log.end_offset = max(log.end_offset, end)
    return log


async def read_statuses(bootstrap: str, status_topic: str, timeout_s: float = 30.0,
                        security: KafkaSecurity | None = None) -> dict[str, WorkerStatus]:
    """Worker id → its latest status on the (compacted) status topic, read to its end offset as of this
    call; a tombstone (a worker's clean stop) removes the worker, undecodable records are skipped."""
    records, _ = await _read_to_end(bootstrap, status_topic, timeout_s, security)
    statuses: dict[str, WorkerStatus] = {}
    for record in records:  # one partition: offset order
        key = key_text(record.key)
        if record.value is None:
            statuses.pop(key, None)
            continue
        try:
            status = decode_status(record.value)
        except DECODE_ERRORS:
            continue
        statuses[key if key is not None else status.worker] = status
    return statuses


async def topic_partitions(bootstrap: str, topic: str, wait_s: float = 10.0,
                           security: KafkaSecurity | None = None) -> list[TopicPartition]:
    """The partitions of a topic, waiting a little for a just-created topic to appear."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(security))
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


async def _end_positions(consumer: AIOKafkaConsumer, bootstrap: str, topic: str,
                         security: KafkaSecurity | None) -> list[TopicPartition]:
    parts = await topic_partitions(bootstrap, topic, security=security)
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
    keys: list[bytes] | None = None,
    security: KafkaSecurity | None = None,
) -> dict[str, list[JobResult]]:
    """Send (job id, raw record value) pairs and wait until every id has a result; returns id → results.
    Records are keyed by `keys` when given (e.g. worker/affinity.py's), by job id otherwise.
    Use `isolation_level="read_committed"` to see only the results of committed transactions."""
    options = client_options(security)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation_level,
                                **options)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, **options)
    results: dict[str, list[JobResult]] = {}
    try:
        await consumer.start()
        await producer.start()
        await _end_positions(consumer, bootstrap, results_topic, security)
        for i, (job_id, value) in enumerate(jobs):
            key = keys[i] if keys else job_id.encode()
            await producer.send(jobs_topic, value, key=key, headers=headers[i] if headers else None)
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
