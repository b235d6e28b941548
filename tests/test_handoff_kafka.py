"""Exactly-once without the in-flight cap, through the real broker: a job's in-flight seat is free once its
answer is handed to the outbox, so more than `max_inflight` answers wait for one transaction; the memory
bound on waiting answers pauses fetching instead; a read_committed reader sees every job answered exactly
once either way."""

import asyncio
import json

import pytest

from helpers import running_worker, until, worker_config
from lorabus.worker.client import run_jobs

pytestmark = pytest.mark.kafka

JOBS = 40
MAX_INFLIGHT = 4
WATCH_S = 0.005
ANSWER_BYTES = 2048  # more than a one-token result with its key and the outbox's per-answer overhead


async def run_watched(kafka, config, worker) -> tuple[dict, int, int]:
    """Send JOBS one-token jobs; their results (read_committed) and the most answers and bytes that waited."""
    peak = {"answers": 0, "bytes": 0}

    async def watch():
        while True:
            peak["answers"] = max(peak["answers"], worker.output.queued)
            peak["bytes"] = max(peak["bytes"], worker.output.queued_bytes)
            await asyncio.sleep(WATCH_S)

    jobs = [(f"x-{i}", json.dumps({"id": f"x-{i}", "tenant": "acme", "prompt_ids": [5, 6, 7 + i % 9],
                                   "max_new_tokens": 1}).encode()) for i in range(JOBS)]
    watcher = asyncio.create_task(watch())
    try:
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 120,
                                 isolation_level="read_committed")
    finally:
        watcher.cancel()
    return results, peak["answers"], peak["bytes"]


def assert_exactly_once(results):
    assert sorted(results) == sorted(f"x-{i}" for i in range(JOBS))
    assert all(len(copies) == 1 and copies[0].status == "ok" for copies in results.values()), results


async def test_answers_past_max_inflight_wait_for_one_transaction(kafka, tiny_model):
    # A long commit interval: the old outbox held every seat until its transaction, so at most
    # MAX_INFLIGHT answers could ever wait.
    config = worker_config(kafka, tiny_model, exactly_once=True, max_inflight=MAX_INFLIGHT, commit_interval_ms=1500)
    async with running_worker(config) as worker:
        await until(lambda: worker.consuming, 60)
        results, peak_answers, _ = await run_watched(kafka, config, worker)
        assert_exactly_once(results)
        assert peak_answers > MAX_INFLIGHT
        assert worker.output.transactions < JOBS / MAX_INFLIGHT
        assert worker.pipeline.handoff.submit_calls < JOBS  # jobs of one poll share a thread hop


async def test_a_full_outbox_pauses_fetching_and_loses_nothing(kafka, tiny_model):
    bound = 3 * ANSWER_BYTES
    config = worker_config(kafka, tiny_model, exactly_once=True, max_inflight=MAX_INFLIGHT, commit_interval_ms=300,
                           max_uncommitted_bytes=bound)
    async with running_worker(config) as worker:
        await until(lambda: worker.consuming, 60)
        results, _, peak_bytes = await run_watched(kafka, config, worker)
        assert_exactly_once(results)
        # Full, it takes no new job: only the jobs already in flight may still add their answers.
        assert 0 < peak_bytes <= bound + MAX_INFLIGHT * ANSWER_BYTES
