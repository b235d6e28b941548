"""SIGTERM through the real broker: right after an adapter.activate (its warm-up in flight) and while a
job waits on a cold adapter load, `lorabus worker` answers or hands back what it holds, commits, and
exits 0 within its bounds; nothing it took is lost (a second worker answers whatever the first did not)."""

import json
import signal
import time

from aiokafka import AIOKafkaProducer

from lorabus.schemas import AdapterActivate, AdapterPublish, decode_result
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.topics import ensure_topics
from helpers import read_topic, start_worker_process, unique

EXIT_BOUND_S = 60  # drain (held jobs) + engine stop, both bounded by their settings below


async def test_sigterm_after_activate_and_during_a_load(kafka, tiny_model, peft_adapters, tmp_path):
    tag = unique("term")
    topics = {t: f"{t}-{tag}" for t in ("jobs", "results", "control", "dlq")}
    await ensure_topics(kafka, {topics["jobs"]: 2, topics["results"]: 2, topics["control"]: 1, topics["dlq"]: 1})
    names = list(peft_adapters)
    await publish_control(kafka, topics["control"], [AdapterPublish(n, "v1", str(peft_adapters[n])) for n in names])
    group = f"g-{tag}"
    settings = dict(drain_timeout_ms=20000, stop_timeout_s=10, max_loras=1)
    first = start_worker_process(kafka, tiny_model, topics, group, tmp_path / "first.log", **settings)
    try:
        # A worker is up once it answers a job.
        ready = await run_jobs(kafka, topics["jobs"], topics["results"], [("ready", json.dumps(
            {"id": "ready", "tenant": "t", "prompt_ids": [5, 6], "max_new_tokens": 2}).encode())], 120)
        assert ready["ready"][0].status == "ok"
        # A new version activated (warm-up on every worker), then jobs for two other adapters with a single
        # device slot: one of them waits on a load while SIGTERM arrives.
        await publish_control(kafka, topics["control"], [AdapterPublish(names[0], "v2", str(peft_adapters[names[1]])),
                                                         AdapterActivate(names[0], "v2")])
        jobs = [(f"held-{i}", json.dumps({"id": f"held-{i}", "tenant": "t", "adapter": names[1 + i % 2],
                                          "prompt_ids": [4, 5, 6], "max_new_tokens": 8}).encode()) for i in range(6)]
        producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
        await producer.start()
        for job_id, value in jobs:
            await producer.send(topics["jobs"], value, key=job_id.encode())
        await producer.stop()
        time.sleep(0.3)
        first.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = first.wait(EXIT_BOUND_S)
        took = time.monotonic() - started
        assert code == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    # Whatever the first worker did not answer, its successor in the group does: nothing is lost.
    second = start_worker_process(kafka, tiny_model, topics, group, tmp_path / "second.log", **settings)
    try:
        ids = {job_id for job_id, _ in jobs}
        records = await read_topic(kafka, topics["results"], 120,
                                   until=lambda rs: ids <= {decode_result(r.value).id for r in rs})
        results = {}
        for record in records:
            result = decode_result(record.value)
            results.setdefault(result.id, []).append(result)
        assert ids <= results.keys(), f"never answered: {ids - results.keys()}"
        up = await run_jobs(kafka, topics["jobs"], topics["results"], [("ready-2", json.dumps(
            {"id": "ready-2", "tenant": "t", "prompt_ids": [5, 6], "max_new_tokens": 2}).encode())], 120)
        assert up["ready-2"][0].status == "ok"
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(EXIT_BOUND_S) == 0
    assert all(copies[0].status == "ok" for copies in results.values()), results
    print(f"SIGTERM after activate with jobs waiting on loads: exit 0 in {took:.1f} s; "
          f"{len(results)}/{len(jobs)} held jobs answered across the two workers")


