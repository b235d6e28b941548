"""How answers leave the worker: every consumed record gets one `Outgoing` (its result or its dead
letter), and only a delivered one lets its offset commit. Each output mode owns its commits
(`deliver`, `commit`, `start`, `stop`, `counters`); this module also decides what is too large to send.

`AtLeastOnceOutput` (the default) sends each answer with acks=all through `ResultProducer`, which retries
transient broker errors until the send succeeds or the worker gives up on stopping; `commit` commits
each partition's offsets up to its first record not yet delivered.

`TransactionalOutbox` (`--exactly-once`): the worker hands every answer to `deliver`, which queues it
and returns at once: the job's in-flight seat is free from then on, and its offset stays pending (never
committed) until its transaction commits. Every `commit_interval_ms` the outbox opens one transaction,
writes the queued answers that lie below the offset they make committable in their partition, adds
those offsets, and commits. An answer past a record still running waits for it (written earlier, it
would be answered a second time by whoever re-reads the partition from its committed offset after a
crash). What waits is bounded in memory: past `max_queued_bytes` the outbox is `full` and the worker
pauses fetching until a commit makes room; `deliver` itself never waits, so the answer that closes a
gap is always taken.
A reader with `isolation_level="read_committed"` then sees each result exactly once: a worker killed
mid-transaction leaves it aborted, and the next owner of the partition answers those records again.

Zombie fencing is by transactional id (one per worker, stable across restarts when the worker has a
`--group-instance-id`): a restarted worker aborts whatever its predecessor left open. Offsets go through
`send_offsets_to_transaction` with the group id alone (aiokafka does not send the consumer's
generation), so a revoked partition's queued answers are committed in the revocation callback, before
the partition moves.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from lorabus.schemas import JobResult, encode, error_result
from lorabus.worker.logs import LogRateLimit
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.producer import PermanentSendError, ResultProducer

log = logging.getLogger(__name__)

# Kafka refuses records over its message.max.bytes (1 MiB by default): an answer larger than this is
# replaced by a smaller one before sending (an error result, or a truncated copy of a dead letter);
# a topic with a smaller limit gets the same replacement when it refuses the record.
MAX_OUTGOING_BYTES = 1_000_000
DLQ_REASON_BYTES = 4096
# Dead letters refused as too large are resent with their value cut to this size: well under the
# broker's default max.message.bytes (1 MiB), leaving room for the key and headers.
DEAD_LETTER_VALUE_BYTES = 64 * 1024
DEAD_LETTER_KEY_BYTES = 1024
DEAD_LETTER_HEADER_BYTES = 16 * 1024
TRUNCATED_HEADER = "x-dlq-truncated"            # parts that were cut: "value", "key", "headers"
ORIGINAL_SIZE_HEADER = "x-dlq-original-size"    # the value's length in bytes before the cut

# After a failed transaction (broker away, coordinator moving) wait this long before the next try.
RETRY_S = 0.5
# An answer its topic refuses for good (deleted, not authorized) is retried this often.
RETRY_PERMANENT_S = 5.0
# What a queued answer costs beyond its record's bytes (the Python objects holding it), so that a memory
# bound in bytes also bounds many tiny answers.
QUEUED_OVERHEAD_BYTES = 512
# A transaction left open by a killed worker blocks read_committed readers until this runs out (or a
# restart with the same transactional id fences it); ours last about one commit interval.
TRANSACTION_TIMEOUT_MS = 10_000


@dataclass
class Outgoing:
    """One record to produce in answer to a consumed one: its result or its dead letter."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    dead_letter: bool = False
    # Its smaller stand-in should the broker refuse it as too large, or a function that builds it: a result's
    # is built only then, not for every result.
    if_too_large: "Outgoing | Callable[[], Outgoing] | None" = None

    def stand_in(self) -> "Outgoing | None":
        """What to send instead should the broker refuse this record as too large (None: nothing)."""
        return self.if_too_large() if callable(self.if_too_large) else self.if_too_large


class Truncated(NamedTuple):
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]


def truncated_copy(value: bytes | None, key: bytes | None = None, headers=(),
                   limit: int = DEAD_LETTER_VALUE_BYTES) -> Truncated:
    """A copy of a record small enough for a topic with the default max.message.bytes.

    The value is cut to `limit` bytes and the key to DEAD_LETTER_KEY_BYTES; headers are kept in
    order while they fit in DEAD_LETTER_HEADER_BYTES (one too large is dropped, smaller ones after
    it are still kept). Two headers are added: `x-dlq-truncated` (the parts that were cut, comma
    separated, empty if none) and `x-dlq-original-size` (the value's length before the cut)."""
    size = 0 if value is None else len(value)
    cut = []
    if value is not None and size > limit:
        value = value[:limit]
        cut.append("value")
    if key is not None and len(key) > DEAD_LETTER_KEY_BYTES:
        key = key[:DEAD_LETTER_KEY_BYTES]
        cut.append("key")
    kept, budget = [], DEAD_LETTER_HEADER_BYTES
    for name, data in headers or ():
        need = len(name.encode()) + len(data or b"")
        if need <= budget:
            kept.append((name, data))
            budget -= need
        elif "headers" not in cut:
            cut.append("headers")
    kept += [(TRUNCATED_HEADER, ",".join(cut).encode()), (ORIGINAL_SIZE_HEADER, str(size).encode())]
    return Truncated(value, key, kept)


def result_record(result: JobResult, topic: str) -> Outgoing:
    """A result to send; one too large for its topic is replaced by an error result saying so."""
    key, value = result.id.encode(), encode(result)

    def too_large() -> Outgoing:
        return Outgoing(topic, encode(error_result(
            result.id, "internal", f"the result is {len(value)} bytes, more than its topic accepts", result.worker,
            adapter=result.adapter, adapter_version=result.adapter_version, mix=result.mix, task=result.task,
            route_event_id=result.route_event_id)), key)

    if len(value) > MAX_OUTGOING_BYTES:  # over Kafka's default limit: don't even try
        return too_large()
    return Outgoing(topic, value, key, if_too_large=too_large)


def dead_letter_record(record, code: str, reason: str, topic: str, worker_id: str) -> Outgoing:
    """The record as it came, with headers that say where from and why, cut down if too large to copy."""
    # A header key that was not UTF-8 (surrogate-escaped on reading) is kept as escaped text.
    headers = [(key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), value)
               for key, value in record.headers or ()]
    headers += [
        ("x-dlq-code", code.encode()),
        ("x-dlq-reason", reason.encode()[:DLQ_REASON_BYTES]),
        ("x-dlq-topic", record.topic.encode()),
        ("x-dlq-partition", str(record.partition).encode()),
        ("x-dlq-offset", str(record.offset).encode()),
        ("x-dlq-timestamp", str(record.timestamp).encode()),
        ("x-dlq-worker", worker_id.encode()),
    ]
    value, key = record.value, record.key
    size = len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers)
    copy = truncated_copy(value, key, headers)  # its coordinates and a prefix, so its offset can still commit
    cut = Outgoing(topic, copy.value, copy.key, copy.headers, dead_letter=True)
    if size > MAX_OUTGOING_BYTES:
        return cut
    return Outgoing(topic, value, key, headers, dead_letter=True, if_too_large=cut)


class AtLeastOnceOutput:
    def __init__(self, producer: ResultProducer, stopping: asyncio.Event, consumer: AIOKafkaConsumer | None,
                 partitions: dict[TopicPartition, PartitionOffsets], log_every_s: float = 10.0):
        self.producer, self.stopping, self.consumer, self.partitions = producer, stopping, consumer, partitions
        self.truncated = 0  # dead letters sent as their truncated copy
        self._log_limit = LogRateLimit(log_every_s)

    async def start(self) -> None:
        await self.producer.start()

    async def stop(self) -> None:
        await self.producer.stop()

    COUNTERS = ("send_retries", "sends_retried", "producer_recreations", "dead_letters_truncated")

    def counters(self) -> dict[str, float]:
        """The output's counters, exported as lorabus_output_<name>_total."""
        p = self.producer
        return dict(zip(self.COUNTERS, (p.retries, p.sends_retried, p.recreations, self.truncated)))

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit each partition's offset up to its first record not yet delivered (of `only`, if given)."""
        offsets = {}
        for tp, state in list(self.partitions.items()):
            if only is not None and tp not in only:
                continue
            offset = state.committable()
            if offset is not None:
                offsets[tp] = (offset, state)
        if not offsets:
            return
        try:
            await self.consumer.commit({tp: offset for tp, (offset, _) in offsets.items()})
        except KafkaError as exc:  # e.g. a rebalance in progress: the next round retries
            log.warning("commit failed: %s", exc)
            return
        for offset, state in offsets.values():
            state.committed = offset

    full = False  # its answers wait for no transaction: nothing to bound beyond the in-flight jobs

    async def deliver(self, outgoing: Outgoing, tp: TopicPartition, offset: int, offsets: PartitionOffsets) -> bool:
        """Send an answer; True once the broker holds it, False if the worker gave up (stopping)."""
        while True:
            try:
                sent = await self.producer.send(outgoing.topic, outgoing.value, key=outgoing.key,
                                                headers=outgoing.headers)
            except PermanentSendError as exc:
                smaller = outgoing.stand_in() if exc.too_large else None
                if smaller is not None:  # a topic with a smaller limit
                    if outgoing.dead_letter:
                        self.truncated += 1
                        if (held := self._log_limit.allow("truncated")) is not None:
                            log.warning("dead letter to %s too large (%d bytes, %s); sending a copy cut to %d "
                                        "bytes%s", outgoing.topic, len(outgoing.value or b""),
                                        type(exc.cause).__name__, DEAD_LETTER_VALUE_BYTES,
                                        self._log_limit.note(held))
                    outgoing = smaller
                    continue
                # Not the record's fault: a topic deleted or not authorized. Keep the offset
                # uncommitted and retry until an operator fixes it, loudly.
                log.error("cannot write to %s (%s); record %s@%d waits", outgoing.topic, exc, tp, offset)
                try:
                    await asyncio.wait_for(self.stopping.wait(), RETRY_PERMANENT_S)
                    return False
                except asyncio.TimeoutError:
                    continue
            if sent:
                offsets.done(offset)
            return sent


@dataclass
class _Queued:
    outgoing: Outgoing
    tp: TopicPartition
    offset: int
    offsets: PartitionOffsets
    size: int  # what it counts against the outbox's memory bound


def queued_size(outgoing: Outgoing) -> int:
    """The bytes an answer holds while it waits for its transaction."""
    return (QUEUED_OVERHEAD_BYTES + len(outgoing.value or b"") + len(outgoing.key or b"")
            + sum(len(k) + len(v or b"") for k, v in outgoing.headers))


class TransactionalOutbox:
    def __init__(self, bootstrap: str, transactional_id: str, group_id: str, log_every_s: float = 10.0,
                 max_queued_bytes: int = 32 << 20, **producer_options):
        self.bootstrap, self.transactional_id, self.group_id = bootstrap, transactional_id, group_id
        self.producer_options = producer_options
        self.producer: AIOKafkaProducer | None = None
        self._queue: list[_Queued] = []
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0
        self._lock = asyncio.Lock()  # one transaction at a time
        self.transactions = 0
        self.failed_transactions = 0
        self._log_limit = LogRateLimit(log_every_s)  # a failed transaction is logged at most this often

    COUNTERS = ("transactions", "failed_transactions")

    def counters(self) -> dict[str, float]:
        """The output's counters, exported as lorabus_output_<name>_total."""
        return dict(zip(self.COUNTERS, (self.transactions, self.failed_transactions)))

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=self.transactional_id,
                                         transaction_timeout_ms=TRANSACTION_TIMEOUT_MS, acks="all",
                                         enable_idempotence=True, **self.producer_options)
        await self.producer.start()

    @property
    def queued(self) -> int:
        """Answers handed over and waiting for their transaction."""
        return len(self._queue)

    @property
    def full(self) -> bool:
        """The queued answers hold `max_queued_bytes`: take no more jobs until a commit makes room."""
        return self.queued_bytes >= self.max_queued_bytes

    async def stop(self) -> None:
        """Give up on what is still queued (never committed: the partitions' next owners answer it)."""
        self._keep(lambda q: False)
        if self.producer is not None:
            await self.producer.stop()

    async def deliver(self, outgoing: Outgoing, tp: TopicPartition, offset: int, offsets: PartitionOffsets) -> bool:
        """Queue an answer for the next transaction that can take it; False if its partition was revoked
        (its next owner answers it). Never waits: the `full` outbox pushes back on fetching instead, so an
        answer that closes a gap below queued ones always gets in."""
        if offsets.revoked:
            return False
        item = _Queued(outgoing, tp, offset, offsets, queued_size(outgoing))
        self._queue.append(item)
        self.queued_bytes += item.size
        return True

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Write the queued answers (of `only`'s partitions, if given) and their offsets in one transaction."""
        async with self._lock:
            self._drop_revoked()
            queued = [q for q in self._queue if only is None or q.tp in only]
            answered: dict[TopicPartition, set[int]] = {}
            for q in queued:
                answered.setdefault(q.tp, set()).add(q.offset)
            states = {q.tp: q.offsets for q in queued}
            commit = {tp: states[tp].committable(answered=answered[tp]) for tp in states}
            commit = {tp: offset for tp, offset in commit.items() if offset is not None}
            # Only answers below their partition's new committed offset go out: an answer written past a
            # record still running would be answered again by whoever re-reads from that offset after a
            # crash, a second result visible to read_committed readers. The rest wait for the gap to close.
            batch = [q for q in queued if q.tp in commit and q.offset < commit[q.tp]]
            if not batch:
                return
            if self.producer is None:
                try:
                    await self.start()
                except KafkaError as exc:
                    self._failed(exc)
                    await asyncio.sleep(RETRY_S)
                    return
            try:
                async with self.producer.transaction():
                    for q in batch:
                        o = q.outgoing
                        await self.producer.send(o.topic, o.value, key=o.key, headers=o.headers)
                    if commit:
                        await self.producer.send_offsets_to_transaction(commit, self.group_id)
            except KafkaError as exc:
                self._failed(exc)
                await self._drop_producer()
                await asyncio.sleep(RETRY_S)
                return
            self.transactions += 1
            done = {id(q) for q in batch}
            self._keep(lambda q: id(q) not in done)
            for q in batch:
                q.offsets.done(q.offset)
            for tp, offset in commit.items():
                states[tp].committed = offset

    def _drop_revoked(self) -> None:
        # Answers of a partition that moved to another worker after its revocation commit: writing them
        # would show a second result and commit offsets the new owner manages. It answers them instead.
        self._keep(lambda q: not q.offsets.revoked)

    def _keep(self, keep) -> None:
        self._queue = [q for q in self._queue if keep(q)]
        self.queued_bytes = sum(q.size for q in self._queue)

    def _failed(self, exc: Exception) -> None:
        self.failed_transactions += 1
        if self._log_limit.allow() is not None:
            log.warning("transaction failed (%s: %s); %d failed so far, retrying", type(exc).__name__, exc,
                        self.failed_transactions)

    async def _drop_producer(self) -> None:
        # After a failed transaction the producer may be in a state it never leaves (fatal error, abort
        # that did not reach the broker): the next commit starts a new one with the same transactional
        # id, which aborts anything left open and fences the old epoch.
        producer, self.producer = self.producer, None
        try:
            await producer.stop()
        except KafkaError:
            pass


OUTPUT_COUNTERS = AtLeastOnceOutput.COUNTERS + TransactionalOutbox.COUNTERS  # every lorabus_output_* a worker exports
