"""The metrics port of an in-process worker on the real broker: `/readyz` turns 200 once the worker
consumes and names every check, and 503 while the event loop is blocked; `/healthz` answers, other
paths are 404, the job counters add up, and `lorabus_consumer_lag` follows partition ownership: after a
second member joins the group, the worker exports lag only for the partitions it still owns."""

import asyncio
import json
import time
import urllib.error
import urllib.request

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client.parser import text_string_to_metric_families

from lorabus.worker.client import run_jobs
from helpers import running_worker, worker_config

pytestmark = pytest.mark.kafka

PARTITIONS = 3


async def _get(url: str) -> tuple[int, bytes]:
    """A GET from a thread: the health pages call into this event loop, which must stay free to answer."""
    def get():
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
    return await asyncio.to_thread(get)


def _get_blocking(url: str, after_s: float) -> tuple[int, bytes]:
    time.sleep(after_s)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def _until(what, timeout_s: float, message):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await what()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(message())


def _samples(text: str, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name}


def _key_for(partition: int) -> bytes:
    """A record key Kafka's default partitioner sends to `partition`."""
    partitioner = DefaultPartitioner()
    return next(key for i in range(1000) if partitioner(key := f"k{i}".encode(), list(range(PARTITIONS)),
                                                          list(range(PARTITIONS))) == partition)


async def test_health_pages_and_lag_after_a_rebalance(kafka, tiny_model):
    config = worker_config(kafka, tiny_model, metrics_port=0, topic_partitions=PARTITIONS)
    async with running_worker(config) as worker:
        async def port():
            return worker.metrics_port
        await _until(port, 60, lambda: "the metrics port never opened")
        base = f"http://127.0.0.1:{worker.metrics_port}"
        last = {}

        async def ready():
            last["readyz"] = await _get(f"{base}/readyz")
            return last["readyz"][0] == 200
        await _until(ready, 60, lambda: f"never ready: {last['readyz']}")
        checks = json.loads(last["readyz"][1])["checks"]
        assert set(checks) == {"model", "broker", "control_log", "consuming", "event_loop"}
        assert all(check["ok"] and check["detail"] for check in checks.values()), checks

        # An event loop that cannot serve makes the worker not ready, whatever else holds: block it for
        # 1.6 s (as a CPU-bound step on the loop would) and ask from a thread meanwhile.
        blocked = asyncio.get_running_loop().run_in_executor(None, _get_blocking, f"{base}/readyz", 1.0)
        time.sleep(1.6)
        status, body = await blocked
        assert status == 503 and not json.loads(body)["checks"]["event_loop"]["ok"], body
        assert "late" in json.loads(body)["checks"]["event_loop"]["detail"], body
        await _until(ready, 10, lambda: f"not ready again after the loop was freed: {last['readyz']}")
        status, body = await _get(f"{base}/healthz")
        assert status == 200, body
        assert set(json.loads(body)["checks"]) == {"event_loop", "engine_thread"}
        assert (await _get(f"{base}/nothing-here"))[0] == 404

        # One job per partition, so each has a committed offset and a lag series.
        keys = [_key_for(p) for p in range(PARTITIONS)]
        jobs = [(f"h-{p}", json.dumps({"id": f"h-{p}", "tenant": "acme", "prompt_ids": [4, 5, 6 + p],
                                       "max_new_tokens": 4}).encode()) for p in range(PARTITIONS)]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 60, keys=keys)
        assert all(r.status == "ok" for (r,) in results.values())

        async def lag_series():
            text = (await _get(f"{base}/metrics"))[1].decode()
            last["metrics"] = text
            return {int(dict(labels)["partition"]) for labels in _samples(text, "lorabus_consumer_lag")
                    if dict(labels)["topic"] == config.jobs_topic}
        assert await _until(lambda: _full(lag_series), 30,
                            lambda: f"no lag for every partition: {_samples(last['metrics'], 'lorabus_consumer_lag')}")
        text = last["metrics"]
        assert _samples(text, "lorabus_job_results_total") == {(("status", "ok"),): 3.0}
        assert _samples(text, "lorabus_jobs_completed_total")[(("adapter", "base"), ("version", ""))] == 3.0
        assert _samples(text, "lorabus_prompt_tokens_total")[()] == 9.0
        multi_token = sum(r.usage.completion_tokens >= 2 for (r,) in results.values())
        assert _samples(text, "lorabus_time_per_output_token_seconds_count")[()] == multi_token
        assert "_created" not in text and "lorabus_build_info{" in text

        # A second member joins the group: the worker gives partitions up, and their lag with them.
        intruder = AIOKafkaConsumer(config.jobs_topic, bootstrap_servers=kafka, group_id=config.group_id,
                                    enable_auto_commit=False)
        producer = AIOKafkaProducer(bootstrap_servers=kafka)
        await intruder.start()
        await producer.start()
        try:
            async def split():
                await intruder.getmany(timeout_ms=200)
                theirs = {tp.partition for tp in intruder.assignment()}
                ours = {tp.partition for tp in worker.jobs.assignment()}
                return (theirs, ours) if theirs and ours and not theirs & ours else None
            theirs, ours = await _until(split, 40, lambda: "the group never split its partitions")
            for p in range(PARTITIONS):  # new records everywhere: the worker takes (and reports) only its own
                await producer.send_and_wait(config.jobs_topic, jobs[p][1], key=keys[p])

            async def only_ours():
                await intruder.getmany(timeout_ms=100)  # stay in the group (never commits)
                return await lag_series() == ours
            await _until(only_ours, 30, lambda: f"lag series {_samples(last['metrics'], 'lorabus_consumer_lag')}, "
                                                f"worker owns {ours}, the other member {theirs}")
            status, body = await _get(f"{base}/readyz")
            assert status == 200, body
            detail = json.loads(body)["checks"]["consuming"]["detail"]
            assert all(f"{config.jobs_topic}:{p}" in detail for p in ours), detail
            assert not any(f"{config.jobs_topic}:{p}" in detail for p in theirs), detail
        finally:
            await producer.stop()
            await intruder.stop()


async def _full(lag_series) -> bool:
    return await lag_series() == set(range(PARTITIONS))
