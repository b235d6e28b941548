"""The worker's reader of the control topic: every record in order, admitted or skipped by the fleet's one
rule (`admit_record`: signature, key, freshness), folded into the `ControlLog`, and acted on (new versions
registered with the engine and warmed up through `AdapterLoads`). A local path is confined to the adapter
roots (worker/adapter_paths.py); an `s3://` one is not (the roots are for local paths): it is registered
once fetched into the disk tier (worker/store_fetches.py).

No record and no broker error ends the reader: what it cannot apply is counted and logged as ignored.
A large batch gives the event loop back every CONTROL_SLICE_S, so heartbeats, health pages and jobs
never wait on the control log. `read_to_end` (start-up) and `catch_up` (read-your-writes before a job
naming an unknown adapter) wait for the same thing: every record up to the end offsets as of the call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from lorabus.scheduler import AdapterSpec, Engine
from lorabus.schemas import AdapterActivate, AdapterPublish, AdapterWarm
from lorabus.worker.adapter_loads import AdapterLoads
from lorabus.worker.adapter_paths import AdapterPathError, confine_adapter_path, is_store_path
from lorabus.worker.config import WorkerConfig
from lorabus.worker.control_log import ControlLog, SignedControl, SkippedRecord, admit_record
from lorabus.worker.metrics import Metrics
from lorabus.worker.registry import AdapterHealth, Load, adapter_key
from lorabus.worker.signing import ControlKeys

log = logging.getLogger(__name__)

CONTROL_RETRY_S = 1.0  # after a failed fetch of the control topic (broker away), wait this long
# Applying a large batch of control records gives the event loop back this often (one record takes tens
# of microseconds).
CONTROL_SLICE_S = 0.02
CATCH_UP_LOG_S = 5.0  # how often start-up logs how far it has read the control topic
_LOG_DETAIL = 300  # characters of a skipped record's reason worth a log line


class ControlRejected(Exception):
    """A well-formed control event that cannot be applied (e.g. activating a version never published)."""


class ControlReader:
    def __init__(self, config: WorkerConfig, engine: Engine, control_log: ControlLog, health: AdapterHealth,
                 loads: AdapterLoads, metrics: Metrics, on_change: Callable[[], None]):
        self.config, self.engine, self.log, self.health = config, engine, control_log, health
        self.loads, self.metrics, self.on_change = loads, metrics, on_change
        keys = ControlKeys.load(config.control_key) if config.control_key else None
        self.signed = SignedControl(keys, config.control_max_skew_ms) if keys is not None else None
        self.consumer: AIOKafkaConsumer | None = None
        self._applied: dict[TopicPartition, int] = {}  # partition → one past the last record read
        self._progress = asyncio.Event()  # set after every poll

    async def start(self, parts: list[TopicPartition], **kafka_options) -> None:
        # The control topic is the fleet's state, not a queue: always read whole, whatever auto_offset_reset says.
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.config.bootstrap_servers, enable_auto_commit=False,
                                         auto_offset_reset="earliest", **kafka_options)
        await self.consumer.start()
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)

    @property
    def offset(self) -> int:
        """Control records read (applied or ignored); the control topic has one partition."""
        return sum(self._applied.values())

    async def run(self) -> None:
        """Apply every control record in order, for as long as the worker runs."""
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("reading the control topic failed (%s); retrying", exc)
                await asyncio.sleep(CONTROL_RETRY_S)
                continue
            slice_ends = time.monotonic() + CONTROL_SLICE_S
            for tp, records in batches.items():
                for record in records:
                    self._apply(record)
                    self._applied[tp] = record.offset + 1
                    if time.monotonic() >= slice_ends:
                        await asyncio.sleep(0)
                        slice_ends = time.monotonic() + CONTROL_SLICE_S
            if batches:
                if self.loads.active:  # at start-up, loads begin once the whole log is read
                    self.loads.load_what_serves()
                self.on_change()
            self._progress.set()

    async def read_to_end(self) -> None:
        """Start-up: apply the topic up to its end as of now, however long that takes. A large log is no
        error: the worker is not in the jobs group yet, the event loop keeps serving, and SIGTERM stops it.
        Progress is logged every CATCH_UP_LOG_S."""
        while True:
            try:
                ends = await self.consumer.end_offsets(list(self.consumer.assignment()))
                break
            except KafkaError as exc:  # a broker away or slow: the records will still be there
                log.warning("control topic end offsets not read (%s); retrying", exc)
                await asyncio.sleep(CONTROL_RETRY_S)
        started = time.monotonic()
        total = sum(ends.values())
        await self._wait_applied(ends, deadline=None, every=lambda: log.info(
            "reading the control topic: %d of %d records", self.offset, total))
        log.info("control topic read: %d records in %.1f s", self.offset, time.monotonic() - started)

    async def catch_up(self) -> None:
        """Wait until every control event published before now has been applied (read-your-writes);
        TimeoutError after control_wait_ms."""
        ends = await self.consumer.end_offsets(list(self.consumer.assignment()))
        await self._wait_applied(ends, deadline=time.monotonic() + self.config.control_wait_ms / 1000)

    async def _wait_applied(self, ends: dict[TopicPartition, int], deadline: float | None,
                            every: Callable[[], None] | None = None) -> None:
        next_log = time.monotonic() + CATCH_UP_LOG_S
        while any(self._applied.get(tp, 0) < end for tp, end in ends.items()):
            self._progress.clear()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("control topic did not catch up")
            try:
                await asyncio.wait_for(self._progress.wait(), remaining)
            except asyncio.TimeoutError:
                pass
            if every is not None and time.monotonic() >= next_log:
                every()
                next_log = time.monotonic() + CATCH_UP_LOG_S

    # ---- one record ---------------------------------------------------------------------------------

    def _apply(self, record) -> None:
        try:  # signature, event, key and (signed) freshness: the rule the CLI folds by too
            event = admit_record(self.log, record, self.signed)
        except SkippedRecord as skip:
            self._ignore(record, skip.reason, skip.detail)
            return
        if isinstance(event, str):
            # A tombstone under a control key deletes it, as compaction will (and may already have).
            self.log.clear(record.offset, event)
            return
        try:
            self._apply_event(record.offset, event)
        except ControlRejected as exc:
            self._ignore(record, "rejected", str(exc))
        except Exception as exc:  # a bug here must cost one record, never the control reader
            log.exception("control record %s@%d failed", record.topic, record.offset)
            self._ignore(record, "internal", f"{type(exc).__name__}: {exc}")

    def _ignore(self, record, reason: str, detail: str) -> None:
        self.metrics.control_ignored.labels(reason).inc()
        log.warning("control record %s-%d@%d ignored (%s): %s", record.topic, record.partition, record.offset,
                    reason, detail[:_LOG_DETAIL])

    def _apply_event(self, offset: int, event) -> None:
        """Fold an event into the control log and act on it. Events are not judged by what came before
        them (see worker/control_log.py); ControlRejected only for a publish this worker may not read."""
        before = self.log.published(event.name, event.version) if isinstance(event, AdapterPublish) else None
        self.log.apply(offset, event)
        match event:
            case AdapterPublish(name=name, version=version):
                key = adapter_key(name, version)
                if before is None or (before.path, before.sha256) != (event.path, event.sha256):
                    self.health.forget(key)  # new content: whatever loaded or failed before says nothing
                if not is_store_path(event.path):  # an s3:// version is registered once fetched (AdapterLoads)
                    self._register(key, event)
                # A new version is tried at once, so status (and --wait) can tell it loads; at start-up
                # only what serves is loaded, once the whole log is read (AdapterLoads.start).
                if self.loads.active and self.health.state(key) is None:
                    self.loads.load(key)
            case AdapterActivate(name=name, version=version) if self.log.published(name, version) is None:
                log.info("activation of %s@%s: that version is not published; it counts once it is", name, version)
            case AdapterWarm(name=name, version=version):
                if not self.loads.active:
                    pass  # a warm-up read at start-up is history: what serves is loaded once the log is read
                elif self.log.published(name, version) is None:
                    log.info("warm-up of %s@%s skipped: that version is not published", name, version)
                else:
                    self.loads.load(adapter_key(name, version))

    def _register(self, key: str, event: AdapterPublish) -> None:
        """Register a local version with the engine, its path confined to the adapter roots."""
        try:
            path = confine_adapter_path(event.path, self.config.adapter_root)
        except AdapterPathError as exc:  # published, but never loaded: its jobs get adapter_load_failed
            self.health.set(key, Load.FAILED, f"{key}: {exc}")
            raise ControlRejected(str(exc)) from None
        self.engine.register(AdapterSpec(key, path, event.sha256))
