"""The worker's status on the status topic: what it has applied, loaded and failed, and what serves.

One record per worker (key = worker id) on a compacted topic, sent when something changed (at most
every MIN_GAP_S) and every `interval_ms` anyway, so `lorabus status` and `lorabus rollout --wait` can
tell a live worker from a silent one. A worker that stops cleanly leaves a tombstone.

A record never exceeds `--status-max-bytes` (`StatusReporter.snapshot`): past it, the least recent
routes, versions and adapter names (by the offset of their newest control record) are left out and
counted in the record, so a worker with a huge control log still reports, and the newest events (what
--wait follows) stay.

Cost, on the event loop. Changes only mark the status dirty; a snapshot builds its entries newest first
(the order kept as the control log changes) and stops where the record is full, sized by the lengths of
its texts and encoded once, so it costs what the record holds, not what the worker holds (50,000 names:
tens of ms, not a second); and the next one waits in proportion to its cost (SNAPSHOT_LOOP_SHARE).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, NamedTuple

import msgspec
from aiokafka import AIOKafkaProducer

from lorabus.schemas import RouteDelete, RouteSet, RouteStatus, VersionStatus, WorkerStatus, encode
from lorabus.worker.aiokafka_compat import close_producer
from lorabus.worker.control_log import RouteKey
from lorabus.worker.kafka_security import KafkaSecurity, client_options

if TYPE_CHECKING:
    from lorabus.worker.service import Worker

log = logging.getLogger(__name__)

MIN_GAP_S = 0.1  # changes within this are reported together
# A snapshot may take at most this share of the event loop's time: after one that took t seconds, the
# next waits t / share - t (changes meanwhile are reported together), so however many changes come (a
# warm-up finishing every few ms at start-up), the loop stays free to serve.
SNAPSHOT_LOOP_SHARE = 0.1
# --status-max-bytes is refused below this: the fixed fields and the resident list (never cut: one entry
# per device slot, at most 257 characters each) must fit with room to spare. And above this: with the
# record's key and headers it must pass aiokafka's default max_request_size and Kafka's default
# max.message.bytes (both about 1 MiB).
MIN_STATUS_BYTES = 64 * 1024
MAX_STATUS_BYTES = 1_000_000
# On stop, the tombstone and then the producer's close wait at most this long each: the worker's whole
# shutdown step for the reporter is bounded (service.CLOSE_TIMEOUT_S), and a broker away never answers.
STOP_TIMEOUT_S = 2.0
# A record shows at most this many plans (one per group and shape class; a plan cache file may hold hundreds).
MAX_STATUS_PLANS = 128


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
        # How recent each adapter name and route key is (the control log's end offset when it last
        # changed), least recent first: the order `snapshot` walks, kept as the log changes (a dict
        # moves a changed key to its end) instead of re-derived from every record per snapshot.
        self._name_at: dict[str, int] = {}
        self._route_at: dict[RouteKey, int] = {}
        clog = worker.control_log
        for entry in clog.entries.values():  # what was read before (in the order applied, i.e. by offset)
            event = entry.event
            if isinstance(event, (RouteSet, RouteDelete)):
                _touch(self._route_at, (event.task, event.tenant), entry.offset + 1)
            else:
                _touch(self._name_at, event.name, entry.offset + 1)
        clog.watch(lambda name: _touch(self._name_at, name, clog.end_offset),
                   lambda route_key: _touch(self._route_at, route_key, clog.end_offset))

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
            started = time.monotonic()
            try:
                body = encode(self.snapshot())
                cost_s = time.monotonic() - started
                await self.producer.send_and_wait(self.topic, body, key=self.worker.worker_id.encode())
                self.sent += 1
            except Exception as exc:  # a broker away: the next round sends the state as it is then
                cost_s = time.monotonic() - started
                log.warning("status not sent: %s", exc)
            await asyncio.sleep(max(MIN_GAP_S, cost_s / SNAPSHOT_LOOP_SHARE - cost_s))

    def snapshot(self) -> WorkerStatus:
        """The worker's state as one status record of at most `max_bytes`: when the whole state does not fit,
        only the most recent routes, versions and names (newest first by their last control record) that
        fit, marked `truncated` with what was left out counted (`*_omitted`). The entries are built newest
        first and only while they fit (`_parts`), so a snapshot costs about what the record holds, not
        what the worker holds (10,000s of names)."""
        w = self.worker
        head = WorkerStatus(
            worker=w.worker_id, ts_ms=_ms(), started_ms=self.started_ms, control_offset=w.control_offset,
            serving={}, activated={}, versions=[], resident=sorted(w.engine.resident()),
            host_cached=w.engine.host_cached(), routes=[], jobs_inflight=len(w.inflight),
            interval_ms=self.interval_ms,
            plans={f"{p['group']} {p['shape']}": p["plan"] for p in w.engine.plans(MAX_STATUS_PLANS)})
        status = _cut(head, self._parts(), self._totals, self.max_bytes)
        if status.truncated != self.truncated:
            self.truncated = status.truncated
            if status.truncated:
                log.warning("status over --status-max-bytes %d: the least recent %d routes, %d versions and %d names "
                            "are left out of it", self.max_bytes, status.routes_omitted, status.versions_omitted,
                            status.names_omitted)
            else:
                log.info("status fits --status-max-bytes %d again", self.max_bytes)
        return status

    def _parts(self) -> Iterator[_Part]:
        """The record's entries, newest first: each route key and each adapter name
        by its last change, each followed by its versions this worker has loaded, is loading or failed
        (retired ones are no one's concern) that no newer entry gave yet."""
        w = self.worker
        clog, registry, health = w.control_log, w.registry, w.adapter_health
        given: set[str] = set()

        def versions(refs: Iterable[str]) -> Iterator[_Part]:
            for ref in refs:
                state = health.states.get(ref)
                if state is not None and ref not in given and clog.published(*ref.split("@", 1)) is not None:
                    given.add(ref)
                    yield _version_part(VersionStatus(ref, state.value, health.reasons.get(ref), health.sources.get(ref)))

        routes = []
        for task, tenant in clog.route_keys():  # a handful: all built, then merged in by recency
            newest = clog.routes(task, tenant)
            chosen = registry.choose_route(newest)
            routes.append((self._route_at.get((task, tenant), -1), RouteStatus(
                task, tenant, chosen.event_id, chosen.targets,
                pending_event_id=newest[0].event_id if newest[0] is not chosen else None)))
        routes.sort(key=lambda item: -item[0])
        next_route = 0
        for name, at in reversed(self._name_at.items()):
            while next_route < len(routes) and routes[next_route][0] >= at:
                route = routes[next_route][1]
                next_route += 1
                yield _route_part(route)
                yield from versions(_route_refs(route))
            order = clog.candidate_order(name)
            if order:  # a name with a live version
                yield _name_part(name, registry.serving(name), clog.activated(name))
                yield from versions(f"{name}@{version}" for version in order)
        for _, route in routes[next_route:]:
            yield _route_part(route)
            yield from versions(_route_refs(route))

    def _totals(self) -> tuple[int, int, int]:
        """How many routes, versions and names a whole record would hold (counted only for a cut one)."""
        clog, published = self.worker.control_log, self.worker.control_log.published
        versions = sum(1 for key in self.worker.adapter_health.states if published(*key.split("@", 1)) is not None)
        return len(clog.route_keys()), versions, len(clog.names())


def _touch(recency: dict, key, at: int) -> None:
    """Mark `key` changed at `at`: its entry moves to the end (the dict stays ordered by recency)."""
    recency.pop(key, None)
    recency[key] = at


def _route_refs(route: RouteSet | RouteDelete | RouteStatus) -> dict[str, None]:
    """The "name@version" refs a route's targets serve from, once each, in order."""
    return dict.fromkeys(ref for target in getattr(route, "targets", ()) for ref in target.versions())


# ---- sizing a record without encoding its entries one by one ------------------------------------------
# An entry's size below is a lower bound of its bytes in the record, exact for printable ASCII text
# without quotes or backslashes (UTF-8 and JSON escapes only add bytes); `_cut` encodes the record it
# builds to check the real size. Each size counts one separator (a comma).
_WIDEST_COUNT = 10**15  # more entries than any worker holds: a count's widest
# {"adapter":"","state":"","reason":null,"source":null}, less the nulls, plus a comma
_VERSION_FIXED = len(encode(VersionStatus("", ""))) - 2 * len("null") + 1


class _Part(NamedTuple):
    """One entry of a status record's cuttable lists, with its size: a route, a name (its serving and
    activated entries) or a version."""

    route: RouteStatus | None = None
    name: str | None = None
    serving: str | None = None
    activated: str | None = None
    version: VersionStatus | None = None
    size: int = 0


def _route_part(route: RouteStatus) -> _Part:
    return _Part(route=route, size=len(encode(route)) + 1)  # few routes, but each may be large: encoded


def _name_part(name: str, serving: str | None, activated: str | None) -> _Part:
    size = sum(len(name) + len(value) + len('"":"",') for value in (serving, activated) if value is not None)
    return _Part(name=name, serving=serving, activated=activated, size=size)


def _version_part(version: VersionStatus) -> _Part:
    reason, source = (len("null") if text is None else len(encode(text)) for text in (version.reason, version.source))
    return _Part(version=version, size=_VERSION_FIXED + len(version.adapter) + len(version.state) + reason + source)


def _route_order(route: RouteStatus) -> tuple[str, str]:
    return route.task, route.tenant or ""  # as ControlLog.route_keys: by task, every tenant first


def _record(head: WorkerStatus, parts: list[_Part], totals: tuple[int, int, int] | None) -> WorkerStatus:
    """`head` with the lists of `parts`, in the record's order (routes by task and tenant, names and
    versions sorted); with `totals` (routes, versions, names) marked truncated and what is left out counted."""
    routes = sorted((p.route for p in parts if p.route is not None), key=_route_order)
    named = sorted((p for p in parts if p.name is not None), key=lambda p: p.name)
    versions = sorted((p.version for p in parts if p.version is not None), key=lambda v: v.adapter)
    status = msgspec.structs.replace(
        head, routes=routes, versions=versions,
        serving={p.name: p.serving for p in named if p.serving is not None},
        activated={p.name: p.activated for p in named if p.activated is not None})
    if totals is None:
        return status
    return msgspec.structs.replace(status, truncated=True, routes_omitted=totals[0] - len(routes),
                                   versions_omitted=totals[1] - len(versions), names_omitted=totals[2] - len(named))


def _cut(head: WorkerStatus, parts: Iterable[_Part], totals: Callable[[], tuple[int, int, int]],
         max_bytes: int) -> WorkerStatus:
    """The record of `head` (its cuttable lists empty) with the longest prefix of `parts` (newest first)
    that encodes to at most `max_bytes`: whole when every part fits, else marked truncated with what was
    left out counted (`totals()`: how many routes, versions and names there are in all, asked only then).
    Parts are taken while their sizes fit, so only what fits is ever built; the record is then encoded
    once, and only where escapes or non-ASCII text made it larger than its sizes, the cut is searched."""
    widest = msgspec.structs.replace(head, truncated=True, routes_omitted=_WIDEST_COUNT,
                                     versions_omitted=_WIDEST_COUNT, names_omitted=_WIDEST_COUNT)
    budget = max_bytes - len(encode(widest))  # the fixed part, with every count as wide as it can get
    taken: list[_Part] = []
    whole = True
    for part in parts:
        if part.size > budget:
            whole = False  # by recency: everything kept is newer than everything left out
            break
        budget -= part.size
        taken.append(part)
    if whole:
        status = _record(head, taken, None)
        if len(encode(status)) <= max_bytes:
            return status
    counts = totals()

    def fits(n: int) -> WorkerStatus | None:
        record = _record(head, taken[:n], counts)
        return record if len(encode(record)) <= max_bytes else None

    if not whole and (status := fits(len(taken))) is not None:
        return status
    low, high = 0, len(taken)  # the first `low` parts fit (none: the fixed part fits, MIN_STATUS_BYTES); `high` do not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) is not None else (low, middle)
    return _record(head, taken[:low], counts)
