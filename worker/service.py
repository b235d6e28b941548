"""The worker process: Kafka in, engine in the middle, Kafka out.

Three asyncio tasks share one event loop: the control reader (worker/control_reader.py: adapter events →
control log → engine, with worker/adapter_loads.py deciding what loads), the jobs reader (one task per
record through the answer pipeline, worker/answers.py: decode → validate → resolve → engine → one
`Outgoing`), and the committer. The engine runs on its own threads; the only hand-off is
`Engine.submit_many`, in batches both ways (worker/handoff.py). How answers leave and when offsets commit is
the output mode's job (worker/output.py): at-least-once by default, one transaction per commit interval with
`--exactly-once`. Either way a record's offset commits only once every record before it in its partition
has been answered, and a job's in-flight seat is free once its answer is handed to the output.

No record can stop this process: decoding errors of any kind become `invalid_job` answers or dead
letters, the control reader skips what it cannot apply, and CPU-heavy decoding and tokenizing run off
the event loop, so heartbeats and other jobs' results never wait on one record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from lorabus.scheduler import Engine
from lorabus.worker.adapter_loads import AdapterLoads
from lorabus.worker.affinity import HomeAdapters, look_ahead
from lorabus.worker.aiokafka_compat import install_tolerant_records, stop_consumer
from lorabus.worker.answers import AnswerPipeline, log_answer
from lorabus.worker.client import topic_partitions
from lorabus.worker.config import WorkerConfig
from lorabus.worker.control_log import ControlLog
from lorabus.worker.control_reader import ControlReader
from lorabus.worker.health import HealthChecks, serve_http
from lorabus.worker.kafka_security import client_options
from lorabus.worker.lag import ConsumerLag
from lorabus.worker.lanes import LaneShares, LaneTable
from lorabus.worker.metrics import Metrics
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.output import AtLeastOnceOutput, TransactionalOutbox
from lorabus.worker.producer import ResultProducer
from lorabus.worker.registry import AdapterHealth, AdapterRegistry
from lorabus.worker.reply_topics import ReplyRules, ReplyTopics
from lorabus.worker.status import StatusReporter
from lorabus.worker.topics import check_control_topic, ensure_worker_topics

log = logging.getLogger(__name__)

# How often at most the worker tells the engine which adapters its partitions bring (a dict copy each time).
AFFINITY_PUSH_S = 0.5
# On SIGTERM, how long the last commit and each client's close may take (they run side by side): a broker
# that is away makes aiokafka wait for it forever.
CLOSE_TIMEOUT_S = 5.0
# The longest a poll for jobs waits for records (and the jobs loop for a free seat).
POLL_MS = 100


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


class StartupError(Exception):
    """A setting the worker cannot start with (e.g. a taken metrics port): one line naming the flag."""


def metrics_port_error(port: int, exc: OSError) -> StartupError:
    return StartupError(f"--metrics-port {port}: cannot listen ({exc.strerror or exc}); stop what holds it or "
                        "pick another port (0 = any free port, -1 = off)")


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine | None = None):
        self.config = cfg = config
        self.worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        # Every Kafka client below connects with these; bad TLS/SASL settings fail here, before the model loads.
        self.kafka_options = client_options(config.security)
        self.engine = engine or Engine(config.model, config.engine)
        self.metrics = Metrics(config.metrics_max_adapters)
        self.health_checks = HealthChecks(self)  # /healthz and /readyz
        self.control_log = ControlLog()
        self.adapter_health = AdapterHealth()
        self.registry = AdapterRegistry(self.control_log, self.adapter_health)
        self.loads = AdapterLoads(cfg, self.engine, self.control_log, self.registry, self.adapter_health,
                                  self.metrics, self._state_changed, lambda: self.stopping)
        self.control = ControlReader(cfg, self.engine, self.control_log, self.adapter_health, self.loads,
                                     self.metrics, self._state_changed)
        self.lanes = LaneTable.from_config(cfg.lane, cfg.lane_pattern, cfg.lane_results_pattern, cfg.jobs_topic)
        self.shares = LaneShares(self.lanes, cfg.max_inflight)  # what each lane holds of the in-flight window
        self.partitions: dict[TopicPartition, PartitionOffsets] = {}
        self.inflight: set[asyncio.Task] = set()
        self.metrics_port: int | None = None
        self.metrics_server = None
        self.consuming = False  # the jobs consumer has started
        self.status: StatusReporter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False  # set once the control log read at start-up has been applied and settled
        self._stop = asyncio.Event()
        self._give_up = asyncio.Event()  # set when a stopping worker stops waiting for the broker
        self.home = HomeAdapters()  # adapters this worker's partitions bring: the engine's eviction hint
        self._home_pushed = (-1, float("-inf"))  # (HomeAdapters.version, monotonic time) last handed over
        self.producer: ResultProducer | None = None
        self.output: AtLeastOnceOutput | TransactionalOutbox | None = None

    def _build_clients(self) -> None:
        """The jobs consumer, the admin client, the output and the answer pipeline on them: built once the
        broker has answered (ensure_worker_topics), so bad settings fail in one line, with nothing to close."""
        cfg = self.config
        self.jobs = AIOKafkaConsumer(bootstrap_servers=cfg.bootstrap_servers, group_id=cfg.group_id,
                                     enable_auto_commit=False, auto_offset_reset=cfg.auto_offset_reset,
                                     group_instance_id=cfg.group_instance_id or None, max_poll_records=cfg.max_inflight,
                                     **self.lanes.consumer_options(),
                                     **self.kafka_options)
        self.admin = AIOKafkaAdminClient(bootstrap_servers=cfg.bootstrap_servers, **self.kafka_options)
        self.pipeline = AnswerPipeline(cfg, self.worker_id, self.engine, self.registry, self.control,
                                       ReplyTopics(ReplyRules.from_config(cfg), self.admin.list_topics),
                                       self.lanes, self.metrics, self._resolved, self.loads.fetches)
        log_every_s = cfg.log_rate_limit_ms / 1000
        if cfg.exactly_once:
            # Stable across restarts with a group instance id, so a restarted worker fences its predecessor.
            txn_id = f"lorabus-{cfg.group_id}-{cfg.group_instance_id or self.worker_id}"
            self.output = TransactionalOutbox(cfg.bootstrap_servers, txn_id, cfg.group_id, log_every_s=log_every_s,
                                              max_queued_bytes=cfg.max_uncommitted_bytes, linger_ms=2,
                                              **self.kafka_options)
        else:
            self.producer = ResultProducer(cfg.bootstrap_servers, self._give_up, log_every_s=log_every_s,
                                           **self.kafka_options)
            self.output = AtLeastOnceOutput(self.producer, self._give_up, self.jobs, self.partitions)

    # ---- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        cfg = self.config
        install_tolerant_records()
        self._loop = asyncio.get_running_loop()
        if cfg.metrics_port >= 0:
            try:
                self.metrics_server = serve_http(cfg.metrics_host, cfg.metrics_port, self.metrics.page,
                                                 self.health_checks.pages())
                self.metrics_port = self.metrics_server.server_address[1]
            except OSError as exc:  # taken by another process, or a port this user may not bind
                raise metrics_port_error(cfg.metrics_port, exc) from None
            log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", cfg.metrics_host, self.metrics_port)
        self.engine.start()
        # After the health pages are up: while the broker is away, /readyz says so.
        await ensure_worker_topics(cfg, self.lanes.named_topics())
        self._build_clients()
        await self.output.start()
        self._hook_metrics()
        await self.admin.start()
        broker_task = asyncio.create_task(self.health_checks.watch_broker(self.admin))
        loop_task = asyncio.create_task(self.health_checks.watch_loop())
        self.lag = ConsumerLag(self.jobs, cfg.auto_offset_reset)
        control_parts = await topic_partitions(cfg.bootstrap_servers, cfg.control_topic, security=cfg.security)
        await self.control.start(control_parts, **self.kafka_options)
        await check_control_topic(self.admin, cfg.control_topic, len(control_parts))
        self.status = StatusReporter(self, cfg.bootstrap_servers, cfg.status_topic, cfg.status_interval_ms,
                                     cfg.security)
        await self.status.start()
        tasks = [broker_task, loop_task, asyncio.create_task(self.control.run())]
        try:
            # A large control log takes a while: SIGTERM meanwhile stops the worker at once.
            if not await self._unless_stopped(self._start_up()):
                log.info("stopped while starting up (%d control records read)", self.control_offset)
                return
            self._started = True
            pattern = self.lanes.subscription_pattern()
            if pattern is not None:
                self.jobs.subscribe(pattern=pattern, listener=_Rebalance(self))
            else:
                self.jobs.subscribe(self.lanes.topics(), listener=_Rebalance(self))
            await self.jobs.start()
            self.consuming = True
            tasks.append(asyncio.create_task(self._commit_loop()))
            log.info("worker %s consuming %s as group %s", self.worker_id, pattern or ", ".join(self.lanes.topics()),
                     cfg.group_id)
            await self._jobs_loop()
        finally:
            # Graceful stop: no new records, finish and answer what is held (within the drain timeout), commit, leave.
            await self._drain()
            await _bounded("the last commit", self.commit())  # a broker away: left to the next owner
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Every client closes, each bounded, whatever the others do: a broker away cannot say goodbye.
            await asyncio.gather(_bounded("the jobs consumer", stop_consumer(self.jobs)),
                                 _bounded("the control consumer", stop_consumer(self.control.consumer)),
                                 _bounded("the status reporter", self.status.stop()),
                                 _bounded("the result producer", self.output.stop()),
                                 _bounded("the partials producer", self.pipeline.stop()),
                                 _bounded("the admin client", self.admin.close()),
                                 _bounded("the adapter downloads", self.loads.fetches.stop()))
            await asyncio.to_thread(self.engine.stop)
            if self.metrics_server is not None:
                await asyncio.to_thread(self.metrics_server.shutdown)
                self.metrics_server.server_close()
            log.info("worker %s stopped", self.worker_id)

    async def _start_up(self) -> None:
        """Every published adapter known before the first job, and what serves loaded: a restarted worker
        serves what it served."""
        await self.control.read_to_end()
        await self.loads.start()
        await self.loads.settle()

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

    @property
    def control_offset(self) -> int:
        """Control records read (applied or ignored)."""
        return self.control.offset

    def _state_changed(self) -> None:
        if self.status is not None:
            self.status.changed()

    def _hook_metrics(self) -> None:
        m = self.metrics
        m.watch_engine(self.engine.stats, self.engine.plans)
        m.inflight.set_function(lambda: len(self.inflight))
        m.watch_lanes(lambda: dict(self.shares.held))
        m.watch_output(self.output.counters)

        def on_step(seqs, tokens, adapters, _seconds):
            m.batch_size.observe(seqs)
            m.step_tokens.observe(tokens)
            m.step_adapters.observe(adapters)

        on_adapter_load = self.loads.watch_engine(self._loop)

        def on_load(key, seconds, error, source):
            if error is None:
                m.adapter_load.labels(source).observe(seconds)
            on_adapter_load(key, seconds, error, source)

        self.engine.on_step, self.engine.on_load = on_step, on_load

    # ---- jobs topic -------------------------------------------------------------------------------

    def apply_backpressure(self) -> int:
        """Pause the partitions of every lane that holds its share of `max_inflight` jobs (one jobs topic:
        all of them, once `max_inflight` are held; every one while the exactly-once outbox is full), resume the
        others (worker/lanes.py).

        Reads the consumer's own pause state each time, so a rebalance that dropped it cannot fool us;
        pausing keeps the poll loop (and group membership) alive, unlike not polling. Returns how many jobs
        the lanes may take now, all together."""
        parts = self.jobs.assignment()
        outbox_full = self.output.full
        rooms = {topic: 0 if outbox_full else self.shares.room(topic) for topic in {tp.topic for tp in parts}}
        full = [tp for tp in parts if rooms[tp.topic] == 0]
        if full:
            self.jobs.pause(*full)
        paused = self.jobs.paused()
        self.jobs.resume(*[tp for tp in parts if tp in paused and rooms[tp.topic] > 0])
        return sum(rooms.values())

    async def _jobs_loop(self) -> None:
        while not self._stop.is_set():
            room = self.apply_backpressure()
            # Every lane full: wait for a seat to come free, not in a poll of paused partitions (which would hold
            # freed seats idle until it times out); then poll without waiting, to stay in the group.
            waited = room == 0 and not self.output.full
            if waited and await self.shares.freed(POLL_MS / 1000):
                continue
            try:
                batches = await self.jobs.getmany(timeout_ms=0 if waited else POLL_MS, max_records=max(room, 1))
            except KafkaError as exc:  # the consumer retries by itself; keep polling
                log.warning("fetching jobs failed: %s", exc)
                continue
            for tp, records in batches.items():
                offsets = self.partitions.setdefault(tp, PartitionOffsets())
                for record in records:
                    if len(self.inflight) >= self.shares.hard_bound:
                        # Only reachable when a rebalance un-paused partitions between polls: hand the rest
                        # back (seek), so the jobs held stay bounded. A lane may otherwise take past its share
                        # what one poll brings (at most the rooms of all lanes): it is paused at the next.
                        self.jobs.seek(tp, record.offset)
                        break
                    offsets.begin(record.offset)
                    self.metrics.jobs_consumed.inc()
                    self.metrics.lane_taken(record.topic, record.timestamp)
                    self.shares.took(record.topic)
                    task = asyncio.create_task(self._handle(record, offsets))
                    self.inflight.add(task)
                    task.add_done_callback(self.inflight.discard)
                    look_ahead(record, self.registry, self.adapter_health, self.engine)
            self._push_affinity()

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
        answer = None
        try:
            answer = await self.pipeline.answer(record)
            tp = TopicPartition(record.topic, record.partition)
            delivered = await self.output.deliver(answer.outgoing, tp, record.offset, offsets)
        finally:  # also when cancelled at shutdown: the lane no longer holds it
            result = answer.result if answer is not None else None
            ok = result is not None and result.status == "ok"
            self.shares.done(record.topic, result.usage.prompt_tokens + result.usage.completion_tokens if ok else 0)
        if not delivered:
            return  # the worker is stopping: uncommitted, so the partition's next owner answers it
        seconds = time.monotonic() - started
        if answer.result is not None:
            log_answer(answer.result, seconds, self.config.log_payloads)
        self.metrics.count_answer(answer.result, seconds, lane=record.topic)

    def _resolved(self, record, key: str) -> None:
        """A record's adapter is known: its partition brings that adapter (unless it was revoked meanwhile)."""
        tp = TopicPartition(record.topic, record.partition)
        if tp in self.partitions:
            self.home.seen(tp, key)

    # ---- commits ----------------------------------------------------------------------------------

    async def commit(self, only: set[TopicPartition] | None = None) -> None:
        """Commit the offsets that every answered record allows (exactly-once: the queued transaction)."""
        await self.output.commit(only)

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
