"""The answer pipeline: one consumed record → decoded job → resolved adapter → engine request → the
`Outgoing` that answers it (its result, or a dead letter when not even a job id can be read).

Errors are values here: whatever is wrong with a record becomes an error result with a code (or a dead
letter), never an exception out of `answer`. Decoding a large record and tokenizing run off the event
loop; the engine hand-off batches the jobs of one loop turn into one `Engine.submit_many` and their
answers into one loop callback per step (worker/handoff.py).
A streamed job's partial results leave as the engine makes them (worker/streaming.py), all of them
before its final result is handed over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import msgspec

from lorabus.scheduler import Completion, Engine, Request, mix_spec
from lorabus.schemas import Job, JobError, JobResult, decode_job, error_result
from lorabus.worker import logs
from lorabus.worker.config import WorkerConfig
from lorabus.worker.control_reader import ControlReader
from lorabus.worker.handoff import EngineHandoff
from lorabus.worker.kafka_security import client_options
from lorabus.worker.lanes import Lane, LaneTable
from lorabus.worker.metrics import Metrics
from lorabus.worker.output import Outgoing, dead_letter_record, result_record
from lorabus.worker.registry import AdapterRegistry, ResolvedAdapter
from lorabus.worker.reply_topics import ReplyTopics
from lorabus.worker.store_fetches import StoreFetches
from lorabus.worker.streaming import JobStream, PartialSender
from lorabus.worker.wire import ok_result, provenance, to_request

log = logging.getLogger(__name__)

# Records larger than this are decoded on a worker thread, so a big one never stalls the event loop
# (heartbeats, other jobs' results); smaller ones decode faster inline than a thread hop costs.
INLINE_DECODE_BYTES = 64 << 10
_LOG_DETAIL = 300  # characters of an error message worth a log line


@dataclass
class Answer:
    """What a record is answered with, and its result (None: a dead letter)."""

    outgoing: Outgoing
    result: JobResult | None


@dataclass
class _DeadLetter:
    code: str
    reason: str


class AnswerPipeline:
    def __init__(self, config: WorkerConfig, worker_id: str, engine: Engine, registry: AdapterRegistry,
                 control: ControlReader, reply_topics: ReplyTopics, lanes: LaneTable, metrics: Metrics,
                 on_resolved: Callable[[object, str], None], fetches: StoreFetches):
        self.config, self.worker_id, self.engine, self.registry = config, worker_id, engine, registry
        self.control, self.reply_topics, self.lanes, self.metrics = control, reply_topics, lanes, metrics
        self.on_resolved = on_resolved  # (record, adapter key): which adapters a partition brings
        self.fetches = fetches  # s3:// versions: a job waits for its adapter's download, as for a cold load
        self.handoff = EngineHandoff(engine)
        self.partials = PartialSender(config.bootstrap_servers, metrics, config.log_rate_limit_ms / 1000,
                                      **client_options(config.security))

    async def stop(self) -> None:
        """Close what streamed jobs opened (the partials producer)."""
        await self.partials.stop()

    async def answer(self, record) -> Answer:
        """The answer to one record; a bug costs this record a dead letter, never its partition's commits."""
        lane = self.lanes.lane(record.topic)
        try:
            decided = await self._decide(record, lane)
        except Exception as exc:
            log.exception("record %s-%d@%d failed", record.topic, record.partition, record.offset)
            decided = _DeadLetter("internal", f"{type(exc).__name__}: {exc}")
        if isinstance(decided, _DeadLetter):
            return Answer(dead_letter_record(record, decided.code, decided.reason, self.config.dlq_topic,
                                             self.worker_id), None)
        result, reply_to = decided
        return Answer(result_record(result, reply_to or lane.results or self.config.results_topic), result)

    async def _decide(self, record, lane: Lane) -> "tuple[JobResult, str | None] | _DeadLetter":
        """The result for a record of `lane` and its reply topic (None: the lane's or the worker's results
        topic), or why it must be dead-lettered instead."""
        headers, claimed = _lane_headers(lane, record.headers)
        try:
            if record.value is not None and len(record.value) > INLINE_DECODE_BYTES:
                job = await asyncio.to_thread(decode_job, record.value, headers)
            else:
                job = decode_job(record.value, headers)
        except JobError as err:
            if err.job_id is None:
                return _DeadLetter(err.code, err.message)
            logs.bind_job(err.job_id)
            return error_result(err.job_id, err.code, err.message, self.worker_id), None
        # From here every line this task logs names the job (and its prompt only with --log-payloads).
        logs.bind_job(job.id, job.tenant, job.adapter if isinstance(job.adapter, str) else None,
                      prompt=_prompt_text(job) if self.config.log_payloads else None)
        if lane.tenant is not None and (job.tenant != lane.tenant or claimed not in (None, lane.tenant)):
            other = job.tenant if job.tenant != lane.tenant else claimed
            return error_result(job.id, "forbidden", f"a job in lane {lane.topic} is tenant {lane.tenant}'s; it "
                                f"claims tenant {other}", self.worker_id), None
        reply_to = job.reply_to
        if reply_to is not None and lane.results is not None and reply_to != lane.results:
            return error_result(job.id, "forbidden", f"results of lane {lane.topic} go to {lane.results} only, "
                                f"not {reply_to}", self.worker_id), None
        if reply_to is not None and reply_to != lane.results:
            problem = await self.reply_topics.problem(job.tenant, reply_to)
            if problem is not None:  # answered on the default results topic
                code, message = problem
                return error_result(job.id, code, message, self.worker_id), None
        if job.prompt_bytes() > self.config.max_prompt_bytes:  # checked before anything is tokenized
            what = "the prompt is" if job.prompt is not None else "the messages' contents together are"
            return error_result(job.id, "invalid_job", f"{what} longer than {self.config.max_prompt_bytes} "
                                "bytes (max_prompt_bytes)", self.worker_id), reply_to
        try:
            resolved = await self._resolve(job)
            if resolved is not None:
                self.on_resolved(record, resolved.key)
        except JobError as err:
            return error_result(job.id, err.code, err.message, self.worker_id), reply_to
        logs.bind_job(job.id, job.tenant, resolved.key if resolved is not None else None,
                      prompt=_prompt_text(job) if self.config.log_payloads else None)
        failure = self.registry.load_failure(resolved) if resolved is not None else None
        if failure is not None:
            return self._error(job, resolved, "adapter_load_failed", failure), reply_to
        if job.deadline_ms is not None and time.time() * 1000 > job.deadline_ms:
            return self._error(job, resolved, "deadline_exceeded", "the job's deadline passed before it ran"), reply_to
        stream = None
        if job.stream:  # its partials go where its result goes
            stream = JobStream(self.partials, job.id, reply_to or lane.results or self.config.results_topic,
                               self.worker_id, asyncio.get_running_loop())
        resolved, completion = await self._generate_or_fall_back(job, resolved, stream)
        if completion.status != "ok":
            return self._error(job, resolved, completion.error_code, completion.error_message), reply_to
        self.metrics.observe_completion(completion)
        return ok_result(job, resolved, completion, self.worker_id), reply_to

    async def _resolve(self, job: Job) -> ResolvedAdapter | None:
        if not self.registry.knows_job(job):  # publish (or route) then send is always served
            try:
                await self.control.catch_up()
            except TimeoutError:
                log.warning("control topic not caught up within %d ms", self.config.control_wait_ms)
        resolved = self.registry.resolve_job(job)
        # An s3:// version not on disk here yet: wait for its download, as for a cold load (before a mix is
        # built: its members' specs come with their copies). What serves may have changed meanwhile (the
        # version failed): resolved again.
        while await self.fetches.ready(resolved):
            resolved = self.registry.resolve_job(job)
        if resolved is not None and resolved.mix:
            self._register_mix(resolved)
        return resolved

    def _register_mix(self, resolved: ResolvedAdapter) -> None:
        """Register a job's mix with the engine, built from its members' current specs: after a member is
        re-published with new content the mix's spec differs, and registering it drops what was cached."""
        members = []
        for member, weight in resolved.mix:
            spec = self.engine.spec(member.key)
            if spec is None:  # published with a path this worker refuses: nothing to mix
                raise JobError("adapter_load_failed", self.registry.load_failure(member)
                               or f"adapter {member.key} cannot be loaded on this worker")
            members.append((spec, weight))
        self.engine.register(mix_spec(members))

    async def _generate_or_fall_back(self, job: Job, resolved: ResolvedAdapter | None, stream: JobStream | None
                                     ) -> tuple[ResolvedAdapter | None, Completion]:
        """Generate on `resolved`. If its version (a mix: a member's) fails to load now (e.g. its file
        changed since it last loaded here), a job that named no exact version is served by what serves
        after that failure, as the next job would be: the switch to a version that cannot load falls back.
        The failure is recorded before the job's answer arrives (both reach this loop from the engine's
        thread, in that order), so resolving again sees it; a version is never tried twice for one job."""
        tried: set[str] = set()
        while True:
            request = to_request(job, resolved, self.config.content_special_tokens)
            if stream is not None:
                stream.provenance = provenance(resolved)
                request.on_partial = stream.on_partial
            completion = await self._generate(request)
            if stream is not None:  # the final result follows every partial on its topic
                await stream.flush()
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
        """The hand-off to the engine: batched with the other jobs of this loop turn (worker/handoff.py)."""
        return await self.handoff.generate(request)

    def _error(self, job: Job, resolved: ResolvedAdapter | None, code: str, message: str) -> JobResult:
        return error_result(job.id, code, message, self.worker_id, **provenance(resolved))


def log_answer(result: JobResult, seconds: float, payloads: bool) -> None:
    """One line per answered job (its context bound by the pipeline): errors at INFO, ok at DEBUG; the
    generated text only with --log-payloads."""
    extra = {"text": result.text} if payloads else {}
    if result.status == "ok":
        log.debug("job answered ok in %.3f s: %d tokens, finish %s", seconds, result.usage.completion_tokens,
                  result.finish_reason, extra=extra)
    else:
        log.info("job answered %s in %.3f s: %s", result.error.code, seconds, result.error.message[:_LOG_DETAIL],
                 extra=extra)


def _lane_headers(lane: Lane, headers) -> tuple[list, str | None]:
    """The headers to decode a lane's record with: for a lane that fixes the tenant, its tenant in place of
    any x-tenant-id; and the tenant such a header claimed (text; None if none, or not text)."""
    if lane.tenant is None:
        return headers, None
    kept, claimed = [], None
    for key, value in headers or ():
        if key.lower() == "x-tenant-id":
            try:
                claimed = claimed or (value or b"").decode("utf-8")
            except UnicodeDecodeError:
                claimed = claimed or repr(value)
            continue
        kept.append((key, value))
    return [*kept, ("x-tenant-id", lane.tenant.encode())], claimed


def _prompt_text(job: Job) -> str | None:
    """What the job asks, as text for a --log-payloads line: the prompt, or the chat messages as JSON."""
    if job.prompt is not None:
        return job.prompt
    return msgspec.json.encode(job.messages).decode() if job.messages is not None else None
