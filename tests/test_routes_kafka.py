"""Task routes through the real broker, two workers in one group: a 95/5 canary lands within the binomial
99.9% interval, every user lands on the same version on every send and on either worker, results say
which route and version served them (greedy tokens equal PEFT's for that version), an explicit adapter
wins over the route, a tenant's own route wins over the task's, and unroute ends the task's traffic."""

import asyncio
import json
import math
import time
from dataclasses import replace

from lorabus.schemas import AdapterPublish, RouteDelete, RouteSet, RouteTarget
from lorabus.worker.client import publish_control, run_jobs
from helpers import PeftOracle, running_worker, worker_config

USERS = 2000
Z_999 = 3.2905
PROMPT = [5, 6, 7]


def _job(job_id, **fields):
    return job_id, json.dumps({"id": job_id, "tenant": "acme", "prompt_ids": PROMPT, "max_new_tokens": 2,
                               **fields}).encode()


async def test_canary_split_is_sticky_and_traceable(kafka, tiny_model, peft_adapters):
    config = worker_config(kafka, tiny_model, topic_partitions=4)
    versions = {"v1": peft_adapters["qv-r4"], "v2": peft_adapters["all-r8-rslora"]}
    oracle = PeftOracle(tiny_model)
    async with running_worker(replace(config, worker_id="w-1")) as w1, \
            running_worker(replace(config, worker_id="w-2")) as w2:
        deadline = time.monotonic() + 60
        while not (w1.partitions and w2.partitions) and time.monotonic() < deadline:  # both in the group
            await asyncio.sleep(0.05)
        assert w1.partitions and w2.partitions, "the two workers did not share the jobs topic"
        await publish_control(kafka, config.control_topic, [
            *(AdapterPublish("fin", v, str(path)) for v, path in versions.items()),
            RouteSet(task="ner", targets=[RouteTarget(adapter="fin@v1", weight=95),
                                          RouteTarget(adapter="fin@v2", weight=5)], event_id="canary-1"),
            RouteSet(task="ner", tenant="vip", targets=[RouteTarget(adapter="fin@v2", weight=1)], event_id="vip-1"),
        ])
        jobs = [_job(f"{rnd}-{i}", task="ner", user=f"user-{i}") for rnd in ("a", "b") for i in range(USERS)]
        jobs += [_job("explicit", task="ner", adapter="fin@v2"), _job("base"),
                 _job("vip", task="ner", tenant="vip"), _job("no-route", task="summarize")]
        results = {job_id: copies[0] for job_id, copies in
                   (await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 300)).items()}
        routed_counts: dict[tuple, float] = {}
        for worker in (w1, w2):
            for metric in worker.metrics.routed_jobs.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        labels = (sample.labels["task"], sample.labels["version"], sample.labels["status"])
                        routed_counts[labels] = routed_counts.get(labels, 0) + sample.value
        await publish_control(kafka, config.control_topic, [RouteDelete(task="ner", event_id="unroute-1")])
        after = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                               [_job("after-unroute", task="ner", user="user-1")], 60)

    assert len(results) == len(jobs) and all(r.status == "ok" for k, r in results.items() if k != "no-route")
    first = {i: results[f"a-{i}"] for i in range(USERS)}
    share = sum(r.adapter_version == "v2" for r in first.values()) / USERS
    half = Z_999 * math.sqrt(0.05 * 0.95 / USERS)
    assert 0.05 - half <= share <= 0.05 + half, share
    assert all(results[f"b-{i}"].adapter_version == first[i].adapter_version for i in range(USERS))  # sticky
    served_by = {r.worker for r in results.values()}
    assert len(served_by) == 2, served_by  # both workers served ...
    crossed = sum(results[f"a-{i}"].worker != results[f"b-{i}"].worker for i in range(USERS))
    assert crossed > 0  # ... and users whose two jobs went to different workers still kept their version
    assert all(r.task == "ner" and r.route_event_id == "canary-1" and r.adapter == "fin"
               for k, r in results.items() if k[:2] in ("a-", "b-"))
    for version, path in versions.items():  # every result's tokens are those of the version it names
        for result in [r for r in first.values() if r.adapter_version == version][:3]:
            oracle.assert_matches(path, PROMPT, result.token_ids, 2, f"{result.id} on {version}")
    # lorabus_routed_jobs_total counts every routed job by the version that served it (the explicit one is not routed).
    routed = [r for k, r in results.items() if r.task is not None]
    expected = {}
    for r in routed:
        key = (r.task, r.adapter_version, r.status)
        expected[key] = expected.get(key, 0) + 1
    assert routed_counts == expected, (routed_counts, expected)
    assert (results["explicit"].adapter_version, results["explicit"].task) == ("v2", None)
    assert (results["base"].adapter, results["base"].task) == (None, None)
    assert (results["vip"].adapter_version, results["vip"].route_event_id) == ("v2", "vip-1")
    assert results["no-route"].error.code == "adapter_not_found"
    assert after["after-unroute"][0].error.code == "adapter_not_found"
    print(f"canary: fin@v2 share {share:.3%} over {USERS} users (99.9% interval {0.05 - half:.3%}..{0.05 + half:.3%}); "
          f"{USERS} users sent twice, 0 moved ({crossed} of them served by a different worker the second time); "
          f"served by {len(served_by)} workers")
