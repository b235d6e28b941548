"""Rollouts through the real broker and real workers (issue 9, item 7).

- Hot swap under load: while hundreds of name-only and routed jobs flow, `adapter.activate` flips a name
  between two versions and a route moves 100/0 -> 50/50 -> 0/100. No job fails, every result names the
  version (and route) that served it, routed jobs land where their route's sticky hash puts them, and
  every result's greedy tokens equal PEFT's for the version it names.
- Safe activation: versions that cannot load (wrong sha256, no weights file, DoRA) are activated and
  routed to under load and never take a job; the worker's status, `lorabus status` and
  `lorabus rollout activate --wait` report the failures; a job naming a broken version exactly gets
  adapter_load_failed.
- Restart after compaction: a worker started on a control topic the broker really compacted serves the
  same versions, for the same jobs and users, as a worker that read the whole history; a control topic
  created with cleanup.policy=delete makes a worker warn.
- Every kind of control record a worker must skip (a tombstone under no control key, undecodable, wrong
  record key) is skipped and counted by reason; valid records that change nothing now (warm / retire /
  route.delete of what does not exist, a tombstone whose record is gone) are not counted; good events
  after them apply; a tombstone under a key that holds state clears it.
"""

import asyncio
import json
import logging
import shutil
import sys
import time
from dataclasses import replace

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from lorabus.schemas import (AdapterActivate, AdapterPublish, AdapterRetire, AdapterWarm, RouteDelete, RouteSet,
                             RouteTarget, decode_result, encode)
from lorabus.worker.client import publish_control, read_statuses, run_jobs, topic_partitions
from lorabus.worker.control_log import control_key
from lorabus.scheduler.adapters import file_sha256
from lorabus.worker.routing import pick_target
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, ensure_topics, topic_configs
from helpers import PeftOracle, end_offset, make_peft_adapter, record_offsets, running_worker, worker_config

pytestmark = pytest.mark.kafka

PROMPTS = [[5, 6, 7], [9, 4], [11, 3, 8, 2], [17, 1, 6]]
NEW_TOKENS = 3


def _job(job_id: str, prompt: list[int], tenant: str = "acme", **fields) -> tuple[str, bytes]:
    return job_id, json.dumps({"id": job_id, "tenant": tenant, "prompt_ids": prompt, "max_new_tokens": NEW_TOKENS,
                               **fields}).encode()


def _prompt_of(job_id: str) -> list[int]:
    return PROMPTS[int(job_id.rsplit("-", 1)[1]) % len(PROMPTS)]


class Tokens:
    """PEFT's greedy tokens per (adapter dir, prompt), computed once; `check` tolerates only PEFT's exact
    near-ties (PeftOracle.assert_matches)."""

    def __init__(self, oracle: PeftOracle, dirs, prompts=PROMPTS):
        self.oracle = oracle
        self.want = {(d, tuple(p)): oracle.greedy(d, p, NEW_TOKENS) for d in dirs for p in prompts}

    def check(self, adapter_dir, prompt, got, label) -> None:
        if got != self.want[(adapter_dir, tuple(prompt))]:
            self.oracle.assert_matches(adapter_dir, prompt, got, NEW_TOKENS, label)


class JobStream:
    """One producer and one results consumer for a whole test: jobs go out in bursts while the test
    changes the control log; results are collected as they arrive (id -> every copy)."""

    def __init__(self, kafka: str, jobs_topic: str, results_topic: str):
        self.kafka, self.jobs_topic, self.results_topic = kafka, jobs_topic, results_topic
        self.results: dict[str, list] = {}
        self.sent = 0

    async def __aenter__(self):
        self.consumer = AIOKafkaConsumer(bootstrap_servers=self.kafka, enable_auto_commit=False)
        self.producer = AIOKafkaProducer(bootstrap_servers=self.kafka, acks="all", enable_idempotence=True, linger_ms=2)
        await self.consumer.start()
        await self.producer.start()
        parts = await topic_partitions(self.kafka, self.results_topic)
        self.consumer.assign(parts)
        await self.consumer.seek_to_end(*parts)
        for tp in parts:  # resolve the lazy seek: only results produced from now on are read
            await self.consumer.position(tp)
        self._collector = asyncio.create_task(self._collect())
        return self

    async def __aexit__(self, *exc):
        self._collector.cancel()
        await asyncio.gather(self._collector, return_exceptions=True)
        await self.producer.stop()
        await self.consumer.stop()

    async def _collect(self):
        while True:
            for records in (await self.consumer.getmany(timeout_ms=100)).values():
                for record in records:
                    result = decode_result(record.value)
                    self.results.setdefault(result.id, []).append(result)

    async def send(self, jobs: list[tuple[str, bytes]]) -> None:
        for job_id, value in jobs:
            await self.producer.send(self.jobs_topic, value, key=job_id.encode())
        await self.producer.flush()
        self.sent += len(jobs)

    async def wait_count(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.results) < n:
            assert time.monotonic() < deadline, f"only {len(self.results)} of {n} results within {timeout} s"
            await asyncio.sleep(0.02)

    async def wait_ids(self, ids, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not set(ids) <= self.results.keys():
            missing = set(ids) - self.results.keys()
            assert time.monotonic() < deadline, \
                f"{len(missing)} jobs unanswered after {timeout} s: {sorted(missing)[:5]}"
            await asyncio.sleep(0.02)


async def _feed(stream: JobStream, _mixed_job, count: int | None = None, stop: asyncio.Event | None = None,
                outstanding: int = 40, burst: int = 8) -> list[str]:
    """Closed-loop load: bursts of jobs while fewer than `outstanding` are unanswered, until `count`
    are sent or `stop` is set. Returns the ids sent."""
    sent: list[str] = []
    base = len(stream.results)
    while (count is None or len(sent) < count) and not (stop is not None and stop.is_set()):
        if len(sent) - (len(stream.results) - base) >= outstanding:
            await asyncio.sleep(0.005)
            continue
        jobs = [_mixed_job(len(sent) + k) for k in range(burst if count is None else min(burst, count - len(sent)))]
        await stream.send(jobs)
        sent += [job_id for job_id, _ in jobs]
        await asyncio.sleep(0.01)
    return sent


def _ignored(worker) -> dict[str, float]:
    return {s.labels["reason"]: s.value for m in worker.metrics.control_ignored.collect() for s in m.samples
            if s.name.endswith("_total")}


def _mixed_job(i: int):
    """Even: a name-only job for `fin`; odd: a job routed by task `ner`, one user each."""
    if i % 2 == 0:
        return _job(f"name-{i}", PROMPTS[i // 2 % len(PROMPTS)], adapter="fin")
    return _job(f"routed-{i}", PROMPTS[i // 2 % len(PROMPTS)], task="ner", user=f"user-{i}")


async def _cli(*args, timeout: float = 120) -> tuple[int, str, str]:
    """The `lorabus` command in a subprocess (asynchronously: the worker keeps running in this loop)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lorabus.worker.cli", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode, out.decode(), err.decode()


async def _status(kafka: str, topic: str, worker_id: str, until, timeout: float = 30):
    """The worker's latest status on the status topic, polled until `until(status)` holds (or the timeout:
    the last one read, for the assertions to describe)."""
    deadline = time.monotonic() + timeout
    while True:
        status = (await read_statuses(kafka, topic)).get(worker_id)
        if (status is not None and until(status)) or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.25)


async def _send_raw(kafka: str, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> int:
    """Send raw control records (key, value) in order; returns the offset one past the last."""
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            meta = await producer.send_and_wait(topic, value, key=key)
        return meta.offset + 1
    finally:
        await producer.stop()


async def _caught_up(worker, end: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while worker.control_offset < end:
        assert time.monotonic() < deadline, f"worker read the control topic to {worker.control_offset}, not {end}"
        await asyncio.sleep(0.02)


# ---- 1. hot swap under load --------------------------------------------------------------------------

async def test_hot_swap_under_load(kafka, tiny_model, peft_adapters):
    dirs = {"v1": peft_adapters["qv-r4"], "v2": peft_adapters["all-r8-rslora"]}
    tokens = Tokens(PeftOracle(tiny_model), dirs.values())
    config = worker_config(kafka, tiny_model, worker_id="w-swap")
    jobs_total, flips = 600, []

    def route(a: int, b: int) -> RouteSet:
        return RouteSet(task="ner", targets=[RouteTarget(adapter="fin@v1", weight=a),
                                             RouteTarget(adapter="fin@v2", weight=b)],
                        event_id=f"ner-{a}-{b}")

    routes = {r.event_id: r for r in (route(100, 0), route(50, 50), route(0, 100))}
    steps = [AdapterActivate("fin", "v2"), routes["ner-50-50"], AdapterActivate("fin", "v1"),
             AdapterActivate("fin", "v2"), AdapterActivate("fin", "v1"), routes["ner-0-100"],
             AdapterActivate("fin", "v2"), AdapterActivate("fin", "v1"), AdapterActivate("fin", "v2")]

    started = time.monotonic()
    async with running_worker(config) as worker, \
            JobStream(kafka, config.jobs_topic, config.results_topic) as stream:
        await publish_control(kafka, config.control_topic, [
            AdapterPublish("fin", "v1", str(dirs["v1"])), AdapterPublish("fin", "v2", str(dirs["v2"])),
            routes["ner-100-0"]])
        feeder = asyncio.create_task(_feed(stream, _mixed_job, count=jobs_total))
        for k, event in enumerate(steps, 1):  # each flip once the results show jobs flowing since the last
            await stream.wait_count(k * jobs_total // (len(steps) + 1), 120)
            await publish_control(kafka, config.control_topic, [event])
            flips.append((len(stream.results), type(event).__name__, getattr(event, "version", event.event_id)))
        sent = await feeder
        await stream.wait_ids(sent, 120)
        ignored = _ignored(worker)
    elapsed = time.monotonic() - started

    results = stream.results
    assert len(sent) == jobs_total and results.keys() == set(sent)
    copies = [r for rs in results.values() for r in rs]
    failed = [r for r in copies if r.status != "ok"]
    assert not failed, failed[:3]
    assert all(r.adapter == "fin" and r.adapter_version in dirs for r in copies), \
        {(r.adapter, r.adapter_version) for r in copies}
    by_name = [r for r in copies if r.id.startswith("name-")]
    routed = [r for r in copies if r.id.startswith("routed-")]
    named_counts = {v: sum(r.adapter_version == v for r in by_name) for v in dirs}
    routed_counts = {v: sum(r.adapter_version == v for r in routed) for v in dirs}
    assert all(named_counts.values()), f"name-only jobs never saw both versions: {named_counts}"
    assert all(r.task is None and r.route_event_id is None for r in by_name)
    route_counts = {rid: 0 for rid in routes}
    for r in routed:
        assert r.task == "ner" and r.route_event_id in routes, (r.id, r.task, r.route_event_id)
        route_counts[r.route_event_id] += 1
        # The version is the one the named route's sticky hash picks for this user.
        user = f"user-{r.id.rsplit('-', 1)[1]}"
        assert pick_target(routes[r.route_event_id], user, r.id).adapter == f"fin@{r.adapter_version}", r
    assert all(route_counts.values()), f"a route state served no job: {route_counts}"
    for r in copies:  # every result's tokens are PEFT's for the version it names
        i = int(r.id.rsplit("-", 1)[1])
        tokens.check(dirs[r.adapter_version], PROMPTS[i // 2 % len(PROMPTS)], r.token_ids,
                     f"{r.id} on {r.adapter_version}")
    assert ignored == {}, ignored  # every control event applied
    print(f"hot swap under load: {len(sent)} jobs ({len(copies)} results), {len(failed)} failed, in {elapsed:.1f} s; "
          f"{len(steps)} flips at results {[f[0] for f in flips]}; name-only per version {named_counts}; "
          f"routed per version {routed_counts}, per route {route_counts}; all tokens equal PEFT's")


# ---- 2. broken versions never take traffic -----------------------------------------------------------

async def test_broken_versions_never_take_traffic(kafka, tiny_model, peft_adapters, tmp_path):
    good = peft_adapters["qv-r4"]
    wrong_sha = "ab" * 32
    assert file_sha256(str(peft_adapters["all-r8-rslora"] / "adapter_model.safetensors")) != wrong_sha
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(good / "adapter_config.json", no_weights / "adapter_config.json")
    dora = make_peft_adapter(tiny_model, tmp_path / "dora", seed=7, r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj"], use_dora=True)
    tokens = Tokens(PeftOracle(tiny_model), [good])
    config = worker_config(kafka, tiny_model, worker_id="w-broken")
    flags = ["--bootstrap-servers", kafka, "--control-topic", config.control_topic,
             "--status-topic", config.status_topic]
    broken = {"v2": "sha256", "v3": "no adapter_model.safetensors", "v4": "use_dora"}  # version -> its reason says
    route_v1 = RouteSet(task="ner", targets=[RouteTarget(adapter="fin@v1", weight=100)], event_id="route-v1")
    route_v2 = RouteSet(task="ner", targets=[RouteTarget(adapter="fin@v2", weight=100)], event_id="route-v2")

    started = time.monotonic()
    async with running_worker(config) as worker, \
            JobStream(kafka, config.jobs_topic, config.results_topic) as stream:
        await publish_control(kafka, config.control_topic, [AdapterPublish("fin", "v1", str(good)), route_v1])
        stop = asyncio.Event()
        feeder = asyncio.create_task(_feed(stream, _mixed_job, stop=stop, outstanding=24, burst=4))
        await stream.wait_count(24, 60)  # v1 serves before anything breaks
        # Sent directly: the CLI would refuse the wrong sha256 and the missing weights file.
        await publish_control(kafka, config.control_topic, [
            AdapterPublish("fin", "v2", str(peft_adapters["all-r8-rslora"]), sha256=wrong_sha),
            AdapterActivate("fin", "v2")])
        await stream.wait_count(len(stream.results) + 32, 60)
        await publish_control(kafka, config.control_topic, [
            AdapterPublish("fin", "v3", str(no_weights)), AdapterActivate("fin", "v3")])
        await stream.wait_count(len(stream.results) + 32, 60)
        await publish_control(kafka, config.control_topic, [
            AdapterPublish("fin", "v4", str(dora)), AdapterActivate("fin", "v4"), route_v2])
        deadline = time.monotonic() + 30
        while not all(worker.adapter_health.failure(f"fin@{v}") for v in broken) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await stream.wait_count(len(stream.results) + 64, 60)  # and jobs keep flowing after the failures
        stop.set()
        sent = await feeder
        await stream.wait_ids(sent, 60)
        exact = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                               [_job(f"exact-{v}", PROMPTS[0], adapter=f"fin@{v}") for v in broken], 60)
        end = await end_offset(kafka, config.control_topic)
        status = await _status(kafka, config.status_topic, "w-broken",
                               lambda s: s.control_offset >= end and sum(v.state == "failed" for v in s.versions) == 3)
        rc_status, status_out, status_err = await _cli("status", *flags)
        rc_bad, bad_out, bad_err = await _cli("rollout", "activate", "fin", "v2", "--wait", "--force",
                                              "--timeout", "30", *flags)
        rc_good, good_out, good_err = await _cli("rollout", "activate", "fin", "v1", "--wait", "--timeout", "30",
                                                 *flags)
        # A new version is tried as soon as it is published, so publish --wait reports its failure too.
        rc_pub, pub_out, pub_err = await _cli("rollout", "publish", "fin", "v5", str(peft_adapters["qv-r4"]),
                                              "--sha256", wrong_sha, "--force", "--wait", "--timeout", "30", *flags)
        after = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                               [_job("after-0", PROMPTS[0], adapter="fin")], 60)
        ignored = _ignored(worker)
    elapsed = time.monotonic() - started

    assert set(sent) <= stream.results.keys()
    copies = [r for job_id in sent for r in stream.results[job_id]]
    failed = [r for r in copies if r.status != "ok"]
    assert not failed, failed[:3]
    assert all((r.adapter, r.adapter_version) == ("fin", "v1") for r in copies), \
        {(r.adapter, r.adapter_version) for r in copies}
    routed = [r for r in copies if r.id.startswith("routed-")]
    assert routed and all((r.task, r.route_event_id) == ("ner", "route-v1") for r in routed)
    for r in copies:
        i = int(r.id.rsplit("-", 1)[1])
        tokens.check(good, PROMPTS[i // 2 % len(PROMPTS)], r.token_ids, r.id)
    for v, says in broken.items():  # asking for a broken version exactly: its load failure, with the reason
        (r,) = exact[f"exact-{v}"]
        assert r.status == "error" and r.error.code == "adapter_load_failed" and says in r.error.message, r
    assert (after["after-0"][0].status, after["after-0"][0].adapter_version) == ("ok", "v1")

    assert status is not None, "the worker published no status"
    failures = {v.adapter: v.reason for v in status.versions if v.state == "failed"}
    assert failures.keys() == {f"fin@{v}" for v in broken}, status.versions
    assert all(says in failures[f"fin@{v}"] for v, says in broken.items()), failures
    assert status.serving["fin"] == "v1" and status.activated["fin"] == "v4", (status.serving, status.activated)
    (ner,) = [r for r in status.routes if (r.task, r.tenant) == ("ner", None)]
    assert (ner.event_id, ner.pending_event_id) == ("route-v1", "route-v2"), ner

    assert rc_status == 0, status_err
    for ref, reason in failures.items():
        assert f"    FAILED {ref} on w-broken: {reason}" in status_out.splitlines(), status_out
    assert "pending (loading or failed); route-v1 still serving" in status_out, status_out
    assert rc_bad == 1, (bad_out, bad_err)
    assert f"w-broken: failed: {failures['fin@v2']}" in bad_out.splitlines(), bad_out
    assert rc_good == 0, (good_out, good_err)
    assert "w-broken: ok" in good_out.splitlines(), good_out
    assert rc_pub == 1 and "w-broken: failed: fin@v5: sha256" in pub_out, (pub_out, pub_err)
    assert ignored == {}, ignored
    print(f"broken versions: {len(sent)} jobs under load ({len(routed)} routed), {len(failed)} failed, all served by "
          f"fin@v1 (routed by route-v1) in {elapsed:.1f} s; failed loads reported: "
          + "; ".join(f"{k}: {v}" for k, v in sorted(failures.items()))
          + f"; rollout activate fin v2 --wait: rc {rc_bad}; fin v1: rc {rc_good}")


# ---- 3. restart after compaction ---------------------------------------------------------------------

FAST_COMPACTION = {"segment.ms": "100", "min.cleanable.dirty.ratio": "0.001", "delete.retention.ms": "100",
                   "min.compaction.lag.ms": "0"}  # segment.bytes must be >= 1 MiB on Kafka 4: segment.ms rolls
COMPACTION_WAIT_S = 60  # the broker's log cleaner looks for work every log.cleaner.backoff.ms (15 s by default)


async def _serve_history(kafka: str, config, worker_id: str, tag: str):
    """Run a worker on the control topic; returns its results (job suffix -> result) and its status."""
    jobs = [_job(f"{tag}name-{i}", p, adapter="fin") for i, p in enumerate(PROMPTS)]
    jobs += [_job(f"{tag}routed-{tenant}-{u}", PROMPTS[u % len(PROMPTS)], tenant=tenant, task="ner", user=f"user-{u}")
             for tenant in ("acme", "globex") for u in range(50)]
    jobs += [_job(f"{tag}exact-{v}", PROMPTS[0], adapter=f"fin@{v}") for v in ("v1", "v3", "v4")]
    async with running_worker(replace(config, worker_id=worker_id)) as worker:
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 120)
        end = await end_offset(kafka, config.control_topic)
        status = await _status(kafka, config.status_topic, worker_id,
                               lambda s: s.control_offset >= end and all(v.state != "loading" for v in s.versions))
        ignored = _ignored(worker)
    assert results.keys() == {job_id for job_id, _ in jobs}
    return {job_id[len(tag):]: copies[0] for job_id, copies in results.items()}, status, ignored


async def test_restart_after_compaction_serves_the_same(kafka, tiny_model, peft_adapters, caplog):
    dirs = {"v1": peft_adapters["qv-r4"], "v2": peft_adapters["all-r8-rslora"], "v3": peft_adapters["mlp-r16-patterns"]}
    tokens = Tokens(PeftOracle(tiny_model), [dirs["v1"], dirs["v2"]])
    config = worker_config(kafka, tiny_model)
    control = config.control_topic
    await ensure_topics(kafka, {control: 1}, {control: {**CONTROL_TOPIC_CONFIGS, **FAST_COMPACTION}})
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka)
    await admin.start()
    try:
        configs = await topic_configs(admin, control)
    finally:
        await admin.close()
    assert {k: configs[k] for k in FAST_COMPACTION} == FAST_COMPACTION, configs
    assert configs["cleanup.policy"] == "compact", configs

    def ner(event_id, *targets, tenant=None):
        return RouteSet(task="ner", tenant=tenant, event_id=event_id,
                        targets=[RouteTarget(adapter=f"fin@{v}", weight=w) for v, w in targets])

    final_ner, final_acme = ner("ner-5", ("v1", 70), ("v2", 30)), ner("acme-2", ("v1", 20), ("v2", 80), tenant="acme")
    history = [
        *(AdapterPublish("fin", v, str(d)) for v, d in dirs.items()),
        AdapterPublish("fin", "v4", str(dirs["v3"])),
        AdapterActivate("fin", "v2"), AdapterActivate("fin", "v3"), AdapterActivate("fin", "v1"),
        AdapterActivate("fin", "v3"), AdapterActivate("fin", "v2"), AdapterActivate("fin", "v1"),
        ner("ner-1", ("v1", 100)), ner("ner-2", ("v1", 50), ("v2", 50)), ner("acme-1", ("v2", 100), tenant="acme"),
        ner("ner-3", ("v1", 90), ("v2", 10)),
        RouteDelete(task="ner", event_id="unroute-1"),  # hides ner-2 (still its key's last record) for good
        ner("ner-4", ("v1", 100)),  # the same targets as ner-1: its key, moved past the delete
        AdapterActivate("fin", "v2"),  # the activate flips end on v2
        AdapterRetire("fin", "v3"),
        final_acme, final_ner,
        AdapterPublish("fin", "v1", str(dirs["v1"])),  # re-published, same content
        AdapterPublish("fin", "v2", str(dirs["v2"])),  # ... and so v2: by publish order alone, v1 would serve
    ]
    offsets = await publish_control(kafka, control, history)
    written = await _send_raw(kafka, control, [(control_key(AdapterPublish("fin", "v4", "-")).encode(), None)])
    assert written == offsets[-1] + 2 == len(history) + 1

    a_results, a_status, a_ignored = await _serve_history(kafka, config, "w-a", "a-")

    # Roll the segment holding the history (segment.ms=100) with records that change no state (the newest
    # routes sent again as they are), then wait for the log cleaner to compact it.
    compact_started = time.monotonic()
    for _ in range(3):
        await asyncio.sleep(0.2)
        await publish_control(kafka, control, [final_acme, final_ner])

    # Meanwhile: a worker on a control topic that deletes old records warns at start-up.
    delete_config = worker_config(kafka, tiny_model, worker_id="w-delete")
    await ensure_topics(kafka, {delete_config.control_topic: 1},
                        {delete_config.control_topic: {"cleanup.policy": "delete"}})
    with caplog.at_level(logging.WARNING, logger="lorabus.worker.topics"):
        async with running_worker(delete_config):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not any(delete_config.control_topic in r.getMessage()
                                                          for r in caplog.records):
                await asyncio.sleep(0.05)
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and delete_config.control_topic in r.getMessage()]

    # Superseded records worker B must do without: the first publishes of fin@v1 and v2, ner-1 (same key as ner-4), the
    # first activations of v2 and v1, fin@v3's publish (its key's last record is the retire) and fin@v4's (tombstoned).
    superseded = {offsets[i] for i in (0, 1, 2, 3, 4, 6, history.index(ner("ner-1", ("v1", 100))))}
    kept, end = await record_offsets(kafka, control)
    while superseded & set(kept) and time.monotonic() - compact_started < COMPACTION_WAIT_S:
        await asyncio.sleep(1.0)
        kept, end = await record_offsets(kafka, control)
    compaction_s = time.monotonic() - compact_started
    count = len(kept)
    assert end == written + 6
    assert not superseded & set(kept), (f"the broker did not compact {control} within {COMPACTION_WAIT_S} s "
                                        f"({count} records of {end} left, offsets {kept}); "
                                        "cannot test a restart after compaction")
    assert count < end

    b_results, b_status, b_ignored = await _serve_history(kafka, config, "w-b", "b-")

    # The history says: fin serves v2; v3 retired and v4 cleared; ner splits 70/30, acme 20/80.
    assert a_results.keys() == b_results.keys()
    for key in sorted(a_results):
        a, b = a_results[key], b_results[key]
        assert (a.status, a.adapter_version, a.route_event_id, a.token_ids) == \
            (b.status, b.adapter_version, b.route_event_id, b.token_ids), (key, a, b)
        if key.startswith("name-"):
            assert (b.status, b.adapter_version) == ("ok", "v2"), (key, b)
            tokens.check(dirs["v2"], _prompt_of(key), b.token_ids, key)
        elif key.startswith("routed-"):
            _, tenant, u = key.split("-")
            route = final_acme if tenant == "acme" else final_ner
            assert (b.status, b.task, b.route_event_id) == ("ok", "ner", route.event_id), (key, b)
            assert pick_target(route, f"user-{u}", key).adapter == f"fin@{b.adapter_version}", (key, b)
            tokens.check(dirs[b.adapter_version], _prompt_of(key), b.token_ids, key)
    assert (b_results["exact-v1"].status, b_results["exact-v1"].adapter_version) == ("ok", "v1")
    assert b_results["exact-v3"].error.code == "adapter_not_found"  # retired
    assert b_results["exact-v4"].error.code == "adapter_not_found"  # its publish was cleared by a tombstone
    split = {t: {v: sum(r.adapter_version == v for k, r in b_results.items() if k.startswith(f"routed-{t}-"))
                 for v in ("v1", "v2")} for t in ("acme", "globex")}
    assert all(all(counts.values()) for counts in split.values()), split  # both versions behind each route
    for status in (a_status, b_status):
        assert status is not None and status.serving == {"fin": "v2"} and status.activated == {"fin": "v2"}, status
        assert {(r.task, r.tenant): (r.event_id, r.pending_event_id) for r in status.routes} == \
            {("ner", None): ("ner-5", None), ("ner", "acme"): ("acme-2", None)}, status.routes
    assert a_ignored == {}, a_ignored  # the whole history: every event applied when it was read
    # Compaction reorders history; no event is judged by what came before it, so nothing is skipped either.
    assert b_ignored == a_ignored, (a_ignored, b_ignored)

    assert any("cleanup.policy" in w and "compact" in w for w in warnings), caplog.text[-3000:]
    print(f"restart after compaction: control topic {end} records written, {count} left after compaction "
          f"({compaction_s:.1f} s); worker B served the same as worker A for {len(b_results)} jobs "
          f"(4 by name -> v2, 100 routed: {split}, exact v1 ok, v3/v4 adapter_not_found); "
          f"control records counted ignored: worker A {a_ignored}, worker B {b_ignored}; "
          f"delete-policy warnings: {warnings}")


# ---- 4. invalid control records ----------------------------------------------------------------------

async def test_every_invalid_control_record_is_skipped_and_counted(kafka, tiny_model, peft_adapters):
    v1, v2 = peft_adapters["qv-r4"], peft_adapters["all-r8-rslora"]
    config = worker_config(kafka, tiny_model, worker_id="w-skip")
    control = config.control_topic
    route = RouteSet(task="ner", targets=[RouteTarget(adapter="fin@v1", weight=1)], event_id="route-1")
    publish_v2 = AdapterPublish("fin", "v2", str(v2))

    def key(event) -> bytes:
        return control_key(event).encode()

    bad = {  # reason -> the records the worker must skip for it
        "tombstone": [(b"ghost", None)],  # under no control key
        "invalid": [(key(publish_v2), b'{"type": "adapter.publish", "name": "fin", "version": "v2", "pa')],
        "key": [(b"fin", encode(publish_v2))],  # a good event under a key that is not its own
    }
    # Valid records that change nothing now: after compaction such records are normal (a tombstone whose
    # record is gone, a retire whose publish it replaced), so they are applied silently, never counted.
    no_effect = [(b"adapter:ghost@v1", None)] + [(key(e), encode(e)) for e in (
        AdapterWarm("fin", "v9"), AdapterRetire("fin", "v9"), RouteDelete(task="summarize"))]
    async with running_worker(config) as worker:
        await publish_control(kafka, control, [AdapterPublish("fin", "v1", str(v1)), route])
        end = await _send_raw(kafka, control, [record for records in bad.values() for record in records] + no_effect)
        await _caught_up(worker, end)
        ignored = _ignored(worker)
        before = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                [_job("before-v2", PROMPTS[0], adapter="fin@v2"),
                                 _job("before-name", PROMPTS[0], adapter="fin")], 60)
        await publish_control(kafka, control, [publish_v2, AdapterActivate("fin", "v2")])  # good events after the bad
        served = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                [_job("good-name", PROMPTS[0], adapter="fin"),
                                 _job("good-routed", PROMPTS[0], task="ner", user="u1")], 60)
        end = await _send_raw(kafka, control, [(key(route), None)])  # a tombstone under a key with state
        await _caught_up(worker, end)
        cleared = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                 [_job("cleared-routed", PROMPTS[0], task="ner", user="u1"),
                                  _job("cleared-name", PROMPTS[0], adapter="fin")], 60)
        ignored_after = _ignored(worker)

    assert ignored == {reason: float(len(records)) for reason, records in bad.items()}, ignored
    assert ignored_after == ignored, ignored_after  # clearing a key that holds state is not a skipped record
    # Neither the undecodable nor the mis-keyed publish of v2 took.
    assert before["before-v2"][0].error.code == "adapter_not_found"
    assert (before["before-name"][0].status, before["before-name"][0].adapter_version) == ("ok", "v1")
    assert (served["good-name"][0].status, served["good-name"][0].adapter_version) == ("ok", "v2")
    good_routed = served["good-routed"][0]
    assert (good_routed.status, good_routed.adapter_version, good_routed.route_event_id) == ("ok", "v1", "route-1")
    assert cleared["cleared-routed"][0].error.code == "adapter_not_found", cleared["cleared-routed"][0]
    assert (cleared["cleared-name"][0].status, cleared["cleared-name"][0].adapter_version) == ("ok", "v2")
    print(f"invalid control records: skipped and counted {ignored}; the good publish/activate after them applied "
          f"(fin -> v2); a tombstone under {control_key(route)} cleared the route (task jobs adapter_not_found)")
