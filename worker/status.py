"""The worker's status on the status topic: what it has applied, loaded and failed, and what serves.

One record per worker (key = worker id) on a compacted topic, sent when something changed (at most
every MIN_GAP_S) and every `interval_ms` anyway, so `lorabus status` and `lorabus rollout --wait` can
tell a live worker from a silent one. A worker that stops cleanly leaves a tombstone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaProducer

from lorabus.schemas import RouteStatus, VersionStatus, WorkerStatus, encode
from lorabus.worker.kafka_security import KafkaSecurity, client_options
from lorabus.worker.producer import close_producer

if TYPE_CHECKING:
    from lorabus.worker.service import Worker

log = logging.getLogger(__name__)

MIN_GAP_S = 0.1  # changes within this are reported together
# Kafka's default record limit is 1 MiB: past this, the per-version lists are cut (`truncated`).
MAX_STATUS_BYTES = 900_000
# On stop, the tombstone and then the producer's close wait at most this long each: the worker's whole
# shutdown step for the reporter is bounded (service.CLOSE_TIMEOUT_S), and a broker away never answers.
STOP_TIMEOUT_S = 2.0


def _ms() -> int:
    return int(time.time() * 1000)


class StatusReporter:
    def __init__(self, worker: "Worker", bootstrap: str, topic: str, interval_ms: int,
                 security: KafkaSecurity | None = None):
        self.worker, self.topic, self.interval_ms = worker, topic, interval_ms
        self.started_ms = _ms()
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, **client_options(security))
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.sent = 0

    async def start(self) -> None:
        await self.producer.start()
        self._task = asyncio.create_task(self._run())

    def changed(self) -> None:
        self._changed.set()

    async def stop(self) -> None:
        """Stop reporting and leave a tombstone: a worker that stopped is no longer part of the fleet."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await asyncio.wait_for(self.producer.send_and_wait(self.topic, None, key=self.worker.worker_id.encode()),
                                   STOP_TIMEOUT_S)
        except Exception as exc:  # the broker may be gone; the status then just goes silent
            log.warning("status tombstone not sent: %s", f"{type(exc).__name__}: {exc}".rstrip(": "))
        await close_producer(self.producer, STOP_TIMEOUT_S)  # bounded, unsent records dropped

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._changed.wait(), self.interval_ms / 1000)
            except asyncio.TimeoutError:
                pass
            self._changed.clear()
            try:
                await self.producer.send_and_wait(self.topic, encode(self.snapshot()), key=self.worker.worker_id.encode())
                self.sent += 1
            except Exception as exc:  # a broker away: the next round sends the state as it is then
                log.warning("status not sent: %s", exc)
            await asyncio.sleep(MIN_GAP_S)

    def snapshot(self) -> WorkerStatus:
        w = self.worker
        clog, registry, health = w.control_log, w.registry, w.health
        names = clog.names()
        routes = []
        for task, tenant in clog.route_keys():
            newest = clog.routes(task, tenant)
            chosen = registry.choose_route(newest)
            routes.append(RouteStatus(task, tenant, chosen.event_id, chosen.targets,
                                      pending_event_id=newest[0].event_id if newest[0] is not chosen else None))
        activated = {n: v for n in names if (v := clog.activated(n)) is not None}
        status = WorkerStatus(
            worker=w.worker_id, ts_ms=_ms(), started_ms=self.started_ms, control_offset=w.control_offset,
            serving={n: registry.serving(n) for n in names}, activated=activated,
            versions=[VersionStatus(key, state.value, health.reasons.get(key)) for key, state in sorted(health.states.items())
                      if clog.published(*key.split("@", 1)) is not None],  # retired versions are no one's concern
            resident=sorted(w.engine.resident()), host_cached=len(w.engine.adapters.host_cache), routes=routes,
            jobs_inflight=len(w.inflight), interval_ms=self.interval_ms)
        if len(encode(status)) > MAX_STATUS_BYTES:  # keep what an operator needs most: failures, then routes
            status.versions = [v for v in status.versions if v.state == "failed"][:1000]
            status.serving = dict(list(status.serving.items())[:1000])
            status.activated = dict(list(status.activated.items())[:1000])
            status.resident = status.resident[:1000]
            status.truncated = True
        return status
