"""How answers leave the worker: every consumed record gets one `Outgoing` (its result or its dead
letter), and only a delivered one lets its offset commit.

`AtLeastOnceOutput` (the default) sends each answer with acks=all through `ResultProducer`, which retries
transient broker errors until the send succeeds or the worker gives up on stopping; the worker commits
offsets on its own schedule, up to the first record not yet delivered.

`TransactionalOutbox` (`--exactly-once`): the worker hands every answer to `deliver`, which waits
until the answer is committed. Every `commit_interval_ms` the outbox opens one transaction, writes the
queued answers that lie below the offset they make committable in their partition, adds those offsets,
and commits. An answer past a record still running waits for it (written earlier, it would be answered
a second time by whoever re-reads the partition from its committed offset after a crash).
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
import time
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.producer import PermanentSendError, ResultProducer

log = logging.getLogger(__name__)

# After a failed transaction (broker away, coordinator moving) wait this long before the next try.
RETRY_S = 0.5
# An answer its topic refuses for good (deleted, not authorized) is retried this often.
RETRY_PERMANENT_S = 5.0
# A transaction left open by a killed worker blocks read_committed readers until this runs out (or a
# restart with the same transactional id fences it); ours last about one commit interval.
TRANSACTION_TIMEOUT_MS = 10_000
# A failed transaction is logged at most this often; the rest are counted.
LOG_EVERY_S = 10.0


@dataclass
class Outgoing:
    """One record to produce in answer to a consumed one: its result or its dead letter."""

    topic: str
    value: bytes | None
    key: bytes | None = None
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    dead_letter: bool = False  # refused as too large, it is sent as a truncated copy
    if_too_large: "Outgoing | None" = None  # a result's smaller stand-in should the broker refuse it


class AtLeastOnceOutput:
    def __init__(self, producer: ResultProducer, stopping: asyncio.Event):
        self.producer, self.stopping = producer, stopping

    async def deliver(self, outgoing: Outgoing, tp: TopicPartition, offset: int, offsets: PartitionOffsets) -> bool:
        """Send an answer; True once the broker holds it, False if the worker gave up (stopping)."""
        while True:
            send = self.producer.send_dead_letter if outgoing.dead_letter else self.producer.send
            try:
                sent = await send(outgoing.topic, outgoing.value, key=outgoing.key, headers=outgoing.headers)
            except PermanentSendError as exc:
                if exc.too_large and outgoing.if_too_large is not None:  # a topic with a smaller limit
                    outgoing = outgoing.if_too_large
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
    committed: asyncio.Future


class TransactionalOutbox:
    def __init__(self, bootstrap: str, transactional_id: str, group_id: str, **producer_options):
        self.bootstrap, self.transactional_id, self.group_id = bootstrap, transactional_id, group_id
        self.producer_options = producer_options
        self.producer: AIOKafkaProducer | None = None
        self._queue: list[_Queued] = []
        self._lock = asyncio.Lock()  # one transaction at a time
        self.transactions = 0
        self.failed_transactions = 0
        self._logged_at = float("-inf")

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, transactional_id=self.transactional_id,
                                         transaction_timeout_ms=TRANSACTION_TIMEOUT_MS, acks="all",
                                         enable_idempotence=True, **self.producer_options)
        await self.producer.start()

    async def stop(self) -> None:
        """Give up on what is still queued (never committed: the partitions' next owners answer it)."""
        for item in self._queue:
            if not item.committed.done():
                item.committed.set_result(False)
        self._queue.clear()
        if self.producer is not None:
            await self.producer.stop()

    async def deliver(self, outgoing: Outgoing, tp: TopicPartition, offset: int, offsets: PartitionOffsets) -> bool:
        """Queue an answer; True once it is committed, False if the worker stopped first."""
        if offsets.revoked:
            return False
        committed = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(outgoing, tp, offset, offsets, committed))
        return await committed

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
            self._queue = [q for q in self._queue if id(q) not in done]
            for q in batch:
                q.offsets.done(q.offset)
                q.committed.set_result(True)
            for tp, offset in commit.items():
                states[tp].committed = offset

    def _drop_revoked(self) -> None:
        # Answers of a partition that moved to another worker after its revocation commit: writing them
        # would show a second result and commit offsets the new owner manages. It answers them instead.
        for q in self._queue:
            if q.offsets.revoked:
                q.committed.set_result(False)
        self._queue = [q for q in self._queue if not q.offsets.revoked]

    def _failed(self, exc: Exception) -> None:
        self.failed_transactions += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
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
