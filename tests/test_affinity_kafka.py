"""Affinity keys through the real broker: `lorabus produce` (default `--key affinity`) sends each adapter's
jobs to as many partitions as its salt count allows of a 6-partition jobs topic (here one each: a fresh
producer's shares are small), base-model jobs spread by id, every job is answered, and the worker hands
its engine the adapters its partitions brought. A fetched record's affinity key makes the worker load
its adapter before the job is even decoded (look-ahead prefetch)."""

import asyncio
import json
from collections import defaultdict

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterPublish
from lorabus.worker import cli
from lorabus.worker.affinity import AffinityKeyer
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.registry import Load
from helpers import read_topic, running_worker, worker_config

PARTITIONS = 6
ADAPTERS = ("qv-r4", "all-r8-rslora", "mlp-r16-patterns")


async def test_produce_keeps_each_adapters_jobs_on_few_partitions(kafka, tiny_model, peft_adapters, tmp_path, capsys):
    config = worker_config(kafka, tiny_model, topic_partitions=PARTITIONS)
    jobs = [{"id": f"aff-{i}", "tenant": "acme", "prompt_ids": [5, 6, 7], "max_new_tokens": 1,
             **({"adapter": ADAPTERS[i % 4]} if i % 4 < 3 else {})} for i in range(48)]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic, [AdapterPublish(name, "v1", str(peft_adapters[name]))
                                                            for name in ADAPTERS])
        code = await asyncio.to_thread(cli.main, [
            "produce", str(path), "--bootstrap-servers", kafka, "--jobs-topic", config.jobs_topic,
            "--results-topic", config.results_topic, "--timeout", "120"])
        expected_home = {f"{name}@v1": 12 for name in ADAPTERS}
        await wait_for(lambda: worker.engine.scheduler.slots.affinity == expected_home, 5)  # pushed every 0.5 s
        home = dict(worker.engine.scheduler.slots.affinity)
    assert code == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in results) == sorted(j["id"] for j in jobs)
    assert all(r["status"] == "ok" for r in results)

    records = await read_topic(kafka, config.jobs_topic, 30, until=lambda rs: len(rs) >= len(jobs))
    partitions_of = defaultdict(set)
    for record in records:
        job = json.loads(record.value)
        partitions_of[job.get("adapter")].add(record.partition)
    keyer = AffinityKeyer(PARTITIONS)  # the producer's keyer, fed the same traffic, says how many salts each got
    for job in jobs:
        keyer.key(job)
    for name in ADAPTERS:
        assert 1 <= len(partitions_of[name]) <= keyer.salts(name) == 1, (name, partitions_of[name])
    assert len(partitions_of[None]) > 1  # base-model jobs keyed by id spread out
    # The worker owns every partition, so every adapter its jobs resolved to is home, counted per job.
    assert home == expected_home


async def wait_for(condition, timeout_s: float = 30.0) -> bool:
    for _ in range(int(timeout_s * 10)):
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


async def test_a_fetched_records_key_prefetches_its_adapter_into_a_free_slot(kafka, tiny_model, peft_adapters,
                                                                               tmp_path):
    # Two device slots, one host slot. a and b load in turn; broken (no files) then evicts a, the least
    # recently used, and frees its slot by failing; the host tier holds b. So a is known, nowhere loaded,
    # and a slot is free.
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_loras=2, max_cpu_loras=1))
    async with running_worker(config) as worker:
        steps = [("a", peft_adapters["qv-r4"], Load.READY), ("b", peft_adapters["all-r8-rslora"], Load.READY),
                 ("broken", tmp_path, Load.FAILED)]
        for name, path, state in steps:
            await publish_control(kafka, config.control_topic, [AdapterPublish(name, "v1", str(path))])
            assert await wait_for(lambda: worker.adapter_health.state(f"{name}@v1") is state), name
        assert await wait_for(lambda: worker.engine.stats()["adapter_slots_used"] == 1)
        assert worker.engine.resident() == ["b@v1"]
        # A base-model job: only its record key names a, so only the look-ahead can load it.
        job = {"id": "look-ahead", "tenant": "acme", "prompt_ids": [5, 6, 7], "max_new_tokens": 1}
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                 [("look-ahead", json.dumps(job).encode())], 60, keys=[b"a#0"])
        assert await wait_for(lambda: "a@v1" in worker.engine.resident(), 5)
    assert results["look-ahead"][0].status == "ok" and results["look-ahead"][0].adapter is None
