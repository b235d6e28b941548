"""The fuzz harness: pushes the records of tests/fuzz_strategies.py through a real broker to one worker,
accounts for every record against what tests/fuzz_expected.py allows, and restarts a worker on the same
group to check that nothing is answered or dead-lettered twice.

Shared by tests/test_fuzz_kafka.py (a few hundred records a run) and benchmarks/fuzz.py (thousands).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import traceback
from collections import Counter
from pathlib import Path

from lorabus.schemas import ERROR_CODES
from fuzz_expected import PRIVATE_TENANTS, REPLY_TENANTS, FuzzRecord, Target, is_utf8
from fuzz_strategies import HEADER_MENU, draw_records
from helpers import RawHeaderKey, raw_header_keys

# ---- sending records whose header keys are not UTF-8 ---------------------------------------------


def kafka_headers(headers: list[tuple[bytes, bytes | None]]) -> list[tuple[str, bytes | None]]:
    return [(k.decode() if is_utf8(k) else RawHeaderKey(k), v) for k, v in headers]


# ---- the harness ------------------------------------------------------------------------------------

TOKEN = re.compile(r"fz\d{5}x")
PROMPTS = ("the quick brown fox", "hello world", "summarize: the meeting moved to thursday",
           "classify sentiment: i loved this film", "jobs arrive on kafka", "translate english to french: hello")


@dataclasses.dataclass
class FuzzReport:
    target: Target
    jobs: list[FuzzRecord]
    control: list[FuzzRecord]
    good: dict  # good job id → (adapter name or None, prompt_ids, max_new_tokens)
    placed: dict = dataclasses.field(default_factory=dict)  # job record index → (partition, offset)
    results: dict = dataclasses.field(default_factory=dict)  # result id → [JobResult]
    undecodable: list = dataclasses.field(default_factory=list)  # raw values on results topics that are no JobResult
    reader_errors: list = dataclasses.field(default_factory=list)  # our own reader's fetch failures
    letters: list = dataclasses.field(default_factory=list)  # dead letters (ConsumerRecord)
    alive: bool = False  # the first worker's run task was running when the traffic had settled
    crash: str = ""
    settled: bool = False
    lag: int | None = None
    jobs_topic_end: int = 0
    jobs_sent: int = 0
    control_topic_end: int = 0
    control_sent: int = 0
    restart: dict = dataclasses.field(default_factory=dict)
    seconds: dict = dataclasses.field(default_factory=dict)
    problems: list = dataclasses.field(default_factory=list)
    by_token: dict = dataclasses.field(default_factory=dict)  # fz token → [JobResult]
    by_origin: dict = dataclasses.field(default_factory=dict)  # (topic, partition, offset) → [dead letter]
    partials: list = dataclasses.field(default_factory=list)  # streamed pieces ("partial"): not answers

    def add_result(self, result) -> None:
        if result.status == "partial":  # best-effort pieces of a `stream` job; its one answer comes after them
            self.partials.append(result)
            return
        self.results.setdefault(result.id, []).append(result)
        match = TOKEN.search(result.id)
        if match:
            self.by_token.setdefault(match.group(), []).append(result)

    def add_letter(self, letter) -> None:
        self.letters.append(letter)
        self.by_origin.setdefault(_dlq_origin(letter), []).append(letter)

    # -- attribution --
    def results_for(self, record: FuzzRecord) -> list:
        return list(self.by_token.get(record.token, ()))

    def letters_for(self, index: int) -> list:
        if index not in self.placed:  # never sent: the worker ended before (audit reports why)
            return []
        partition, offset = self.placed[index]
        return list(self.by_origin.get((self.target.jobs_topic, partition, offset), ()))

    def distinct_bad(self) -> tuple[int, int]:
        jobs = {repr(r.spec) for r in self.jobs if r.bad}
        control = {repr(r.spec) for r in self.control}
        return len(jobs), len(control)


def _dlq_origin(letter) -> tuple[str, int, int] | None:
    headers = {}
    for key, value in letter.headers or ():
        headers.setdefault(key, value)
    try:
        return headers["x-dlq-topic"].decode(), int(headers["x-dlq-partition"]), int(headers["x-dlq-offset"])
    except (KeyError, ValueError, AttributeError):
        return None


async def _end_offsets(bootstrap: str, topic: str) -> int:
    from aiokafka import AIOKafkaConsumer

    from lorabus.worker.client import topic_partitions

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        parts = await topic_partitions(bootstrap, topic)
        return sum((await consumer.end_offsets(parts)).values())
    finally:
        await consumer.stop()


class Collector:
    """Reads results (results and reply topics) and dead letters from the beginning, in the background."""

    def __init__(self, bootstrap: str, report: FuzzReport):
        self.bootstrap, self.report = bootstrap, report
        self.task = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        from lorabus.worker.client import topic_partitions

        t = self.report.target
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest", max_partition_fetch_bytes=2 << 20)
        await self.consumer.start()
        parts = []
        for topic in (t.results_topic, t.reply_topic, t.dlq_topic):
            parts += await topic_partitions(self.bootstrap, topic)
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        self.task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        from lorabus.schemas import decode_result

        dlq = self.report.target.dlq_topic
        while True:
            try:
                batches = await self.consumer.getmany(timeout_ms=200)
            except Exception as exc:  # noqa: BLE001 - e.g. a record aiokafka cannot parse: report it, keep reading
                self.report.reader_errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.5)
                continue
            for tp, records in batches.items():
                for record in records:
                    if tp.topic == dlq:
                        self.report.add_letter(record)
                        continue
                    try:
                        result = decode_result(record.value)
                    except Exception:  # noqa: BLE001 - anything on a results topic that is no JobResult
                        self.report.undecodable.append(record.value[:200] if record.value else record.value)
                        continue
                    self.report.add_result(result)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


def run_task_of(worker) -> asyncio.Task | None:
    """The asyncio task running `worker.run()` (tests.helpers.running_worker keeps it to itself)."""
    for task in asyncio.all_tasks():
        coro = task.get_coro()
        frame = getattr(coro, "cr_frame", None)
        if getattr(coro, "__qualname__", "") == "Worker.run" and frame is not None and frame.f_locals.get("self") is worker:
            return task
    return None


def make_junk_dirs(root: Path, adapter_dir: Path) -> tuple[str, ...]:
    """Existing paths that are no usable adapter: garbage config, config without weights, garbage weights, a file."""
    root.mkdir(parents=True, exist_ok=True)
    garbage = root / "garbage-config"
    garbage.mkdir(exist_ok=True)
    (garbage / "adapter_config.json").write_bytes(b"\xff{not json")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    no_weights = root / "no-weights"
    no_weights.mkdir(exist_ok=True)
    (no_weights / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    bad_weights = root / "bad-weights"
    bad_weights.mkdir(exist_ok=True)
    (bad_weights / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    (bad_weights / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": [1, 2, 3]}")
    plain_file = root / "a-file"
    plain_file.write_bytes(b"not a directory")
    return str(garbage), str(no_weights), str(bad_weights), str(plain_file)


async def run_fuzz(kafka: str, model_dir: Path, adapters: dict[str, Path], workdir: Path, *, jobs: int, control: int,
                   good: int, huge_cap: int, seed: int | None = None, restart: bool = True, settle_s: float = 240,
                   quiet_s: float = 45, oracle=None, control_log: int = 0, say=print) -> FuzzReport:
    """Publish the good adapters, send the fuzz stream (job and control records interleaved with good
    greedy jobs, then a sentinel adapter and its jobs) to one in-process worker, wait until every record
    is accounted for (or nothing new arrived for `quiet_s`, or `settle_s` passed), then restart a worker on the
    same group and watch that nothing is answered again. `control_log` names published before the worker
    starts make it start (and restart) on a control log of that size."""
    from aiokafka import AIOKafkaProducer
    from transformers import AutoConfig

    from lorabus.schemas import AdapterPublish
    from helpers import committed_lag, publish_control_bulk, running_worker, worker_config
    from lorabus.worker.client import publish_control
    from lorabus.worker.topics import ensure_topics, ensure_worker_topics

    config = worker_config(kafka, model_dir, worker_id="fuzz-1")
    reply_topic = config.results_topic.replace("results-", "replies-")
    config = dataclasses.replace(config, reply_topic=[f"{tenant}={reply_topic}" for tenant in REPLY_TENANTS])
    await ensure_topics(kafka, {reply_topic: 1})
    model_config = AutoConfig.from_pretrained(model_dir)
    names = sorted(adapters)
    tag = config.jobs_topic.split("-")[-1]
    target = Target(
        jobs_topic=config.jobs_topic, results_topic=config.results_topic, control_topic=config.control_topic,
        dlq_topic=config.dlq_topic, reply_topic=reply_topic, good_adapters=tuple(names), private_adapter=f"priv-{tag}",
        fuzz_adapters=tuple(f"fz{i}-{tag}" for i in range(3)), adapter_dirs=tuple(str(adapters[n]) for n in names),
        junk_dirs=make_junk_dirs(workdir / "junk", adapters[names[0]]), vocab_size=model_config.vocab_size,
        max_model_len=model_config.max_position_embeddings,
    )
    t0 = time.monotonic()
    job_records, control_records = draw_records(target, jobs, control, huge_cap, seed)
    sentinel = f"sentinel-{tag}"
    private_dir = adapters[names[0]]
    adapter_dir = {None: None, **adapters, target.private_adapter: private_dir, sentinel: private_dir}
    report = FuzzReport(target, job_records, control_records, {})
    report.seconds["generate"] = time.monotonic() - t0

    def good_job(job_id: str, adapter: str | None, i: int) -> bytes:
        prompt = PROMPTS[i % len(PROMPTS)]
        ids = oracle.prompt_ids(prompt)
        job = {"id": job_id, "tenant": "acme", "max_new_tokens": 4 + i % 5}
        if adapter is not None:
            job["adapter"] = adapter if i % 2 else f"{adapter}@v1"
        if i % 3:
            job["prompt"] = prompt
        else:
            job["prompt_ids"] = ids
        report.good[job_id] = (adapter, ids, job["max_new_tokens"])
        return json.dumps(job).encode()

    stream = _interleave(len(job_records), len(control_records), good)
    good_names = [None, *names]

    if control_log:
        t2 = time.monotonic()
        await ensure_worker_topics(config)  # as the worker would create them, before it exists
        await publish_control_bulk(kafka, config.control_topic, [AdapterPublish(f"bulk{i}-{tag}", "v1", str(private_dir))
                                                                 for i in range(control_log)])
        report.control_sent += control_log
        report.seconds["control log"] = time.monotonic() - t2
        say(f"published {control_log} adapter names before the worker starts")

    with raw_header_keys():
        collector = None
        try:
            async with running_worker(config) as worker:
                await asyncio.sleep(0)
                task = run_task_of(worker)
                await publish_control(kafka, config.control_topic,
                                      [AdapterPublish(n, "v1", str(adapters[n])) for n in names]
                                      + [AdapterPublish(target.private_adapter, "v1", str(private_dir),
                                                        tenants=list(PRIVATE_TENANTS))])
                report.control_sent += len(names) + 1
                collector = Collector(kafka, report)
                await collector.start()
                producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True, linger_ms=5)
                await producer.start()
                try:
                    t1 = time.monotonic()
                    futures = []
                    for what, i in stream:
                        if what == "job":
                            r = job_records[i]
                            futures.append((i, await producer.send(config.jobs_topic, r.value, key=r.key,
                                                                   headers=kafka_headers(r.headers))))
                        elif what == "control":
                            r = control_records[i]
                            await producer.send(config.control_topic, r.value, key=r.key, headers=kafka_headers(r.headers))
                            report.control_sent += 1
                        else:
                            adapter = good_names[i % len(good_names)]
                            await producer.send(config.jobs_topic, good_job(f"good-{i}", adapter, i), key=f"good-{i}".encode())
                        report.jobs_sent += what != "control"
                    await producer.flush()
                    for i, future in futures:
                        metadata = await future
                        report.placed[i] = (metadata.partition, metadata.offset)
                    # After every control record: a new adapter, and jobs for it (the control reader is still applying events).
                    await publish_control(kafka, config.control_topic, [AdapterPublish(sentinel, "v1", str(private_dir))])
                    report.control_sent += 1
                    for i in range(4):
                        await producer.send(config.jobs_topic, good_job(f"sentinel-{i}", sentinel, i), key=b"sentinel")
                        report.jobs_sent += 1
                    await producer.flush()
                    report.seconds["send"] = time.monotonic() - t1
                    say(f"sent {len(job_records)} fuzz job records, {len(control_records)} control records and "
                        f"{len(report.good)} good jobs in {report.seconds['send']:.1f} s")

                    deadline = time.monotonic() + settle_s
                    seen, quiet_since = -1, time.monotonic()
                    while time.monotonic() < deadline and not (task is not None and task.done()):
                        if _accounted(report):
                            report.settled = True
                            break
                        arrived = sum(len(v) for v in report.results.values()) + len(report.letters)
                        if arrived != seen:
                            seen, quiet_since = arrived, time.monotonic()
                        elif time.monotonic() - quiet_since > quiet_s:
                            say(f"nothing new for {quiet_s:g} s: not waiting longer")
                            break
                        await asyncio.sleep(0.5)
                    report.seconds["settle"] = time.monotonic() - t1
                    lag_deadline = time.monotonic() + 30
                    while True:
                        report.lag = await committed_lag(kafka, config.group_id, config.jobs_topic)
                        if report.lag == 0 or time.monotonic() > lag_deadline:
                            break
                        await asyncio.sleep(0.3)
                    report.alive = task is not None and not task.done()
                    if task is not None and task.done():
                        report.crash = repr(task.exception()) if not task.cancelled() else "cancelled"
                finally:
                    await producer.stop()
        except Exception as exc:  # noqa: BLE001 - running_worker re-raises what ended the run task
            report.alive = False
            report.crash = report.crash or "".join(traceback.format_exception_only(exc)).strip()[:2000]
        before = (sum(len(v) for v in report.results.values()), len(report.letters))

        if restart and report.alive:
            await _restart_phase(kafka, config, report, lambda: good_job("after-restart", sentinel, 1), before)
        if collector is not None:
            await collector.stop()
    report.jobs_topic_end = await _end_offsets(kafka, config.jobs_topic)
    report.control_topic_end = await _end_offsets(kafka, config.control_topic)
    report.seconds["total"] = time.monotonic() - t0
    audit(report, oracle, adapter_dir)
    return report


def _interleave(jobs: int, control: int, good: int) -> list[tuple[str, int]]:
    """The order of the stream, as ("job" | "control" | "good", index): the fuzz jobs, with a good job every
    `every` records and the control records spread evenly; what is left of either at the end."""
    stream: list[tuple[str, int]] = []
    every = max(1, jobs // max(1, good))
    control_every = max(1, jobs // max(1, control))
    ci = gi = 0
    for i in range(jobs):
        stream.append(("job", i))
        if i % every == every - 1 and gi < good:
            stream.append(("good", gi))
            gi += 1
        if i % control_every == 0 and ci < control:
            stream.append(("control", ci))
            ci += 1
    return stream + [("control", j) for j in range(ci, control)] + [("good", j) for j in range(gi, good)]


async def _restart_phase(kafka: str, config, report: FuzzReport, sentinel_job, before: tuple[int, int]) -> None:
    """A second worker on the same group: it must answer a new job (`sentinel_job()` builds it, id
    "after-restart") and answer or dead-letter nothing again (`before`: results and dead letters seen so far)."""
    from aiokafka import AIOKafkaProducer

    from helpers import running_worker

    second = dataclasses.replace(config, worker_id="fuzz-2")
    try:
        async with running_worker(second) as worker2:
            await asyncio.sleep(0)
            task2 = run_task_of(worker2)
            t2 = time.monotonic()
            while time.monotonic() - t2 < 60 and not (task2 and task2.done()):
                consumer = getattr(worker2, "jobs", None)
                if consumer is not None and consumer.assignment():
                    break
                await asyncio.sleep(0.1)
            producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
            await producer.start()
            await producer.send_and_wait(config.jobs_topic, sentinel_job(), key=b"after")
            await producer.stop()
            report.jobs_sent += 1
            while "after-restart" not in report.results and time.monotonic() - t2 < 60 and not (task2 and task2.done()):
                await asyncio.sleep(0.2)
            await asyncio.sleep(3)  # room for any re-delivery to show
            report.restart["alive"] = task2 is not None and not task2.done()
            report.restart["crash"] = repr(task2.exception()) if task2 is not None and task2.done() else ""
            report.restart["answered_sentinel"] = "after-restart" in report.results
            report.restart["seconds"] = time.monotonic() - t2
    except Exception as exc:  # noqa: BLE001 - what ended the second worker's run task
        report.restart["alive"] = False
        report.restart["crash"] = "".join(traceback.format_exception_only(exc)).strip()[:2000]
    await asyncio.sleep(1)
    after = (sum(len(v) for v in report.results.values()) - len(report.results.get("after-restart", [])),
             len(report.letters))
    report.restart["new_results"] = after[0] - before[0]
    report.restart["new_letters"] = after[1] - before[1]


def _accounted(report: FuzzReport) -> bool:
    if not all(job_id in report.results for job_id in report.good):
        return False
    jobs_topic = report.target.jobs_topic
    for i, record in enumerate(report.jobs):
        answered = record.token in report.by_token if record.must != "dead" else False
        lettered = (jobs_topic, *report.placed[i]) in report.by_origin
        if record.must == "answer" and not answered:
            return False
        if record.must == "dead" and not lettered:
            return False
        if record.must == "either" and not (answered or lettered):
            return False
    return True


def audit(report: FuzzReport, oracle, adapter_dir: dict) -> None:
    """Every invariant, as a list of readable problems (empty = all hold)."""
    p = report.problems
    t = report.target
    if not report.alive:
        p.append(f"the worker's run task ended: {report.crash or 'not found'}")
    if not report.settled:
        p.append("the wait ended before every record was answered or dead-lettered as required (see below)")
    if report.lag != 0:
        p.append(f"the group's committed offsets are {report.lag} records short of the end of the jobs topic")
    if report.jobs_topic_end != report.jobs_sent:
        p.append(f"the jobs topic holds {report.jobs_topic_end} records, {report.jobs_sent} were sent: the worker wrote to it")
    if report.control_topic_end != report.control_sent:
        p.append(f"the control topic holds {report.control_topic_end} records, {report.control_sent} were sent")
    for error in report.reader_errors[:3]:
        p.append(f"reading the results and dead-letter topics failed: {error}")
    for value in report.undecodable[:5]:
        p.append(f"a results topic holds a record that is no JobResult: {value!r:.120}")
    if report.restart:
        if not report.restart.get("alive"):
            p.append(f"the restarted worker's run task ended: {report.restart.get('crash')}")
        if not report.restart.get("answered_sentinel"):
            p.append("the restarted worker did not answer a job sent to it")
        if report.restart.get("new_results") or report.restart.get("new_letters"):
            p.append(f"the restarted worker answered {report.restart['new_results']} results and "
                     f"{report.restart['new_letters']} dead letters again")
    known_letters = set()
    for i, record in enumerate(report.jobs):
        label = f"{record.token} {record.must} {_describe(record)}"
        results = report.results_for(record)
        letters = report.letters_for(i)
        known_letters.update(id(r) for r in letters)
        if record.must == "answer":
            if len(results) != 1:
                p.append(f"{label}: {len(results)} results (want 1)")
            if letters:
                p.append(f"{label}: dead-lettered ({_letter_code(letters[0])}) although its id is readable")
        elif record.must == "dead":
            if results:
                p.append(f"{label}: answered {[r.id for r in results]} although it has no readable id")
            if len(letters) != 1:
                p.append(f"{label}: {len(letters)} dead letters (want 1)")
        else:
            if len(results) + len(letters) != 1:
                p.append(f"{label}: {len(results)} results and {len(letters)} dead letters (want one of them)")
        for result in results:
            _check_result(p, label, record, result, oracle, adapter_dir, t)
        for letter in letters:
            _check_letter(p, label, record, letter, t)
    for letter in report.letters:
        if id(letter) not in known_letters:
            p.append(f"a dead letter that belongs to no fuzz record: origin {_dlq_origin(letter)}, key {letter.key!r:.60}, "
                     f"code {_letter_code(letter)}")
    for job_id, (adapter, ids, max_new) in report.good.items():
        results = report.results.get(job_id, [])
        if len(results) != 1:
            p.append(f"good job {job_id}: {len(results)} results (want 1)")
        for result in results:
            if result.status != "ok":
                p.append(f"good job {job_id}: {result.status} {result.error}")
                continue
            try:
                oracle.assert_matches(adapter_dir[adapter], ids, result.token_ids, max_new, label=job_id)
            except AssertionError as exc:
                p.append(str(exc))
    tokens = {r.token for r in report.jobs}
    for partial in report.partials:
        match = TOKEN.search(partial.id)
        if partial.id not in report.good and not (match and match.group() in tokens and report.by_token.get(match.group())):
            p.append(f"a partial record for an id that has no answer: {partial.id!r:.80}")
    for result_id in report.results:
        match = TOKEN.search(result_id)
        if result_id not in report.good and result_id != "after-restart" and not (match and match.group() in tokens):
            p.append(f"a result for an id nobody sent: {result_id!r:.80}")


def _describe(record: FuzzRecord) -> str:
    spec = record.spec
    return (f"[adapter={spec[1]} reply={spec[3]} deadline={spec[4]} id={spec[5]} mutations={list(spec[6])!r:.300} "
            f"headers={[HEADER_MENU[i][0] for i in spec[7]]!r} key={spec[8]} allowed={sorted(record.allowed)} "
            f"value[:120]={(record.value or b'')[:120]!r}]")


def _letter_code(letter) -> str:
    return dict((k, v) for k, v in (letter.headers or ())).get("x-dlq-code", b"?").decode("utf-8", "replace")


def _check_result(p: list, label: str, record: FuzzRecord, result, oracle, adapter_dir: dict, t: Target) -> None:
    if record.ids and result.id not in record.ids:
        p.append(f"{label}: answered with id {result.id!r:.80}, want one of {record.ids!r:.120}")
    if result.status == "ok":
        if "ok" not in record.allowed:
            p.append(f"{label}: answered ok")
            return
        if result.error is not None or any(not 0 <= i < t.vocab_size for i in result.token_ids):
            p.append(f"{label}: malformed ok result {result!r:.300}")
        choices = result.choices or []
        generated = sum(len(c.token_ids) for c in choices) if choices else len(result.token_ids)
        if result.usage.completion_tokens != generated or result.finish_reason not in ("stop", "length"):
            p.append(f"{label}: inconsistent ok result {result!r:.300}")
        if record.choices > 1 and (len(choices) != record.choices or choices[0].token_ids != result.token_ids
                                   or sorted(c.index for c in choices) != list(range(record.choices))):
            p.append(f"{label}: {len(choices)} choices for n={record.choices} {result!r:.300}")
        if result.logprobs is not None and len(result.logprobs) != len(result.token_ids):
            p.append(f"{label}: {len(result.logprobs)} logprobs for {len(result.token_ids)} tokens")
        if record.oracle is not None:
            name, prompt, max_new, has_stop = record.oracle
            if (result.adapter, result.adapter_version) != ((name, "v1") if name else (None, None)):
                p.append(f"{label}: served by {result.adapter}@{result.adapter_version}, asked for {name}")
            ids = prompt if isinstance(prompt, list) else oracle.prompt_ids(prompt)
            if result.usage.prompt_tokens != len(ids):
                p.append(f"{label}: prompt_tokens {result.usage.prompt_tokens}, the tokenizer gives {len(ids)}")
            if len(result.token_ids) > max_new or (not result.token_ids and max_new):
                p.append(f"{label}: {len(result.token_ids)} tokens for max_new_tokens {max_new}")
            try:
                oracle.assert_matches(adapter_dir.get(name), ids, result.token_ids,
                                      len(result.token_ids) if has_stop else max_new, label=record.token)
            except AssertionError as exc:
                p.append(f"{label}: {exc}")
        return
    if result.status != "error" or result.error is None:
        p.append(f"{label}: status {result.status!r} without an error")
        return
    if result.error.code not in ERROR_CODES:
        p.append(f"{label}: undocumented error code {result.error.code!r}")
    elif result.error.code not in record.allowed:
        p.append(f"{label}: answered {result.error.code} ({result.error.message[:160]!r})")
    if not result.error.message:
        p.append(f"{label}: error {result.error.code} without a message")


def _check_letter(p: list, label: str, record: FuzzRecord, letter, t: Target) -> None:
    truncated = dict((k, v) for k, v in (letter.headers or ())).get("x-dlq-truncated")
    if truncated is not None:  # a copy cut down to fit the broker: a prefix, and the original length
        if record.size() < 900_000 or truncated != str(len(record.value or b"")).encode() \
                or not (record.value or b"").startswith(letter.value or b""):
            p.append(f"{label}: truncated dead letter (x-dlq-truncated={truncated!r}) of a {record.size()}-byte record")
        return
    if letter.value != record.value:
        p.append(f"{label}: the dead letter's value differs from the record's ({len(letter.value or b'')} vs "
                 f"{len(record.value or b'')} bytes)")
    if letter.key != record.key:
        p.append(f"{label}: the dead letter's key {letter.key!r:.60} differs from the record's {record.key!r:.60}")
    headers = list(letter.headers or ())
    original = [(k, v) for k, v in headers if not k.startswith("x-dlq-")]
    if len(original) != len(record.headers) or [v for _, v in original] != [v for _, v in record.headers]:
        p.append(f"{label}: the dead letter's original headers differ: {original!r:.200} vs {record.headers!r:.200}")
    else:
        for (key, _), (raw, _) in zip(original, record.headers):
            if is_utf8(raw) and key != raw.decode():
                p.append(f"{label}: header key {raw!r} became {key!r} on the dead letter")
    dlq = dict((k, v) for k, v in headers if k.startswith("x-dlq-"))
    for name in ("x-dlq-code", "x-dlq-reason", "x-dlq-topic", "x-dlq-partition", "x-dlq-offset", "x-dlq-timestamp",
                 "x-dlq-worker"):
        if not dlq.get(name):
            p.append(f"{label}: the dead letter lacks {name}")
    code = dlq.get("x-dlq-code", b"").decode("utf-8", "replace")
    if code not in ERROR_CODES or code == "internal":
        p.append(f"{label}: dead letter code {code!r}")


def summary(report: FuzzReport) -> str:
    """A table of what was sent and what came back."""
    codes = Counter()
    for record in report.jobs:
        for result in report.results_for(record):
            codes["ok" if result.status == "ok" else result.error.code] += 1
    musts = Counter(r.must for r in report.jobs)
    letters = len(report.letters)
    arguable = Counter("answered" if report.results_for(r) else "dead-lettered" if report.letters_for(i) else "neither"
                       for i, r in enumerate(report.jobs) if r.must == "either" and i in report.placed)
    bad_jobs, bad_control = report.distinct_bad()
    rows = [
        ("job records sent (fuzz)", len(report.jobs)),
        ("  readable id / none / arguable", f"{musts['answer']} / {musts['dead']} / {musts['either']}"),
        ("control records sent (fuzz)", len(report.control)),
        ("good greedy jobs sent", len(report.good)),
        ("distinct bad job inputs", bad_jobs),
        ("distinct bad control inputs", bad_control),
        ("bytes sent (fuzz)", sum(r.size() for r in report.jobs + report.control)),
        ("largest record (bytes)", max((r.size() for r in report.jobs + report.control), default=0)),
        *[(f"answered {code}", n) for code, n in sorted(codes.items())],
        ("dead-lettered", letters),
        ("  arguable ones answered / dead-lettered", f"{arguable['answered']} / {arguable['dead-lettered']}"),
        ("good jobs answered ok", sum(1 for j in report.good if any(r.status == "ok" for r in report.results.get(j, [])))),
        ("committed lag at the end", report.lag),
        ("re-answered after restart", report.restart.get("new_results", "-")),
        ("invariant violations", len(report.problems)),
        *[(f"wall time {k} (s)", f"{v:.1f}") for k, v in report.seconds.items()],
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"| {k:<{width}} | {v!s:>12} |" for k, v in rows)
