"""The worker process: Kafka in, engine in the middle, Kafka out.

Three asyncio tasks share one event loop: the control reader (adapter events → registry → engine),
the jobs reader (one task per record: decode → validate → resolve → engine → one `Outgoing`, its
result or dead letter), and the committer (answered offsets → the group). The engine runs on its own
threads; the only hand-off is `Engine.submit(..., on_done)`, whose callback resolves an asyncio future
via `call_soon_threadsafe`. How answers leave and when offsets commit is `worker/output.py`'s job:
at-least-once by default, one transaction per commit interval with `--exactly-once`. Either way a
record's offset commits only once every record before it in its partition has been answered.

No record can stop this process: decoding errors of any kind become `invalid_job` answers or dead
letters, the control reader skips what it cannot apply, and CPU-heavy decoding and tokenizing run off
the event loop, so heartbeats and other jobs' results never wait on one record.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import time
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from lorabus.scheduler import AdapterSpec, Completion, Engine, Request
from lorabus.scheduler.adapter_manager import mix_spec
from lorabus.schemas import (AdapterActivate, AdapterPublish, AdapterWarm, Job, JobError, JobResult, decode_job,
                             encode, error_result)
from lorabus.worker import logs
from lorabus.worker.adapter_paths import AdapterPathError, confine_adapter_path
from lorabus.worker.affinity import HomeAdapters, adapter_hint
from lorabus.worker.aiokafka_compat import finish_consumer_stop, install_tolerant_records
from lorabus.worker.client import topic_partitions
from lorabus.worker.config import WorkerConfig
from lorabus.worker.kafka_security import client_options
from lorabus.worker.lag import ConsumerLag
from lorabus.worker.load_retry import LoadRetries
from lorabus.worker.control_log import ControlLog, SignedControl, SkippedRecord, admit_record
from lorabus.worker.health import HealthChecks
from lorabus.worker.metrics import Metrics
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.output import AtLeastOnceOutput, Outgoing, TransactionalOutbox
from lorabus.worker.producer import ResultProducer, truncated_copy
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load, ResolvedAdapter, adapter_key, is_mix_key
from lorabus.worker.reply_topics import ReplyRules
from lorabus.worker.signing import ControlKeys
from lorabus.worker.status import StatusReporter
from lorabus.worker.topics import check_control_topic, ensure_worker_topics
from lorabus.worker.translate import ok_result, provenance, to_request

log = logging.getLogger(__name__)

# Records larger than this are decoded on a worker thread, so a big one never stalls the event loop
# (heartbeats, other jobs' results); smaller ones decode faster inline than a thread hop costs.
INLINE_DECODE_BYTES = 64 << 10
# A reply_to topic missing from the cluster's topic list is looked for again every TOPICS_RECHECK_S
# (a just-created topic takes a moment to appear in metadata) until REPLY_TOPIC_WAIT_S have passed.
TOPICS_RECHECK_S = 0.25
REPLY_TOPIC_WAIT_S = 2.0
# Kafka refuses records over its message.max.bytes (1 MiB by default): an answer larger than this is
# replaced by a smaller one before sending (an error result, or a truncated copy of a dead letter);
# a topic with a smaller limit gets the same replacement when it refuses the record.
MAX_OUTGOING_BYTES = 1_000_000
DLQ_REASON_BYTES = 4096
# After a failed fetch of the control topic (broker away), wait this long before the next one.
CONTROL_RETRY_S = 1.0
# Applying a large batch of control records gives the event loop back this often, so heartbeats, health
# pages and jobs never wait on the control log (one record takes tens of microseconds).
CONTROL_SLICE_S = 0.02
CATCH_UP_LOG_S = 5.0  # how often start-up logs how far it has read the control topic
# How often at most the worker tells the engine which adapters its partitions bring (a dict copy each time).
AFFINITY_PUSH_S = 0.5
# On SIGTERM, how long the last commit and each client's close may take (they run side by side): a broker
# that is away makes aiokafka wait for it forever.
CLOSE_TIMEOUT_S = 5.0
_LOG_DETAIL = 300  # characters of a bad record's parse error worth a log line


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: "Worker"):
        self.worker = worker

    async def on_partitions_revoked(self, revoked):
        # Commit what is answered; records still in flight will be re-read by the next owner.
        await self.worker.commit(only=set(revoked))
        for tp in revoked:
            state = self.worker.partitions.pop(tp, None)
            if state is not None:
                state.revoked = True
            self.worker.home.drop(tp)
            self.worker.metrics.drop_lag(tp.topic, tp.partition)

    async def on_partitions_assigned(self, assigned):
        for tp in assigned:
            self.worker.partitions[tp] = PartitionOffsets()
        # A rebalance clears the consumer's pause on reassigned partitions: apply ours again.
        self.worker.apply_backpressure()


@dataclass
class _DeadLetter:
    code: str
    reason: str


class ControlRejected(Exception):
    """A well-formed control event that cannot be applied (e.g. activating a version never published)."""


class StartupError(Exception):
    """A setting the worker cannot start with (e.g. a taken metrics port): one line naming the flag."""


def metrics_port_error(port: int, exc: OSError) -> StartupError:
    return StartupError(f"--metrics-port {port}: cannot listen ({exc.strerror or exc}); stop what holds it or "
                        "pick another port (0 = any free port, -1 = off)")


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine | None = None):
        self.config = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        # Every Kafka client below connects with these; bad TLS/SASL settings fail here, before the model loads.
        self.kafka_options = client_options(config.security)
        self.engine = engine or Engine(config.model, config.engine)
        self.metrics = Metrics(config.metrics_max_adapters)
        self.checks = HealthChecks(self)  # /healthz and /readyz
        self.control_log = ControlLog()
        self.health = AdapterHealth()
        self.registry = AdapterRegistry(self.control_log, self.health)
        self._load_retries = LoadRetries(config.adapter_retry_ms / 1000, config.adapter_retry_max_ms / 1000,
                                         self._retry_load)
        self.control_keys = ControlKeys.load(config.control_key) if config.control_key else None
        self.signed_control = (SignedControl(self.control_keys, config.control_max_skew_ms)
                               if self.control_keys is not None else None)
        self.reply_rules = ReplyRules.from_config(config)  # which reply_to topics each tenant may name
        self.partitions: dict[TopicPartition, PartitionOffsets] = {}
        self.inflight: set[asyncio.Task] = set()
        self.metrics_port: int | None = None
        self.metrics_server = None
        self.consuming = False  # the jobs consumer has started
        self._control_applied: dict[TopicPartition, int] = {}
        self._control_progress = asyncio.Event()
        self._health_changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False  # set once the control log read at start-up has been applied and settled
        self._log_read = False  # the control log as of start-up has been applied: loads may begin
        # Warm-ups wait here in order and go to the engine at most `max_warmups` at a time, so a log of
        # many names never puts thousands of them in the engine's queue ahead of jobs.
        self._warm_queue: collections.deque[str] = collections.deque()
        self._warm_queued: set[str] = set()
        self._warming = 0  # warm-ups handed to the engine and not answered yet
        self._stop = asyncio.Event()
        self._known_topics: set[str] = set()
        self._topics_checked_at = float("-inf")
        self._topics_lock = asyncio.Lock()
        self._give_up = asyncio.Event()  # set when a stopping worker stops waiting for the broker
        self.outbox: TransactionalOutbox | None = None
        self.home = HomeAdapters()  # adapters this worker's partitions bring: the engine's eviction hint
        self._home_pushed = (-1, float("-inf"))  # (HomeAdapters.version, monotonic time) last handed over

    # ---- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        install_tolerant_records()
        self._loop = asyncio.get_running_loop()
        if cfg.metrics_port >= 0:
            try:
                self.metrics_server = self.metrics.serve(cfg.metrics_host, cfg.metrics_port, self.checks.pages())
                self.metrics_port = self.metrics_server.server_address[1]
            except OSError as exc:  # taken by another process, or a port this user may not bind
                raise metrics_port_error(cfg.metrics_port, exc) from None
            log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", cfg.metrics_host, self.metrics_port)
        self.engine.start()
        # After the health pages are up: while the broker is away, /readyz says so.
        await ensure_worker_topics(cfg)
        if cfg.exactly_once:
            # Stable across restarts with a group instance id, so a restarted worker fences its predecessor.
            txn_id = f"lorabus-{cfg.group_id}-{cfg.group_instance_id or self.worker_id}"
            self.outbox = self.output = TransactionalOutbox(cfg.bootstrap_servers, txn_id, cfg.group_id, linger_ms=2,
                                                            **self.kafka_options)
            await self.outbox.start()
        else:
            self.producer = ResultProducer(cfg.bootstrap_servers, self._give_up, **self.kafka_options)
            self.output = AtLeastOnceOutput(self.producer, self._give_up)
            await self.producer.start()
        self._hook_metrics()
        self.admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, **self.kafka_options)
        await self.admin.start()
        broker_task = asyncio.create_task(self.checks.watch_broker(self.admin))
        loop_task = asyncio.create_task(self.checks.watch_loop())
        # The control topic is the fleet's state, not a queue: always read whole, whatever auto_offset_reset says.
        self.control = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, enable_auto_commit=False,
                                        auto_offset_reset="earliest", **self.kafka_options)
        self.jobs = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, group_id=cfg.group_id,
                                     enable_auto_commit=False, auto_offset_reset=cfg.auto_offset_reset,
                                     group_instance_id=cfg.group_instance_id or None, max_poll_records=cfg.max_inflight,
                                     **self.kafka_options)
        self.lag = ConsumerLag(self.jobs, cfg.auto_offset_reset)
        await self.control.start()
        control_parts = await topic_partitions(cfg.bootstrap_servers, cfg.control_topic, security=cfg.security)
        await check_control_topic(self.admin, cfg.control_topic, len(control_parts))
        self.control.assign(control_parts)
        await self.control.seek_to_beginning(*control_parts)
        self.status = StatusReporter(self, cfg.bootstrap_servers, cfg.status_topic, cfg.status_interval_ms,
                                     cfg.security)
        await self.status.start()
        control_task = asyncio.create_task(self._control_loop())
        tasks = [broker_task, loop_task, control_task]
        try:
            # A large control log takes a while: SIGTERM meanwhile stops the worker at once.
            if not await self._unless_stopped(self._start_up()):
                log.info("stopped while starting up (%d control records read)", self.control_offset)
                return
            self._started = True
            self.jobs.subscribe([cfg.jobs_topic], listener=_Rebalance(self))
            await self.jobs.start()
            self.consuming = True
            tasks.append(asyncio.create_task(self._commit_loop()))
            log.info("worker %s consuming %s as group %s", self.worker_id, cfg.jobs_topic, cfg.group_id)
            await self._jobs_loop()
        finally:
            # Graceful stop: no new records, finish and answer what is held (within the drain timeout), commit, leave.
            await self._drain()
            await _bounded("the last commit", self.commit())  # a broker away: left to the next owner
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Every client closes, each bounded, whatever the others do: a broker away cannot say goodbye.
            await asyncio.gather(_bounded("the jobs consumer", _stop_consumer(self.jobs)),
                                 _bounded("the control consumer", _stop_consumer(self.control)),
                                 _bounded("the status reporter", self.status.stop()),
                                 _bounded("the result producer", (self.outbox or self.producer).stop()),
                                 _bounded("the admin client", self.admin.close()))
            await asyncio.to_thread(self.engine.stop)
            if self.metrics_server is not None:
                await asyncio.to_thread(self.metrics_server.shutdown)
                self.metrics_server.server_close()
            log.info("worker %s stopped", self.worker_id)

    async def _start_up(self) -> None:
        """Every published adapter known before the first job, and what serves loaded: a restarted worker
        serves what it served."""
        await self._read_control_to_end()
        # What serves, queued in slices: tens of thousands of names must not hold the event loop either.
        slice_ends = time.monotonic() + CONTROL_SLICE_S
        for key in self.registry.to_load():
            if self.health.state(key) is None:
                self._load(key)
            if time.monotonic() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.monotonic() + CONTROL_SLICE_S
        self._log_read = True  # from here every event and every finished load asks for what serves next
        self._load_what_serves()  # what changed while the slices were queued
        await self.settle_loads()

    async def _unless_stopped(self, step) -> bool:
        """Run a start-up step until it is done (True) or the worker is told to stop (False: it is cancelled)."""
        work = asyncio.ensure_future(step)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this wait is itself cancelled: the step never outlives it
            stopped.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            return False
        work.result()  # its error, if it failed
        return True

    async def _drain(self) -> None:
        if not self.inflight:
            return
        _, late = await asyncio.wait(set(self.inflight), timeout=self.config.drain_timeout_ms / 1000)
        if late:
            log.warning("%d held jobs not answered within %d ms; left uncommitted for the next owner",
                        len(late), self.config.drain_timeout_ms)
            self._give_up.set()
            if self.outbox is not None:
                await self.outbox.stop()
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def caught_up(self) -> bool:
        """The control log read at start-up has been applied (and the loads it asked for settled)."""
        return self._started

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _hook_metrics(self) -> None:
        m = self.metrics
        m.watch_engine(self.engine.stats)
        m.inflight.set_function(lambda: len(self.inflight))
        if self.outbox is not None:
            m.watch_output(lambda: {"transactions": self.outbox.transactions,
                                    "failed_transactions": self.outbox.failed_transactions})
        else:
            p = self.producer
            m.watch_output(lambda: {"send_retries": p.retries, "sends_retried": p.sends_retried,
                                    "producer_recreations": p.recreations, "dead_letters_truncated": p.truncated})

        def on_step(seqs, tokens, adapters, _seconds):
            m.batch_size.observe(seqs)
            m.step_tokens.observe(tokens)
            m.step_adapters.observe(adapters)

        def on_load(key, seconds, error):
            if error is None:
                m.adapter_load.observe(seconds)
            if not is_mix_key(key):  # a mix is no published version: its members' loads are what health tracks
                self._from_engine(self._loaded, key, Load.READY if error is None else Load.FAILED, error)

        self.engine.on_step, self.engine.on_load = on_step, on_load

    # ---- control topic ----------------------------------------------------------------------------

    async def _control_loop(self) -> None:
        """Apply every control record in order; no record and no broker error ends this loop. A large batch
        gives the event loop back every CONTROL_SLICE_S (heartbeats, health pages, jobs)."""
        while True:
            try:
                batches = await self.control.getmany(timeout_ms=200)
            except KafkaError as exc:
                log.warning("reading the control topic failed (%s); retrying", exc)
                await asyncio.sleep(CONTROL_RETRY_S)
                continue
            slice_ends = time.monotonic() + CONTROL_SLICE_S
            for tp, records in batches.items():
                for record in records:
                    self._apply_control(record)
                    self._control_applied[tp] = record.offset + 1
                    if time.monotonic() >= slice_ends:
                        await asyncio.sleep(0)
                        slice_ends = time.monotonic() + CONTROL_SLICE_S
            if batches:
                if self._log_read:  # at start-up, loads begin once the whole log is read (_start_up)
                    self._load_what_serves()
                self.status.changed()
            self._control_progress.set()

    @property
    def control_offset(self) -> int:
        """Control records read (applied or ignored); the control topic has one partition."""
        return sum(self._control_applied.values())

    def _apply_control(self, record) -> None:
        try:  # signature, event, key and (signed) freshness: the rule the CLI folds by too
            event = admit_record(self.control_log, record, self.signed_control)
        except SkippedRecord as skip:
            self._ignore_control(record, skip.reason, skip.detail)
            return
        if isinstance(event, str):
            # A tombstone under a control key deletes it, as compaction will (and may already have: then
            # it finds nothing).
            self.control_log.clear(record.offset, event)
            return
        try:
            self._apply_event(record.offset, event)
        except ControlRejected as exc:
            self._ignore_control(record, "rejected", str(exc))
        except Exception as exc:  # a bug here must cost one record, never the control reader
            log.exception("control record %s@%d failed", record.topic, record.offset)
            self._ignore_control(record, "internal", f"{type(exc).__name__}: {exc}")

    def _ignore_control(self, record, reason: str, detail: str) -> None:
        self.metrics.control_ignored.labels(reason).inc()
        log.warning("control record %s-%d@%d ignored (%s): %s", record.topic, record.partition, record.offset,
                    reason, detail[:_LOG_DETAIL])

    def _apply_event(self, offset: int, event) -> None:
        """Fold an event into the control log and act on it. Events are not judged by what came before
        them (see worker/control_log.py); ControlRejected only for a publish this worker may not read."""
        log_ = self.control_log
        before = log_.published(event.name, event.version) if isinstance(event, AdapterPublish) else None
        log_.apply(offset, event)
        match event:
            case AdapterPublish(name=name, version=version):
                key = adapter_key(name, version)
                if before is None or (before.path, before.sha256) != (event.path, event.sha256):
                    self.health.forget(key)  # new content: whatever loaded or failed before says nothing
                try:
                    path = confine_adapter_path(event.path, self.config.adapter_root)
                except AdapterPathError as exc:  # published, but never loaded: its jobs get adapter_load_failed
                    self.health.set(key, Load.FAILED, f"{key}: {exc}")
                    raise ControlRejected(str(exc)) from None
                self.engine.register(AdapterSpec(key, path, event.sha256))
                # A new version is tried at once, so status (and --wait) can tell it loads. Reading the log at
                # start-up, only what serves is loaded, once it is all read (_start_up): a name's versions
                # are history, and loading each of thousands would only evict the others.
                if self._log_read and self.health.state(key) is None:
                    self._load(key)
            case AdapterActivate(name=name, version=version) if log_.published(name, version) is None:
                log.info("activation of %s@%s: that version is not published; it counts once it is", name, version)
            case AdapterWarm(name=name, version=version):
                if not self._log_read:
                    pass  # a warm-up read at start-up is history: what serves is loaded once the log is read
                elif log_.published(name, version) is None:
                    log.info("warm-up of %s@%s skipped: that version is not published", name, version)
                else:
                    self._load(adapter_key(name, version))

    # ---- loads: safe activation -------------------------------------------------------------------

    def _load_what_serves(self) -> None:
        """Warm up the next version each name and each route should serve, if it has not been tried here."""
        for key in self.registry.to_load():
            self._load(key)

    def _load(self, key: str) -> None:
        """Load a version and run one dummy step on it; traffic moves to it only once it is ready. Queued
        behind the warm-ups already asked for, at most `max_warmups` of them in the engine at once."""
        self.health.set(key, Load.LOADING)
        if key not in self._warm_queued:
            self._warm_queued.add(key)
            self._warm_queue.append(key)
        self._start_warmups()

    def _start_warmups(self) -> None:
        """Hand queued warm-ups to the engine while fewer than `max_warmups` are there (none once stopping:
        the engine would only answer them `internal`)."""
        while self._warm_queue and self._warming < self.config.max_warmups and not self.stopping:
            key = self._warm_queue.popleft()
            self._warm_queued.discard(key)
            name, _, version = key.partition("@")
            if self.control_log.published(name, version) is None:  # retired while it waited
                self.health.forget(key)
                continue
            if self.health.state(key) is not Load.LOADING:  # a job's load got there first
                continue
            self._warming += 1
            self.engine.warm(key, self._warm_done(key))

    def _warm_done(self, key: str):
        def done(c: Completion) -> None:  # on an engine thread
            if c.status == "ok":
                state, reason = Load.READY, None
            elif c.error_code in ("adapter_load_failed", "adapter_not_found"):
                state, reason = Load.FAILED, c.error_message
            else:  # e.g. the engine is stopping: nothing learned about the adapter
                state, reason = None, c.error_message
            self._from_engine(self._warmed, key, state, reason)

        return done

    def _warmed(self, key: str, state: Load | None, reason: str | None) -> None:
        self._warming -= 1
        self._loaded(key, state, reason)
        self._start_warmups()

    def _from_engine(self, fn, *args) -> None:
        """Run `fn(*args)` on the event loop, called from an engine thread; dropped once the loop has closed."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the worker has stopped: nothing left to tell
            pass

    def _loaded(self, key: str, state: Load | None, reason: str | None) -> None:
        """A load (warm-up or a job's) finished: record it; a failure moves on to the next version in order."""
        if state is None:
            if self.health.state(key) is Load.LOADING:
                self.health.forget(key)
            changed = True
        else:
            changed = self.health.set(key, state, reason)
            if state is Load.FAILED and changed:
                log.warning("adapter %s failed to load: %s", key, reason)
                self.metrics.adapter_load_failures.inc()
        if state is Load.FAILED:  # its file may be restored: tried again later (worker/load_retry.py)
            self._load_retries.failed(key)
        elif state is Load.READY:
            self._load_retries.settled(key)
        if changed:
            if state is not None and self._log_read:
                self._load_what_serves()
            self.status.changed()
            self._health_changed.set()

    def _retry_load(self, key: str) -> None:
        """A failed version's next try: loaded again as at publish, while it still fails here and the engine
        holds what is published (a re-publish whose path was refused keeps failing until the next one)."""
        name, _, version = key.partition("@")
        publish = self.control_log.published(name, version)
        spec = self.engine.adapters.spec(key)
        if self.stopping or publish is None or spec is None or self.health.state(key) is not Load.FAILED:
            self._load_retries.settled(key)
            return
        try:
            path = confine_adapter_path(publish.path, self.config.adapter_root)
        except AdapterPathError:
            path = None
        if (spec.path, spec.sha256) != (path, publish.sha256):
            self._load_retries.settled(key)
            return
        log.info("trying adapter %s again (it failed: %s)", key, self.health.failure(key))
        self._load(key)

    async def settle_loads(self) -> None:
        """Wait until no version that serves here is still loading (bounded by control_wait_ms)."""
        deadline = time.monotonic() + self.config.control_wait_ms / 1000
        while self.health.loading:
            self._health_changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("adapters still loading after %d ms; serving meanwhile", self.config.control_wait_ms)
                return
            try:
                await asyncio.wait_for(self._health_changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def _read_control_to_end(self) -> None:
        """Start-up: apply the control topic up to its end as of now, however long that takes. A large log
        is no error: the worker is not in the jobs group yet, the event loop keeps serving (see
        _control_loop), and SIGTERM stops it (_unless_stopped). Progress is logged every CATCH_UP_LOG_S."""
        parts = list(self.control.assignment())
        while True:
            try:
                ends = await self.control.end_offsets(parts)
                break
            except KafkaError as exc:  # a broker away or slow: the records will still be there
                log.warning("control topic end offsets not read (%s); retrying", exc)
                await asyncio.sleep(CONTROL_RETRY_S)
        started = time.monotonic()
        next_log = started + CATCH_UP_LOG_S
        while any(self._control_applied.get(tp, 0) < end for tp, end in ends.items()):
            self._control_progress.clear()
            await self._control_progress.wait()  # set after every poll of the control topic
            if time.monotonic() >= next_log:
                log.info("reading the control topic: %d of %d records", self.control_offset, sum(ends.values()))
                next_log = time.monotonic() + CATCH_UP_LOG_S
        log.info("control topic read: %d records in %.1f s", self.control_offset, time.monotonic() - started)

    async def catch_up_control(self) -> None:
        """Wait until every control event published before now has been applied (read-your-writes)."""
        parts = list(self.control.assignment())
        ends = await self.control.end_offsets(parts)
        deadline = time.monotonic() + self.config.control_wait_ms / 1000
        while any(self._control_applied.get(tp, 0) < end for tp, end in ends.items()):
            self._control_progress.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("control topic did not catch up")
            try:
                await asyncio.wait_for(self._control_progress.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    # ---- jobs topic -------------------------------------------------------------------------------

    def apply_backpressure(self) -> None:
        """Pause every assigned partition while `max_inflight` jobs are held, resume below it.

        Reads the consumer's own pause state each time, so a rebalance that dropped it cannot fool us;
        pausing keeps the poll loop (and group membership) alive, unlike not polling."""
        parts = self.jobs.assignment()
        if len(self.inflight) >= self.config.max_inflight:
            self.jobs.pause(*parts)
        else:
            paused = self.jobs.paused()
            self.jobs.resume(*[tp for tp in parts if tp in paused])

    async def _jobs_loop(self) -> None:
        while not self._stop.is_set():
            self.apply_backpressure()
            room = self.config.max_inflight - len(self.inflight)
            try:
                batches = await self.jobs.getmany(timeout_ms=100, max_records=max(room, 1))
            except KafkaError as exc:  # the consumer retries by itself; keep polling
                log.warning("fetching jobs failed: %s", exc)
                continue
            for tp, records in batches.items():
                offsets = self.partitions.setdefault(tp, PartitionOffsets())
                for record in records:
                    if len(self.inflight) >= self.config.max_inflight:
                        # Only reachable when a rebalance un-paused a partition between polls: hand
                        # the rest back (seek), so in-flight jobs never exceed the bound.
                        self.jobs.seek(tp, record.offset)
                        break
                    offsets.begin(record.offset)
                    self.metrics.jobs_consumed.inc()
                    task = asyncio.create_task(self._handle(record, offsets))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
                    self._look_ahead(record)
            self._push_affinity()

    def _look_ahead(self, record) -> None:
        """Start loading a fetched record's adapter into a free device slot now, from its header or affinity
        key, before its body is decoded, resolved and tokenized. Only into a free slot: with every slot
        taken, a prefetch would evict an adapter that the records just fetched with it need, or load into
        the host tier only and then again into a slot (measured: twice the loads under affinity keys);
        the engine then loads queued jobs' adapters in admission order itself. The engine checks for a free
        slot on its own thread, where the slot table lives. Records aiokafka has fetched but not yet
        returned cannot be read (its buffer is private, and pausing a partition drops it)."""
        hint = adapter_hint(record.key, record.headers)
        if hint is None:
            return
        try:
            key = self.registry.resolve(hint, "").key
        except (JobError, ValueError):  # malformed, unknown yet, or tenant-restricted: the job itself will tell
            return
        if self.health.failure(key) is None:
            self.engine.prefetch(key, free_slot_only=True)

    def _push_affinity(self) -> None:
        """Hand the engine the adapters of this worker's partitions, at most every AFFINITY_PUSH_S."""
        version, pushed_at = self._home_pushed
        now = time.monotonic()
        if self.home.version != version and now - pushed_at >= AFFINITY_PUSH_S:
            self.engine.set_adapter_affinity(self.home.scores())
            self._home_pushed = (self.home.version, now)

    async def _handle(self, record, offsets: PartitionOffsets) -> None:
        """Answer one record (result or dead letter); only an answered record's offset may commit."""
        started = time.monotonic()
        result = None
        try:
            answer = await self._answer(record)
        except Exception as exc:  # a bug costs this record a dead letter, never its partition's commits
            log.exception("record %s-%d@%d failed", record.topic, record.partition, record.offset)
            answer = _DeadLetter("internal", f"{type(exc).__name__}: {exc}")
        if isinstance(answer, _DeadLetter):
            outgoing = self._dead_letter(record, answer.code, answer.reason)
        else:
            result, reply_to = answer
            outgoing = self._result_record(result, reply_to)
        tp = TopicPartition(record.topic, record.partition)
        if not await self.output.deliver(outgoing, tp, record.offset, offsets):
            return  # the worker is stopping: uncommitted, so the partition's next owner answers it
        if result is not None:
            self._log_answer(result, time.monotonic() - started)
        if result is not None and result.task is not None:
            if result.mix:  # a route's mix target: counted like a mix job's completion
                self.metrics.count_routed(result.task, "mix", "", result.status)
            else:
                self.metrics.count_routed(result.task, result.adapter, result.adapter_version, result.status)
        if result is None:
            self.metrics.dead_letters.inc()
        elif result.status == "ok":
            self.metrics.job_results.labels("ok").inc()
            # adapter None: the base model
            self.metrics.jobs_completed.inc(result.adapter or ("mix" if result.mix else None), result.adapter_version)
            self.metrics.tokens_generated.inc(result.usage.completion_tokens)
            self.metrics.prompt_tokens.inc(result.usage.prompt_tokens)
        else:
            self.metrics.job_results.labels(result.error.code).inc()
            self.metrics.jobs_failed.labels(result.error.code).inc()
        self.metrics.latency.observe(time.monotonic() - started)

    def _log_answer(self, result: JobResult, seconds: float) -> None:
        """One line per answered job (its context bound in _answer): errors at INFO, ok at DEBUG; the
        generated text only with --log-payloads."""
        extra = {"text": result.text} if self.config.log_payloads else {}
        if result.status == "ok":
            log.debug("job answered ok in %.3f s: %d tokens, finish %s", seconds, result.usage.completion_tokens,
                      result.finish_reason, extra=extra)
        else:
            log.info("job answered %s in %.3f s: %s", result.error.code, seconds, result.error.message[:_LOG_DETAIL],
                     extra=extra)

    async def _answer(self, record) -> "tuple[JobResult, str | None] | _DeadLetter":
        """The result for a record and its reply topic, or why it must be dead-lettered instead."""
        try:
            if record.value is not None and len(record.value) > INLINE_DECODE_BYTES:
                job = await asyncio.to_thread(decode_job, record.value, record.headers)
            else:
                job = decode_job(record.value, record.headers)
        except JobError as err:
            if err.job_id is None:
                return _DeadLetter(err.code, err.message)
            logs.bind_job(err.job_id)
            return error_result(err.job_id, err.code, err.message, self.worker_id), None
        # From here every line this task logs names the job (and its prompt only with --log-payloads).
        logs.bind_job(job.id, job.tenant, job.adapter if isinstance(job.adapter, str) else None,
                      prompt=_prompt_text(job) if self.config.log_payloads else None)
        reply_to = job.reply_to
        if reply_to is not None:
            problem = await self._reply_topic_problem(job.tenant, reply_to)
            if problem is not None:  # answered on the default results topic
                code, message = problem
                return error_result(job.id, code, message, self.worker_id), None
        if job.prompt_bytes() > self.config.max_prompt_bytes:  # checked before anything is tokenized
            what = "the prompt is" if job.prompt is not None else "the messages' contents together are"
            return error_result(job.id, "invalid_job", f"{what} longer than {self.config.max_prompt_bytes} "
                                "bytes (max_prompt_bytes)", self.worker_id), reply_to
        try:
            resolved = await self._resolve(job)
            tp = TopicPartition(record.topic, record.partition)
            if resolved is not None and tp in self.partitions:  # not a partition revoked meanwhile
                self.home.seen(tp, resolved.key)
        except JobError as err:
            return error_result(job.id, err.code, err.message, self.worker_id), reply_to
        logs.bind_job(job.id, job.tenant, resolved.key if resolved is not None else None,
                      prompt=_prompt_text(job) if self.config.log_payloads else None)
        failure = self.registry.load_failure(resolved) if resolved is not None else None
        if failure is not None:
            return self._error(job, resolved, "adapter_load_failed", failure), reply_to
        if job.deadline_ms is not None and time.time() * 1000 > job.deadline_ms:
            return self._error(job, resolved, "deadline_exceeded", "the job's deadline passed before it ran"), reply_to
        resolved, completion = await self._generate_or_fall_back(job, resolved)
        if completion.status != "ok":
            return self._error(job, resolved, completion.error_code, completion.error_message), reply_to
        self._observe(completion)
        return ok_result(job, resolved, completion, self.worker_id), reply_to

    async def _resolve(self, job: Job) -> ResolvedAdapter | None:
        if not self.registry.knows_job(job):  # publish (or route) then send is always served
            try:
                await self.catch_up_control()
            except TimeoutError:
                log.warning("control topic not caught up within %d ms", self.config.control_wait_ms)
        resolved = self.registry.resolve_job(job)
        if resolved is not None and resolved.mix:
            self._register_mix(resolved)
        return resolved

    def _register_mix(self, resolved: ResolvedAdapter) -> None:
        """Register a job's mix with the engine, built from its members' current specs: after a member is
        re-published with new content the mix's spec differs, and registering it drops what was cached."""
        members = []
        for member, weight in resolved.mix:
            spec = self.engine.adapters.spec(member.key)
            if spec is None:  # published with a path this worker refuses: nothing to mix
                raise JobError("adapter_load_failed", f"adapter {member.key} cannot be loaded on this worker")
            members.append((spec, weight))
        self.engine.register(mix_spec(members))

    async def _generate_or_fall_back(self, job: Job, resolved: ResolvedAdapter | None
                                     ) -> tuple[ResolvedAdapter | None, Completion]:
        """Generate on `resolved`. If its version fails to load now (e.g. its file changed since it last
        loaded here), a job that named no exact version is served by what serves after that failure, as
        the next job would be: the switch to a version that cannot load falls back. The failure is
        recorded before the job's answer arrives (both reach this loop from the engine's thread, in
        that order), so resolving again sees it; a version is never tried twice for one job."""
        tried: set[str] = set()
        while True:
            completion = await self._generate(to_request(job, resolved, self.config.content_special_tokens))
            if completion.error_code != "adapter_load_failed" or resolved is None:
                return resolved, completion
            tried.add(resolved.key)
            try:
                fallback = await self._resolve(job)
            except JobError:  # e.g. retired meanwhile: the load failure is the answer
                return resolved, completion
            if fallback is None or fallback.key in tried or self.registry.load_failure(fallback) is not None:
                return resolved, completion
            log.info("adapter %s failed to load for this job (%s); served by %s instead", resolved.key,
                     completion.error_message, fallback.key)
            resolved = fallback

    async def _generate(self, request: Request) -> Completion:
        """The hand-off to the engine: submit from a thread, await the completion on this loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()
        # submit tokenizes the prompt: a thread keeps that off the event loop.
        await asyncio.to_thread(self.engine.submit, request,
                                lambda c: loop.call_soon_threadsafe(_resolve_future, future, c))
        return await future

    def _observe(self, c: Completion) -> None:
        self.metrics.queue_time.observe(c.queue_s)
        if c.ttft_s is not None:
            self.metrics.ttft.observe(c.ttft_s)
            if c.cold:
                self.metrics.cold_start.observe(c.ttft_s)
            if len(c.token_ids) >= 2:  # the first token's time is TTFT's; the rest share what followed it
                self.metrics.tpot.observe((c.total_s - c.ttft_s) / (len(c.token_ids) - 1))

    def _error(self, job: Job, resolved: ResolvedAdapter | None, code: str, message: str) -> JobResult:
        return error_result(job.id, code, message, self.worker_id, **provenance(resolved))

    async def _reply_topic_problem(self, tenant: str, topic: str) -> tuple[str, str] | None:
        """Why a job of `tenant` may not have its result written to `topic`, as (error code, message); None
        when it may. The operator's rules first (worker/reply_topics.py), so a tenant learns nothing of topics
        it may not use, not even whether they exist."""
        refusal = self.reply_rules.refusal(tenant, topic)
        if refusal is not None:
            return "forbidden", refusal
        deadline = time.monotonic() + REPLY_TOPIC_WAIT_S
        while topic not in self._known_topics:
            await self._refresh_topics()
            if topic in self._known_topics:
                break
            if time.monotonic() >= deadline:
                return "invalid_job", f"reply_to topic {topic} does not exist"
            await asyncio.sleep(TOPICS_RECHECK_S)
        return None

    async def _refresh_topics(self) -> None:
        """The cluster's topic list, fetched once for all the jobs that asked while a fetch was running."""
        asked = time.monotonic()
        async with self._topics_lock:
            if self._topics_checked_at >= asked:
                return
            self._known_topics = set(await self.admin.list_topics())
            self._topics_checked_at = time.monotonic()

    def _result_record(self, result: JobResult, reply_to: str | None) -> Outgoing:
        topic, key, value = reply_to or self.config.results_topic, result.id.encode(), encode(result)
        too_large = Outgoing(topic, encode(self._error_like(
            result, "internal", f"the result is {len(value)} bytes, more than its topic accepts")), key)
        if len(value) > MAX_OUTGOING_BYTES:  # over Kafka's default limit: don't even try
            return too_large
        return Outgoing(topic, value, key, if_too_large=too_large)

    def _error_like(self, result: JobResult, code: str, message: str) -> JobResult:
        return error_result(result.id, code, message, self.worker_id, adapter=result.adapter,
                            adapter_version=result.adapter_version, mix=result.mix, task=result.task,
                            route_event_id=result.route_event_id)

    def _dead_letter(self, record, code: str, reason: str) -> Outgoing:
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
            ("x-dlq-worker", self.worker_id.encode()),
        ]
        value, key = record.value, record.key
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers)
        if size > MAX_OUTGOING_BYTES:  # keep its coordinates and a prefix, so its offset can still commit
            value, key, headers = truncated_copy(value, key, headers)
        return Outgoing(self.config.dlq_topic, value, key, headers, dead_letter=True)

    # ---- commits ----------------------------------------------------------------------------------

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit the offsets that every answered record allows (exactly-once: the queued transaction)."""
        if self.outbox is not None:
            await self.outbox.commit(only)
            return
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
            await self.jobs.commit({tp: offset for tp, (offset, _) in offsets.items()})
        except KafkaError as exc:  # e.g. a rebalance in progress: the next round retries
            log.warning("commit failed: %s", exc)
            return
        for offset, state in offsets.values():
            state.committed = offset

    async def _commit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.commit_interval_ms / 1000)
            try:
                await self.commit()
            except Exception:  # the next round retries; this loop must outlive any one failure
                log.exception("commit failed")
            try:
                self.metrics.set_lag(await self.lag.lags(self.partitions))
            except Exception:
                log.exception("consumer lag not measured")


async def _bounded(what: str, closing, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
    """Await one step of the shutdown for at most `timeout_s`; its failure is logged as one line, never
    raised, so the steps after it still run."""
    try:
        await asyncio.wait_for(closing, timeout_s)
    except Exception as exc:  # TimeoutError included
        log.warning("closing %s: %s; going on", what, f"{type(exc).__name__}: {exc}".rstrip(": "))


async def _stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """consumer.stop(), finished by hand when aiokafka 0.14 aborts it halfway: while the broker is away its
    fetcher's close re-raises the CancelledError of a fetch task it cancelled itself, before the other
    tasks and the client are closed (aiokafka_compat.finish_consumer_stop). Our own cancellation is passed on."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            raise
        await finish_consumer_stop(consumer)


def _prompt_text(job: Job) -> str | None:
    """What the job asks, as text for a --log-payloads line: the prompt, or the chat messages as JSON."""
    if job.prompt is not None:
        return job.prompt
    return msgspec.json.encode(job.messages).decode() if job.messages is not None else None


def _resolve_future(future: asyncio.Future, completion: Completion) -> None:
    if not future.done():
        future.set_result(completion)
