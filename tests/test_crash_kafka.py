"""Crash recovery through the real broker: kill -9 a worker mid-run, start another in the same group;
every job gets an ok result. At-least-once: duplicates of greedy jobs carry identical tokens.
Exactly-once: a read_committed reader sees exactly one result per job (the restarted worker shares the
killed one's group instance id, so its transactional id fences what the killed one left open)."""

import json
import signal

import pytest
from aiokafka import AIOKafkaProducer

from lorabus.schemas import AdapterPublish, decode_result
from helpers import read_topic, start_worker_process, unique
from lorabus.worker.client import publish_control
from lorabus.worker.topics import ensure_topics

pytestmark = pytest.mark.kafka


def _start_worker(kafka, model, topics, group, log_path, exactly_once):
    # A small batch keeps the first worker busy long enough to be killed mid-run.
    extra = dict(exactly_once="true", group_instance_id="crash-worker") if exactly_once else {}
    return start_worker_process(kafka, model, topics, group, log_path, max_running=2, max_step_tokens=16, **extra)


@pytest.mark.parametrize("exactly_once", [False, True], ids=["at-least-once", "exactly-once"])
async def test_kill_9_mid_run_loses_no_job(kafka, tiny_model, peft_adapters, tmp_path, exactly_once):
    tag = unique("crash")
    topics = {t: f"{t}-{tag}" for t in ("jobs", "results", "control", "dlq")}
    await ensure_topics(kafka, {topics["jobs"]: 3, topics["results"]: 3, topics["control"]: 1, topics["dlq"]: 1})
    await publish_control(kafka, topics["control"],
                          [AdapterPublish(name, "v1", str(path)) for name, path in peft_adapters.items()])
    names = [None, *peft_adapters]
    ids = [f"c-{i}" for i in range(40)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    for i, job_id in enumerate(ids):
        job = {"id": job_id, "tenant": "acme", "adapter": names[i % 4], "prompt_ids": [3 + i % 7, 9, 11],
               "max_new_tokens": 24}
        await producer.send(topics["jobs"], json.dumps(job).encode(), key=job_id.encode())
    await producer.stop()

    def by_id(records) -> dict[str, list]:
        results: dict[str, list] = {}
        for record in records:
            result = decode_result(record.value)
            results.setdefault(result.id, []).append(result)
        return results

    async def read(until, timeout_s) -> dict[str, list]:
        """Every result on the topic, by job id, read from its beginning until `until(results)` holds."""
        records = await read_topic(kafka, topics["results"], timeout_s, lambda records: until(by_id(records)),
                                   isolation_level="read_committed" if exactly_once else "read_uncommitted")
        return by_id(records)

    group = f"g-{tag}"
    first = _start_worker(kafka, tiny_model, topics, group, tmp_path / "first.log", exactly_once)
    try:
        results = await read(lambda results: len(results) >= 8, 120)
        assert 8 <= len(results) < len(ids), f"first worker answered {len(results)} jobs; wanted a mid-run kill"
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        answered_before = len(results)
        second = _start_worker(kafka, tiny_model, topics, group, tmp_path / "second.log", exactly_once)
        try:
            results = await read(lambda results: set(ids) <= results.keys(), 180)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()

    assert set(ids) <= results.keys(), f"jobs never answered: {set(ids) - results.keys()}"
    duplicates = 0
    for job_id in ids:
        copies = results[job_id]
        assert all(r.status == "ok" for r in copies), copies
        assert len({tuple(r.token_ids) for r in copies}) == 1, f"{job_id}: duplicates disagree: {copies}"
        duplicates += len(copies) - 1
    if exactly_once:
        assert duplicates == 0, f"{duplicates} duplicate results visible to a read_committed reader"
    print(f"{'exactly' if exactly_once else 'at-least'}-once: answered before the kill: {answered_before}/{len(ids)}; duplicate results after restart: {duplicates}")
