"""The worker's status on the status topic: what it has applied, loaded and failed, and what serves.

One record per worker (key = worker id) on a compacted topic, sent when something changed (at most
every MIN_GAP_S) and every `interval_ms` anyway, so `lorabus status` and `lorabus rollout --wait` can
tell a live worker from a silent one. A worker that stops cleanly leaves a tombstone.

A record never exceeds `--status-max-bytes` (`fit`): past it, the least recent routes, versions and
adapter names (by the offset of their newest control record) are left out and counted in the record,
so a worker with a huge control log still reports, and the newest events (what --wait follows) stay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec
from aiokafka import AIOKafkaProducer

from lorabus.schemas import RouteDelete, RouteSet, RouteStatus, VersionStatus, WorkerStatus, encode
from lorabus.worker.control_log import ControlLog
from lorabus.worker.kafka_security import KafkaSecurity, client_options
from lorabus.worker.producer import close_producer

if TYPE_CHECKING:
    from lorabus.worker.service import Worker

log = logging.getLogger(__name__)

MIN_GAP_S = 0.1  # changes within this are reported together
# --status-max-bytes is refused below this: the fixed fields and the resident list (never cut: one entry
# per device slot, at most 257 characters each) must fit with room to spare. And above this: with the
# record's key and headers it must pass aiokafka's default max_request_size and Kafka's default
# max.message.bytes (both about 1 MiB).
MIN_STATUS_BYTES = 64 * 1024
MAX_STATUS_BYTES = 1_000_000
# On stop, the tombstone and then the producer's close wait at most this long each: the worker's whole
# shutdown step for the reporter is bounded (service.CLOSE_TIMEOUT_S), and a broker away never answers.
STOP_TIMEOUT_S = 2.0


def _ms() -> int:
    return int(time.time() * 1000)


class StatusReporter:
    def __init__(self, worker: "Worker", bootstrap: str, topic: str, interval_ms: int,
                 security: KafkaSecurity | None = None):
        self.worker, self.topic, self.interval_ms = worker, topic, interval_ms
        self.max_bytes = worker.config.status_max_bytes
        self.truncated = False  # whether the last snapshot was cut (logged when that changes)
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
        """The worker's state as one status record, cut to `max_bytes` (`fit`)."""
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
        status = fit(status, self.max_bytes, clog)
        if status.truncated != self.truncated:
            self.truncated = status.truncated
            if status.truncated:
                log.warning("status over --status-max-bytes %d: the least recent %d routes, %d versions and %d names "
                            "are left out of it", self.max_bytes, status.routes_omitted, status.versions_omitted,
                            status.names_omitted)
            else:
                log.info("status fits --status-max-bytes %d again", self.max_bytes)
        return status


def _recency(log: ControlLog) -> tuple[dict[str, int], dict[str, int], dict[tuple[str, str | None], int]]:
    """The offset of the newest control record about each adapter name, each "name@version" (a route.set
    naming it counts: its failures explain a pending route) and each (task, tenant) route: how recent
    each is, for `fit`."""
    names: dict[str, int] = {}
    versions: dict[str, int] = {}
    routes: dict[tuple[str, str | None], int] = {}
    for entry in log.entries.values():
        event, offset = entry.event, entry.offset
        if isinstance(event, (RouteSet, RouteDelete)):
            key = (event.task, event.tenant)
            routes[key] = max(routes.get(key, -1), offset)
            for ref in {ref for target in getattr(event, "targets", ()) for ref in target.versions()}:
                versions[ref] = max(versions.get(ref, -1), offset)
        elif (name := getattr(event, "name", None)) is not None:
            ref = f"{name}@{getattr(event, 'version', '')}"
            names[name] = max(names.get(name, -1), offset)
            versions[ref] = max(versions.get(ref, -1), offset)
    return names, versions, routes


def _size(value) -> int:
    return len(encode(value))


def fit(status: WorkerStatus, max_bytes: int, log: ControlLog) -> WorkerStatus:
    """`status` when it encodes to at most `max_bytes`; otherwise a copy with only the most recent routes,
    versions and names (serving/activated entries) that fit, newest first by the offset of their newest
    control record in `log`, marked `truncated` and with what was left out counted (`*_omitted`)."""
    if _size(status) <= max_bytes:
        return status
    name_at, version_at, route_at = _recency(log)
    names = list(dict.fromkeys([*status.serving, *status.activated]))
    # The record with every list empty and every count at its largest: its size bounds the fixed part.
    base = msgspec.structs.replace(status, serving={}, activated={}, versions=[], routes=[], truncated=True,
                                   routes_omitted=len(status.routes), versions_omitted=len(status.versions),
                                   names_omitted=len(names))
    budget = max_bytes - _size(base)
    # (recency, bytes in the record, kind, index): each entry's size plus its separator (an upper bound).
    items = [(route_at.get((r.task, r.tenant), -1), _size(r) + 1, "route", i) for i, r in enumerate(status.routes)]
    items += [(version_at.get(v.adapter, name_at.get(v.adapter.partition("@")[0], -1)), _size(v) + 1, "version", i)
              for i, v in enumerate(status.versions)]
    for i, name in enumerate(names):
        entries = [d[name] for d in (status.serving, status.activated) if name in d]
        items.append((name_at.get(name, -1), sum(_size(name) + _size(v) + 2 for v in entries), "name", i))
    items.sort(key=lambda item: -item[0])  # newest first; a stable sort keeps each list's order among equals
    kept: dict[str, set[int]] = {"route": set(), "version": set(), "name": set()}
    for _, size, kind, index in items:
        if size > budget:
            break  # by recency: everything kept is newer than everything left out
        budget -= size
        kept[kind].add(index)
    kept_names = {names[i] for i in kept["name"]}
    return msgspec.structs.replace(
        base, routes=[r for i, r in enumerate(status.routes) if i in kept["route"]],
        versions=[v for i, v in enumerate(status.versions) if i in kept["version"]],
        serving={n: v for n, v in status.serving.items() if n in kept_names},
        activated={n: v for n, v in status.activated.items() if n in kept_names},
        routes_omitted=len(status.routes) - len(kept["route"]),
        versions_omitted=len(status.versions) - len(kept["version"]), names_omitted=len(names) - len(kept_names))
