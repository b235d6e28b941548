"""Delivery of results and dead letters that survives broker outages: `ResultProducer`.

It wraps aiokafka's idempotent producer (acks=all) and retries every transient failure until the
broker acknowledges the record, or until a `stopping` event says to give up (the record's offset
then stays uncommitted and the next owner answers it). Errors that belong to the record (too
large, bad or missing topic, not authorized) raise `PermanentSendError` instead. An outage is
logged a few lines at a time, never one line per failed send.

What aiokafka 0.14 does that this module works around (read in its producer/sender.py and
producer/message_accumulator.py, reproduced against Kafka 4.4):
* An idempotent producer numbers each batch per partition when it drains it, and never rewinds.
  A batch that then fails (the broker refuses it as too large; or, after a restart, the leader is
  briefly unknown and the batch is older than request_timeout_ms) leaves a gap, and the broker
  answers OutOfOrderSequenceNumber to every later batch on that partition, forever. So whenever
  a delivery fails, the producer is replaced (the old one flushes what it holds, then closes).
* While the broker is down, `send()` raises KafkaTimeoutError after request_timeout_ms once the
  partition's batch is full; a delivery future just waits (the sender retries internally).
* While a partition has no known leader (the broker went away mid-shutdown, or is restarting),
  aiokafka's sender refreshes metadata in a loop without any pause; with the broker down each
  refresh fails at once: measured ~8,000 refreshes/s, a busy CPU core and an ERROR line each.
  Each producer gets `aiokafka_compat.throttle_metadata`, which spaces refreshes after a failed one.
* aiokafka logs a WARNING/ERROR per reconnect and metadata attempt; starting a producer installs
  `logs.limit_aiokafka_logs()`, which rate-limits those by message template.

A record refused as too large raises `PermanentSendError` with `too_large` set; what to send instead is
the output's decision (worker/output.py).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import time
from typing import Callable

from aiokafka import AIOKafkaProducer
from aiokafka import errors as E

from lorabus.worker.aiokafka_compat import close_producer, throttle_metadata
from lorabus.worker.logs import RATE_LIMIT_INTERVAL_S, LogRateLimit, limit_aiokafka_logs

log = logging.getLogger(__name__)

# Retry pacing for one send: doubles from the first delay up to the cap, with jitter so that many
# waiting sends do not hit a returning broker at the same instant. The cap bounds how late a send
# notices that the broker is back.
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 2.0
# At most one WARNING per kind of trouble per this many seconds (the default of `log_every_s`).
LOG_EVERY_S = RATE_LIMIT_INTERVAL_S
# A delivery not acknowledged after this long is reported as stalled (rate-limited); aiokafka
# keeps retrying it, so it is not resent. The default of `stall_warn_s`.
STALL_WARN_S = 5.0
# stop(): how long each producer may flush before what it still holds is dropped.
STOP_TIMEOUT_S = 10.0
# A topic absent from a successful metadata refresh is looked up once more after this delay (a
# topic just created can be briefly absent) before the send is refused.
MISSING_TOPIC_RECHECK_S = 0.5

# Errors that belong to the record or its topic: resending cannot help.
SIZE_ERRORS = (E.MessageSizeTooLargeError, E.RecordTooLargeError, E.RecordListTooLargeError)
PERMANENT_ERRORS = SIZE_ERRORS + (
    E.InvalidTopicError, E.TopicAuthorizationFailedError, E.ClusterAuthorizationFailedError,
    E.CorruptRecordException, E.InvalidTimestampError, E.PolicyViolationError,
    E.UnsupportedForMessageFormatError, E.InvalidRequiredAcksError,
)
# Errors that mean the producer itself is unusable: replace it and resend.
BROKEN_ERRORS = (
    E.OutOfOrderSequenceNumber, E.UnknownProducerId, E.InvalidProducerEpoch, E.ProducerFenced,
    E.InvalidProducerIdMapping, E.InvalidTxnState, E.ProducerClosed, E.IllegalStateError,
)
# Errors of the connection, not of the record (aiokafka's own `retriable` flag covers the rest).
TRANSIENT_ERRORS = (E.KafkaTimeoutError, OSError, asyncio.TimeoutError)
# Kafka's legal topic names (org.apache.kafka.common.internals.Topic).
TOPIC_NAME = re.compile(r"[a-zA-Z0-9._-]{1,249}")


class PermanentSendError(Exception):
    """The broker will never accept this record; `cause` is aiokafka's error."""

    def __init__(self, topic: str, cause: BaseException):
        super().__init__(f"cannot send to {topic}: {type(cause).__name__}: {cause}")
        self.topic = topic
        self.cause = cause

    @property
    def too_large(self) -> bool:
        return isinstance(self.cause, SIZE_ERRORS)


def _valid_topic(topic: str) -> bool:
    return bool(TOPIC_NAME.fullmatch(topic)) and topic not in (".", "..")


def _retrieve(fut: asyncio.Future) -> None:
    # An abandoned future's exception must be read, or asyncio logs "never retrieved" for each.
    if not fut.cancelled():
        fut.exception()


class ResultProducer:
    """An idempotent producer whose `send` retries until acknowledged, stopped, or refused for good.

    Counters (plain ints, for metrics): `sends_retried` (sends that needed more than one attempt),
    `retries` (extra attempts in all), `recreations` (producers replaced), `stalls` (deliveries
    not acknowledged within `stall_warn_s`), `permanent_errors` (PermanentSendError raised).

    `log_every_s` (one WARNING per kind of trouble per window) and `stall_warn_s` default to LOG_EVERY_S
    and STALL_WARN_S; tests inject short ones instead of waiting out the production intervals.
    """

    def __init__(self, bootstrap_servers: str, stopping: asyncio.Event, *,
                 producer_factory: Callable[..., AIOKafkaProducer] = AIOKafkaProducer,
                 log_every_s: float = LOG_EVERY_S, stall_warn_s: float = STALL_WARN_S, **options):
        # linger_ms=2 as the worker had it: a few ms of batching for many small results.
        self.options = {"bootstrap_servers": bootstrap_servers, "linger_ms": 2, **options,
                        "acks": "all", "enable_idempotence": True}
        self.stopping = stopping
        self.factory = producer_factory
        self.sends_retried = self.retries = self.recreations = 0
        self.stalls = self.permanent_errors = 0
        self._producer: AIOKafkaProducer | None = None
        self._swap: asyncio.Task | None = None          # replacing a broken producer
        self._retiring: set[asyncio.Task] = set()       # old producers flushing, then closing
        self._halt: asyncio.Future | None = None        # done once stopping is set or stop() runs
        self._waits: set[asyncio.Future] = set()        # woken by _set_halt: sends waiting on aiokafka
        self._enqueuing: set[asyncio.Task] = set()      # cancelled by _set_halt: sends inside aiokafka's send()
        self._watch: asyncio.Task | None = None
        self._closed = False
        self._logs = LogRateLimit(log_every_s)
        self.stall_warn_s = stall_warn_s
        self._trouble_since: float | None = None        # the outage now being reported
        self._trouble_sends = 0                          # sends retried in it
        self._trouble_stalls = 0                         # deliveries stalled in it
        self._trouble_kinds: collections.Counter = collections.Counter()

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect once; errors propagate (a worker should not start without its broker)."""
        limit_aiokafka_logs()
        producer = throttle_metadata(self.factory(**self.options))
        try:
            await producer.start()
        except BaseException:
            await close_producer(producer, STOP_TIMEOUT_S)
            raise
        self._producer = producer
        self._halt = asyncio.get_running_loop().create_future()
        self._watch = asyncio.create_task(self._watch_stopping())

    async def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Make pending sends return False, let each producer flush what it holds for up to
        `timeout` s, close them. Sends that must land should be awaited before this."""
        if self._closed:
            return
        self._closed = True
        self._set_halt()
        if self._swap is not None:
            self._swap.cancel()
            await asyncio.gather(self._swap, return_exceptions=True)
        if self._producer is not None:
            await close_producer(self._producer, timeout)
            self._producer = None
        if self._retiring:
            await asyncio.wait(self._retiring, timeout=timeout)
            for task in self._retiring:
                task.cancel()
            await asyncio.gather(*self._retiring, return_exceptions=True)
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)

    async def _watch_stopping(self) -> None:
        await self.stopping.wait()
        self._set_halt()

    def _set_halt(self) -> None:
        if self._halt is not None and not self._halt.done():
            self._halt.set_result(None)
        for wait in list(self._waits):
            _wake(wait)
        for task in list(self._enqueuing):
            task.cancel()

    # ---- sending ----------------------------------------------------------------------------------

    async def send(self, topic: str, value: bytes | None, key: bytes | None = None,
                   headers=None) -> bool:
        """Send one record and wait for the broker's acknowledgement (acks=all).

        True: acknowledged. False: `stopping` was set (or stop() ran) first; the record may still
        land later (at-least-once), the caller neither commits nor dead-letters it. Raises
        PermanentSendError when the record can never be accepted (too large, invalid, missing or
        forbidden topic). Everything else is retried, replacing the producer when it is broken."""
        if self._closed or self._halt is None:
            raise RuntimeError("ResultProducer is not running")
        headers = list(headers or ())
        delay, attempts, unexplained = BACKOFF_FIRST_S, 0, set()
        while True:
            if self._halt.done():
                return False
            if self._swap is not None and not self._swap.done() and not await self._until(self._swap):
                return False
            producer = self._producer
            if producer is None:     # a replacement gave up because we are stopping
                return False
            if attempts:
                self.retries += 1
                if attempts == 1:
                    self.sends_retried += 1
                    self._trouble_sends += 1
            attempts += 1
            delivery = None
            try:
                await self._check_topic(producer, topic)
                delivery = await self._enqueue(producer, topic, value, key, headers)
                if delivery is None:
                    return False
                acked = await self._wait_ack(delivery, topic)
                if acked is None:
                    delivery.add_done_callback(_retrieve)
                    return False
                self._recovered()
                return True
            except PermanentSendError:
                self.permanent_errors += 1
                raise
            except Exception as exc:
                # A failed delivery leaves a gap in the partition's sequence (module docstring).
                if delivery is not None or isinstance(exc, BROKEN_ERRORS):
                    self._replace(producer, exc)
                if isinstance(exc, PERMANENT_ERRORS):
                    self.permanent_errors += 1
                    raise PermanentSendError(topic, exc) from exc
                transient = isinstance(exc, BROKEN_ERRORS + TRANSIENT_ERRORS) or getattr(exc, "retriable", False)
                if not transient:
                    if not isinstance(exc, E.KafkaError):
                        raise       # not Kafka's: a bug in the caller (e.g. value not bytes)
                    # An error of no known kind: one fresh producer per kind; if the record fails
                    # the same way on it, the record is the problem.
                    if type(exc) in unexplained:
                        self.permanent_errors += 1
                        raise PermanentSendError(topic, exc) from exc
                    unexplained.add(type(exc))
                    self._replace(producer, exc)
                self._trouble(type(exc).__name__, "Kafka send to %s failed, retrying: %r", topic, exc)
            if not await self._sleep(delay * random.uniform(0.5, 1.0)):
                return False
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def topic_exists(self, topic: str) -> bool:
        """Whether the cluster has `topic`, after a metadata refresh (cached answer if it fails)."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("ResultProducer is not running")
        try:
            await self._check_topic(producer, topic)
            return True
        except PermanentSendError:
            return False
        except Exception:
            return producer.client.cluster.partitions_for_topic(topic) is not None

    # ---- internals --------------------------------------------------------------------------------

    async def _until(self, aw: asyncio.Future, timeout: float | None = None) -> bool:
        """Wait for `aw` unless we are told to stop first or `timeout` passes (then False; `aw` is left running).

        Not `asyncio.wait({aw, self._halt})`: every waiting send would hang a callback on the one halt
        future, and removing it again costs as many steps as there are sends waiting (a quadratic cost
        per poll's worth of results). Here each wait has its own future, which halt wakes from a set."""
        if aw.done():
            return True
        if self._halt.done():
            return False
        loop = asyncio.get_running_loop()
        wait = loop.create_future()
        aw.add_done_callback(lambda _, wait=wait: _wake(wait))
        timer = loop.call_later(timeout, _wake, wait) if timeout is not None else None
        self._waits.add(wait)
        try:
            await wait
        finally:
            self._waits.discard(wait)
            if timer is not None:
                timer.cancel()
        return aw.done()

    async def _enqueue(self, producer: AIOKafkaProducer, topic: str, value, key, headers) -> asyncio.Future | None:
        """aiokafka's send() in the caller's task, its delivery future: it waits only while the partition's batch
        is full, so a task of its own would cost every send more than it saves. A halt cancels that wait, which
        withdraws the record (None)."""
        task = asyncio.current_task()
        self._enqueuing.add(task)
        try:
            return await producer.send(topic, value, key=key, headers=headers)
        except asyncio.CancelledError:
            if self._halt.done() and task.uncancel() == 0:  # _set_halt's cancel alone, not the caller's
                return None
            raise
        finally:
            self._enqueuing.discard(task)

    async def _sleep(self, seconds: float) -> bool:
        """Back off; False if told to stop meanwhile."""
        await asyncio.wait({self._halt}, timeout=seconds)
        return not self._halt.done()

    async def _wait_ack(self, delivery: asyncio.Future, topic: str):
        """The record's metadata once acknowledged (raises its error); None if told to stop."""
        waited = 0.0
        while True:
            if await self._until(delivery, self.stall_warn_s):
                return delivery.result()
            if self._halt.done():
                return None
            waited += self.stall_warn_s
            if waited == self.stall_warn_s:
                self.stalls += 1
                self._trouble_stalls += 1
            self._trouble("stalled", "Kafka send to %s not acknowledged after %g s; aiokafka keeps retrying",
                          topic, waited)

    async def _check_topic(self, producer: AIOKafkaProducer, topic: str) -> None:
        """Raise PermanentSendError if `topic` is invalid or absent from a successful metadata
        refresh. aiokafka would instead wait request_timeout_ms in send(), then say
        UnknownTopicOrPartition whether the topic is missing or the broker is down."""
        if not _valid_topic(topic):
            raise PermanentSendError(topic, E.InvalidTopicError(topic))
        client = producer.client
        for check in range(2):
            if client.cluster.partitions_for_topic(topic) is not None:
                return
            client.add_topic(topic)
            fut = client.force_metadata_update()
            if not await self._until(fut):
                raise E.KafkaTimeoutError("stopping during a metadata refresh")
            if client.cluster.partitions_for_topic(topic) is not None:
                return
            if not fut.result():
                raise E.KafkaConnectionError(f"metadata refresh for {topic} failed")
            if topic in client.cluster.unauthorized_topics:
                raise PermanentSendError(topic, E.TopicAuthorizationFailedError(topic))
            if check == 0 and not await self._sleep(MISSING_TOPIC_RECHECK_S):
                raise E.KafkaTimeoutError("stopping during a metadata refresh")
        raise PermanentSendError(topic, E.UnknownTopicOrPartitionError(topic))

    def _replace(self, broken: AIOKafkaProducer, cause: BaseException) -> None:
        """Start replacing `broken` unless that is under way or done already."""
        if broken is not self._producer or self._halt.done():
            return
        if self._swap is not None and not self._swap.done():
            return
        self._swap = asyncio.create_task(self._swap_producer(broken, cause))

    async def _swap_producer(self, broken: AIOKafkaProducer, cause: BaseException) -> None:
        self.recreations += 1
        self._warn("recreate", "Kafka producer unusable after %r; replacing it", cause)
        # The old one flushes what it holds (sends waiting on it get their answer or an error and
        # come back here), then closes; it is never reused.
        retiring = asyncio.create_task(close_producer(broken, None))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        delay = BACKOFF_FIRST_S
        while not self._halt.done():
            producer = throttle_metadata(self.factory(**self.options))
            starting = asyncio.ensure_future(producer.start())
            try:
                if not await self._until(starting):
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                    await close_producer(producer, STOP_TIMEOUT_S)
                    break
                starting.result()
            except asyncio.CancelledError:   # stop() while starting
                starting.cancel()
                await close_producer(producer, STOP_TIMEOUT_S)
                raise
            except Exception as exc:   # the broker is still away: try again later
                await close_producer(producer, STOP_TIMEOUT_S)
                self._trouble(type(exc).__name__, "new Kafka producer cannot start yet: %r", exc)
                await self._sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            self._producer = producer
            return
        self._producer = None

    def _warn(self, kind: str, msg: str, *args) -> None:
        held = self._logs.allow(kind)
        if held is not None:
            log.warning(msg + self._logs.note(held), *args)

    def _trouble(self, kind: str, msg: str, *args) -> None:
        if self._trouble_since is None:
            self._trouble_since = time.monotonic()
        self._trouble_kinds[kind] += 1
        self._warn(kind, msg, *args)

    def _recovered(self) -> None:
        if self._trouble_since is None:
            return
        kinds = ", ".join(f"{k} x{n}" for k, n in self._trouble_kinds.most_common())
        log.warning("Kafka sends recovered: %d sends retried, %d deliveries stalled, over %.1f s (%s); "
                    "%d producer recreations so far", self._trouble_sends, self._trouble_stalls,
                    time.monotonic() - self._trouble_since, kinds, self.recreations)
        self._trouble_since, self._trouble_sends, self._trouble_stalls = None, 0, 0
        self._trouble_kinds.clear()


def _wake(wait: asyncio.Future) -> None:
    if not wait.done():
        wait.set_result(None)
