"""Streamed partial results (jobs with `stream: true`): `PartialSender` sends them best-effort, and a
`JobStream` turns one job's engine `Partial`s into `status: "partial"` records for it.

Partials go through a plain producer of their own, outside any transaction even in exactly-once mode:
one that fails is counted (`lorabus_partials_total{outcome="failed"}`), logged at most once per
interval and dropped, never retried, and the job's final result is delivered as ever. The final must
follow its job's partials on the topic, yet it leaves through another producer (the result producer or
the transactional outbox), so the pipeline waits until every partial of the job was acknowledged or
failed (`JobStream.flush`, bounded by FLUSH_S) before handing the final result over.

The producer starts with the first streamed job, so a worker that never streams opens no connection
for it; records are handed to it in the order they were produced, by one pump task.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer

from lorabus.scheduler import Partial
from lorabus.schemas import JobResult, encode
from lorabus.worker.aiokafka_compat import close_producer, throttle_metadata
from lorabus.worker.logs import LogRateLimit
from lorabus.worker.metrics import Metrics

log = logging.getLogger(__name__)

# A partial not acknowledged within this long has failed (the producer's request timeout), and its
# job's final result waits no longer for it.
FLUSH_S = 5.0
# Partials waiting for the producer (one that cannot keep up, a broker away) beyond this many are
# dropped as failed: memory stays bounded, and no final result waits behind a backlog.
MAX_QUEUED = 10_000
# After the producer failed to start, partials fail at once for this long before it is tried again.
START_RETRY_S = 2.0
STOP_TIMEOUT_S = 5.0


class PartialSender:
    """Fire-and-forget sends of partial records; `send` answers a future that says whether the broker
    acknowledged the record (it never raises)."""

    def __init__(self, bootstrap: str, metrics: Metrics, log_every_s: float = 10.0, **options):
        self.bootstrap, self.metrics, self.options = bootstrap, metrics, options
        self._queue: asyncio.Queue | None = None
        self._pump: asyncio.Task | None = None
        self._producer: AIOKafkaProducer | None = None
        self._start_failed_at: float | None = None
        self._log_limit = LogRateLimit(log_every_s)
        self.closed = False

    def send(self, topic: str, key: bytes, value: bytes) -> asyncio.Future:
        """Queue one record (on the event loop); the future resolves True once it is acknowledged."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if self.closed:
            self._failed(done, topic, "the worker is stopping")
            return done
        if self._pump is None:
            self._queue = asyncio.Queue(MAX_QUEUED)
            self._pump = asyncio.create_task(self._run())
        try:
            self._queue.put_nowait((topic, key, value, done))
        except asyncio.QueueFull:
            self._failed(done, topic, f"{MAX_QUEUED} partials already wait for the producer")
        return done

    async def stop(self) -> None:
        """Drop what is queued (failed), let the producer flush what it holds for a while, close it."""
        if self.closed:
            return
        self.closed = True
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
            while not self._queue.empty():
                topic, _, _, done = self._queue.get_nowait()
                self._failed(done, topic, "the worker is stopping")
        if self._producer is not None:
            await close_producer(self._producer, STOP_TIMEOUT_S)
            self._producer = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            topic, key, value, done = await self._queue.get()
            if self._producer is None and not await self._start(loop):
                self._failed(done, topic, "the partials producer cannot start")
                continue
            try:
                delivery = await self._producer.send(topic, value, key=key)
            except Exception as exc:  # e.g. no metadata for the topic within the request timeout
                self._failed(done, topic, repr(exc))
                continue
            delivery.add_done_callback(lambda d, done=done, topic=topic: self._delivered(d, done, topic))

    async def _start(self, loop: asyncio.AbstractEventLoop) -> bool:
        if self._start_failed_at is not None and loop.time() - self._start_failed_at < START_RETRY_S:
            return False
        producer = throttle_metadata(AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=2,
                                                      request_timeout_ms=int(FLUSH_S * 1000), **self.options))
        self._producer = producer  # from here on, stop() closes it (also while it starts)
        try:
            await producer.start()
        except Exception as exc:
            self._producer, self._start_failed_at = None, loop.time()
            await close_producer(producer, STOP_TIMEOUT_S)
            self._warn("start", "partials producer cannot start: %r", exc)
            return False
        self._start_failed_at = None
        return True

    def _delivered(self, delivery: asyncio.Future, done: asyncio.Future, topic: str) -> None:
        if delivery.cancelled() or delivery.exception() is not None:
            self._failed(done, topic, repr(delivery.exception()) if not delivery.cancelled() else "cancelled")
            return
        self.metrics.partials.labels("sent").inc()
        done.set_result(True)

    def _failed(self, done: asyncio.Future, topic: str, why: str) -> None:
        self.metrics.partials.labels("failed").inc()
        self._warn("send", "partial result to %s dropped: %s", topic, why)
        done.set_result(False)

    def _warn(self, kind: str, message: str, *args) -> None:
        held = self._log_limit.allow(kind)
        if held is not None:
            log.warning(message + self._log_limit.note(held), *args)


class JobStream:
    """One streamed job's partial records: `on_partial` is the engine request's hook (called on the
    engine's step thread), `flush` waits until each was acknowledged or failed."""

    def __init__(self, sender: PartialSender, job_id: str, topic: str, worker: str,
                 loop: asyncio.AbstractEventLoop):
        self.sender, self.job_id, self.topic, self.worker, self.loop = sender, job_id, topic, worker, loop
        self.provenance: dict = {}  # the result fields that say what serves the job (wire.provenance)
        self._pending: set[asyncio.Future] = set()

    def on_partial(self, partial: Partial) -> None:
        self.loop.call_soon_threadsafe(self._send, partial)

    def _send(self, partial: Partial) -> None:
        record = JobResult(id=self.job_id, status="partial", index=partial.index, text=partial.text,
                           token_ids=partial.token_ids, worker=self.worker, **self.provenance)
        sent = self.sender.send(self.topic, self.job_id.encode(), encode(record))
        self._pending.add(sent)
        sent.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Every partial handed over so far acknowledged or failed (waits FLUSH_S at most)."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=FLUSH_S)
