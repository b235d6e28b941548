"""--auto-offset-reset on the real broker: a jobs group with no committed offsets answers the jobs already on
the topic with `earliest` (the default), and only jobs sent after it joined with `latest`."""

import asyncio
import json
import time

import pytest
from aiokafka import AIOKafkaProducer

from lorabus.schemas import decode_result
from lorabus.worker.client import run_jobs
from lorabus.worker.topics import ensure_worker_topics
from helpers import read_topic, running_worker, worker_config


def job(job_id: str) -> bytes:
    return json.dumps({"id": job_id, "tenant": "acme", "prompt_ids": [5, 6], "max_new_tokens": 1}).encode()


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_where_a_new_group_starts(kafka, tiny_model, reset):
    config = worker_config(kafka, tiny_model, auto_offset_reset=reset)
    await ensure_worker_topics(config)
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:  # before the group exists
        await producer.send_and_wait(config.jobs_topic, job("before"), key=b"before")
    finally:
        await producer.stop()
    async with running_worker(config) as worker:
        deadline = time.monotonic() + 60
        while not (hasattr(worker, "jobs") and worker.jobs.assignment()) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for tp in worker.jobs.assignment():  # resolve where the group starts before sending the next job
            await worker.jobs.position(tp)
        answered = await run_jobs(kafka, config.jobs_topic, config.results_topic, [("after", job("after"))], 60)
        assert "after" in answered
        results = await read_topic(kafka, config.results_topic, 3 if reset == "latest" else 30,
                                   until=lambda records: len(records) >= 2)
    ids = sorted(decode_result(r.value).id for r in results)
    assert ids == (["after", "before"] if reset == "earliest" else ["after"])
