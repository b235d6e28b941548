"""Producer-side helpers: send jobs and control events, collect the results that answer them, and read
the control topic (as state) and the status topic (each worker's view) back."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from lorabus.schemas import DECODE_ERRORS, ControlEvent, JobResult, WorkerStatus, decode_result, decode_status, encode
from lorabus.worker.aiokafka_compat import inflate_limit, install_tolerant_records
from lorabus.worker.control_log import ControlLog, SignedControl, SkippedRecord, admit_record, control_key, key_text
from lorabus.worker.kafka_security import KafkaSecurity, client_options

FETCH_OVERHEAD_BYTES = 64 * 1024  # a status fetch may carry this beyond one record: batch and record headers
MAX_REASON_CHARS = 200  # why a status record was skipped: a decoder's message may quote the record


async def publish_control(bootstrap: str, topic: str, events: list[ControlEvent],
                          signer: Callable[[bytes], tuple[str, bytes]] | None = None,
                          security: KafkaSecurity | None = None) -> list[int]:
    """Send control events, each under its canonical record key (worker/control_log.py), in order;
    `signer` (e.g. `ControlKeys.sign`) turns a record value into its signature header; a signed event
    without an `event_id` or `ts_ms` gets a fresh one (its nonce and time, which workers require of
    signed events). Returns the offsets the records landed at."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                **client_options(security))
    offsets = []
    try:  # stopped even when start fails (a refused login): no unclosed client behind
        await producer.start()
        for event in events:
            if signer is not None and (event.event_id is None or event.ts_ms is None):
                event = msgspec.structs.replace(event, event_id=event.event_id or uuid.uuid4().hex,
                                                ts_ms=event.ts_ms if event.ts_ms is not None else int(time.time() * 1000))
            value = encode(event)
            headers = [signer(value)] if signer is not None else None
            sent = await producer.send_and_wait(topic, value, key=control_key(event).encode(), headers=headers)
            offsets.append(sent.offset)
    finally:
        await producer.stop()
    return offsets


async def _read_to_end(bootstrap: str, topic: str, timeout_s: float, security: KafkaSecurity | None,
                       on_record: Callable[[ConsumerRecord], None] | None = None,
                       **consumer_options) -> tuple[list[ConsumerRecord], int]:
    """Every record of `topic` from the beginning up to its end offsets as of this call, and the largest
    end offset; a topic that does not exist reads as empty. With `on_record`, each record goes to it as
    it is read instead of into the list (returned empty), so a reader that keeps only what it decoded
    holds one fetch at a time; `consumer_options` (e.g. fetch sizes) go to the consumer."""
    try:
        parts = await topic_partitions(bootstrap, topic, wait_s=0, security=security)
    except LookupError:
        return [], 0
    install_tolerant_records()  # any producer may have written here: a bad header key must not stop the read
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest",
                                **consumer_options, **client_options(security))
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
                if on_record is None:
                    records += [r for r in batch if r.offset < ends[tp]]
                    continue
                for record in batch:
                    if record.offset < ends[tp]:
                        on_record(record)
    finally:
        await consumer.stop()


async def read_control_log(bootstrap: str, topic: str, timeout_s: float = 30.0,
                           security: KafkaSecurity | None = None, signed: SignedControl | None = None) -> ControlLog:
    """The control topic as a worker folds it, read from the beginning to its end offset as of this call:
    each record is applied or skipped by the workers' own rule (`admit_record`), so with `signed` (the
    fleet's --control-key and skew) unsigned, forged and replayed records are skipped as they are there.
    Skipped records are counted in `ignored_count`, the last ones kept in `ignored`. `end_offset` is the
    topic's end offset."""
    records, end = await _read_to_end(bootstrap, topic, timeout_s, security)
    log = ControlLog()
    for record in records:
        try:
            admitted = admit_record(log, record, signed)
        except SkippedRecord as skip:
            log.note_ignored(record.offset, key_text(record.key), skip)
            continue
        if isinstance(admitted, str):
            log.clear(record.offset, admitted)
        else:
            log.apply(record.offset, admitted)
    log.end_offset = max(log.end_offset, end)
    return log


@dataclass(frozen=True)
class SkippedStatus:
    """A status record read as invalid, not as state: its key (as text; not escaped), offset and why."""

    key: str
    offset: int
    reason: str


class Statuses(dict[str, WorkerStatus]):
    """Worker id → its latest valid status (what `read_statuses` returns), and the records it skipped
    as invalid (`skipped`), which `lorabus status` lists apart."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.skipped: list[SkippedStatus] = []


async def read_statuses(bootstrap: str, status_topic: str, timeout_s: float = 30.0,
                        security: KafkaSecurity | None = None, max_bytes: int | None = None) -> Statuses:
    """Worker id → its latest status on the (compacted) status topic, read to its end offset as of this
    call; a tombstone (a worker's clean stop) removes the worker.

    Anyone who may write the topic writes what this reads, so a record is state only if it is valid: a
    value over `max_bytes` (default: WorkerConfig's --status-max-bytes) is skipped before it is decoded,
    as is one that does not decode; a key whose last record was skipped is listed in `skipped`. Fetches
    are capped near `max_bytes`, a compressed batch is inflated only that far (one that holds more is
    skipped, named by its first record's key: `inflate_limit`), and each record is dropped once read, so
    memory holds about one fetch whatever a writer compressed into it. A status's `ts_ms` becomes the record's timestamp
    (LogAppendTime, the broker's clock, on that topic), not the time the writer put in it: liveness is
    not the writer's word (cli/fleet_view.is_live)."""
    if max_bytes is None:
        from lorabus.worker.config import WorkerConfig  # here: the config module imports the engine (torch)

        max_bytes = WorkerConfig.status_max_bytes
    statuses = Statuses()
    skipped: dict[str, SkippedStatus] = {}  # record key → its last record, when that was skipped

    def take(record: ConsumerRecord) -> None:
        key, label = key_text(record.key), _key_label(record.key)
        if record.value is None:
            statuses.pop(key, None)
            skipped.pop(label, None)
            return
        if len(record.value) > max_bytes:
            skipped[label] = SkippedStatus(label, record.offset, f"{len(record.value)} bytes, over the "
                                                                 f"{max_bytes}-byte limit (--status-max-bytes)")
            return
        try:
            status = decode_status(record.value)
        except DECODE_ERRORS as exc:
            reason = f"not a status: {type(exc).__name__}: {exc}"
            skipped[label] = SkippedStatus(label, record.offset, reason[:MAX_REASON_CHARS])
            return
        skipped.pop(label, None)
        status.ts_ms = record.timestamp
        statuses[key if key is not None else status.worker] = status

    def skip_batch(offset: int, key: bytes | None, why: str) -> None:
        label = _key_label(key) if key is not None else "(a compressed batch)"
        skipped[label] = SkippedStatus(label, offset, f"{why}: over the {max_bytes}-byte limit (--status-max-bytes)")

    fetch_bytes = max_bytes + FETCH_OVERHEAD_BYTES
    with inflate_limit(fetch_bytes, skip_batch):
        await _read_to_end(bootstrap, status_topic, timeout_s, security, on_record=take,
                           max_partition_fetch_bytes=fetch_bytes, fetch_max_bytes=fetch_bytes)
    statuses.skipped = list(skipped.values())
    return statuses


async def status_topic_warnings(bootstrap: str, topic: str, security: KafkaSecurity | None = None) -> list[str]:
    """What about the status topic's configs lets a writer mislead readers (worker/topics.py); empty
    also when the configs cannot be read (no such topic, no DESCRIBE_CONFIGS right)."""
    from lorabus.worker.topics import status_topic_problems, topic_configs  # the topics module imports the engine

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **client_options(security))
    try:
        await admin.start()
        return status_topic_problems(await topic_configs(admin, topic))
    except (KafkaError, LookupError):
        return []
    finally:
        await admin.close()


def _key_label(raw: bytes | None) -> str:
    """A record key as text for a listing: the text, or the bytes' repr when absent or not UTF-8."""
    text = key_text(raw)
    return text if text is not None else repr(raw)


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
    on_partial=None,
) -> dict[str, list[JobResult]]:
    """Send (job id, raw record value) pairs and wait until every id has a result; returns id → results.
    Records are keyed by `keys` when given (e.g. worker/affinity.py's), by job id otherwise.
    Use `isolation_level="read_committed"` to see only the results of committed transactions.
    Partial records (streamed jobs) are never results: they go to `on_partial` as they arrive, if given."""
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
                    if result.status == "partial":
                        if on_partial is not None and result.id in wanted:
                            on_partial(result)
                    elif result.id in wanted:
                        results.setdefault(result.id, []).append(result)
                        if on_result is not None:
                            on_result(result)
        return results
    finally:
        await producer.stop()
        await consumer.stop()
