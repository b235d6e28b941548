"""Back-pressure through the real broker: with few jobs allowed in flight the worker pauses fetching
(no rebalance), resumes as jobs finish, and still answers every job."""

import json

from aiokafka import AIOKafkaConsumer

from helpers import running_worker, worker_config
from lorabus.worker.client import run_jobs


async def test_pauses_and_resumes_under_load(kafka, tiny_model, monkeypatch):
    calls = {"pause": 0, "resume": 0}
    for name in calls:
        original = getattr(AIOKafkaConsumer, name)

        def spy(self, *parts, _name=name, _original=original):
            calls[_name] += 1
            return _original(self, *parts)

        monkeypatch.setattr(AIOKafkaConsumer, name, spy)
    config = worker_config(kafka, tiny_model, max_inflight=3, topic_partitions=1)
    jobs = [(f"bp-{i}", json.dumps({"id": f"bp-{i}", "tenant": "acme", "prompt_ids": [4, 5, 6],
                                    "max_new_tokens": 8}).encode()) for i in range(30)]
    async with running_worker(config):
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 120)
    assert len(results) == len(jobs) and all(r.status == "ok" for (r,) in results.values())
    assert calls["pause"] >= 1 and calls["resume"] >= 1, calls
