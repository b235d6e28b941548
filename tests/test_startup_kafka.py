"""Start-up on a large control log, through the real broker (issue 20, R1): a worker whose control topic
holds thousands of adapter names reaches ready within a bound, its event loop never stalls meanwhile
(heartbeats, health pages), it answers jobs at once after ready while the names' warm-ups go on behind
them, and SIGTERM during start-up stops it promptly. The code before the fix re-derived every name's
serving order after each of the start-up loads (quadratic: minutes for 3,000 names, the loop blocked
throughout) and ignored SIGTERM until it had settled."""

import asyncio
import json
import time

import pytest

from lorabus.schemas import AdapterPublish
from lorabus.worker.client import run_jobs
from lorabus.worker.testing import build_sample_adapter
from lorabus.worker.service import Worker
from lorabus.worker.topics import ensure_worker_topics
from helpers import publish_control_bulk, worker_config

pytestmark = pytest.mark.kafka

NAMES = 3000
READY_WITHIN_S = 30.0  # measured ~10 s here (model, 3,000 records, the bounded settle); the old code: minutes
ANSWER_WITHIN_S = 10.0  # a job sent right after ready: its adapter's load and a few steps
MAX_LOOP_LAG_S = 1.0  # well under the group's session timeout: the worker keeps its heartbeats
STOP_WITHIN_S = 10.0


def _job(job_id: str, adapter: str | None) -> tuple[str, bytes]:
    body = {"id": job_id, "tenant": "acme", "prompt_ids": [4, 5, 6], "max_new_tokens": 2}
    if adapter is not None:
        body["adapter"] = adapter
    return job_id, json.dumps(body).encode()


async def _watch_loop_lag(worker: Worker, worst: list[float]) -> None:
    while True:
        worst[0] = max(worst[0], worker.health_checks.loop_lag_s)
        await asyncio.sleep(0.2)


async def _worker_on_a_large_log(kafka: str, tiny_model, tmp_path, control_wait_ms: int) -> Worker:
    """A worker (not started) whose control topic already holds NAMES published adapter names."""
    adapter = build_sample_adapter(tmp_path / "adapter", tiny_model, rank=4)
    config = worker_config(kafka, tiny_model, control_wait_ms=control_wait_ms)
    await ensure_worker_topics(config)
    await publish_control_bulk(kafka, config.control_topic,
                               [AdapterPublish(f"a{i}", "v1", str(adapter)) for i in range(NAMES)])
    return Worker(config)


async def test_a_worker_starts_on_thousands_of_names_and_serves_at_once(kafka, tiny_model, tmp_path):
    # A short settle, so the bound measures the log's cost, not how long a worker waits for 3,000 warm-ups.
    worker = await _worker_on_a_large_log(kafka, tiny_model, tmp_path, control_wait_ms=3000)
    worst_lag = [0.0]
    started = time.monotonic()
    task = asyncio.create_task(worker.run())
    watcher = asyncio.create_task(_watch_loop_lag(worker, worst_lag))
    try:
        def ready() -> bool:  # what /readyz answers: every check, the event loop's lag included
            return all(check.ok for check in worker.health_checks.ready().values())
        while not ready() and time.monotonic() - started < READY_WITHIN_S and not task.done():
            await asyncio.sleep(0.1)
        ready_s = time.monotonic() - started
        assert ready(), f"not ready {ready_s:.1f} s after start: {worker.health_checks.ready()}"
        assert worker.control_log.names()[:2] == ["a0", "a1"] and len(worker.control_log.names()) == NAMES
        sent = time.monotonic()
        results = await run_jobs(kafka, worker.config.jobs_topic, worker.config.results_topic,
                                 [_job("by-name", f"a{NAMES - 1}"), _job("base", None)], ANSWER_WITHIN_S)
        answered_s = time.monotonic() - sent
        assert {job_id: r.status for job_id, (r,) in results.items()} == {"by-name": "ok", "base": "ok"}, results
        assert results["by-name"][0].adapter_version == "v1"
        assert worker.adapter_health.states, "no warm-up ever finished"
        assert worst_lag[0] < MAX_LOOP_LAG_S, f"the event loop ran {worst_lag[0]:.2f} s late during start-up"
        assert ready(), worker.health_checks.ready()  # still ready while the names' warm-ups go on
        print(f"{NAMES} names: ready in {ready_s:.1f} s, two jobs answered {answered_s:.2f} s later, "
              f"worst loop lag {worst_lag[0] * 1000:.0f} ms, {len(worker.adapter_health.states)} versions tried so far")
    finally:
        watcher.cancel()
        worker.stop()
        await asyncio.wait_for(task, 60)


async def test_sigterm_during_start_up_stops_the_worker_promptly(kafka, tiny_model, tmp_path):
    # A settle that would wait minutes: only the stop can end this start-up in time.
    worker = await _worker_on_a_large_log(kafka, tiny_model, tmp_path, control_wait_ms=600_000)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 60
    while worker.control_offset == 0 and time.monotonic() < deadline and not task.done():
        await asyncio.sleep(0.02)
    assert worker.control_offset > 0 and not worker.caught_up and not worker.consuming
    stopped_at = time.monotonic()
    worker.stop()  # what the CLI's SIGTERM handler calls
    await asyncio.wait_for(task, 60)
    took = time.monotonic() - stopped_at
    assert took < STOP_WITHIN_S, f"stopping during start-up took {took:.1f} s"
    assert not worker.consuming
