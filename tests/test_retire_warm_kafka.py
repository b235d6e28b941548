"""adapter.retire and adapter.warm through the real broker: retiring a version while a job runs on it
lets that job finish while new jobs naming it get adapter_not_found; the CLI refuses to retire the
activated version (nothing is sent); warm loads a version into a device slot without any job asking for it."""

import asyncio
import json
import sys
import time

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterActivate, AdapterPublish, AdapterWarm
from lorabus.worker.client import publish_control, run_jobs
from helpers import PeftOracle, running_worker, worker_config

PROMPT = [5, 6, 7]


def _job(job_id, adapter, max_new_tokens=4):
    return job_id, json.dumps({"id": job_id, "tenant": "acme", "adapter": adapter, "prompt_ids": PROMPT,
                               "max_new_tokens": max_new_tokens}).encode()


async def _cli(*args, expect=0):
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "lorabus.worker.cli", *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode == expect, err.decode()[-2000:]
    return out.decode() + err.decode()


async def test_retire_lets_running_jobs_finish_and_warm_loads_without_traffic(kafka, tiny_model, peft_adapters):
    # One device slot: publishing prefetches into free slots, so only warm can put v3 there.
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_loras=1))
    v1, v2, v3 = peft_adapters["qv-r4"], peft_adapters["all-r8-rslora"], peft_adapters["mlp-r16-patterns"]
    oracle = PeftOracle(tiny_model)
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic, [
            AdapterPublish("fin", "v1", str(v1)), AdapterPublish("fin", "v2", str(v2)),
            AdapterPublish("fin", "v3", str(v3))])
        long_job = asyncio.create_task(run_jobs(kafka, config.jobs_topic, config.results_topic,
                                                [_job("long-v1", "fin@v1", max_new_tokens=300)], 120))
        while not worker.engine.stats()["running"]:  # the long job is decoding on v1
            await asyncio.sleep(0.01)
        await publish_control(kafka, config.control_topic, [AdapterActivate("fin", "v2")])
        sent = await _cli("rollout", "retire", "fin", "v1", "--bootstrap-servers", kafka,
                          "--control-topic", config.control_topic)
        assert sent.startswith("sent adapter.retire ")
        after = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                               [_job("after-retire", "fin@v1"), _job("by-name", "fin")], 60)
        long_result = (await long_job)["long-v1"][0]
        # The CLI refuses to retire the activated version: nothing is sent, it keeps serving.
        refusal = await _cli("rollout", "retire", "fin", "v2", "--bootstrap-servers", kafka,
                             "--control-topic", config.control_topic, expect=2)
        assert "fin@v3" not in worker.engine.resident()
        await publish_control(kafka, config.control_topic, [AdapterWarm("fin", "v3"), AdapterWarm("fin", "v9")])
        deadline = time.monotonic() + 30
        while "fin@v3" not in worker.engine.resident() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        warmed = "fin@v3" in worker.engine.resident()
        still = await run_jobs(kafka, config.jobs_topic, config.results_topic, [_job("still-v2", "fin")], 60)
        ignored = {s.labels["reason"]: s.value for m in worker.metrics.control_ignored.collect() for s in m.samples
                   if s.name.endswith("_total")}

    assert long_result.status == "ok" and long_result.adapter_version == "v1"
    oracle.assert_matches(v1, PROMPT, long_result.token_ids, 300, "long-v1")
    assert after["after-retire"][0].error.code == "adapter_not_found"
    assert (after["by-name"][0].status, after["by-name"][0].adapter_version) == ("ok", "v2")
    assert (still["still-v2"][0].status, still["still-v2"][0].adapter_version) == ("ok", "v2")
    assert warmed, "adapter.warm did not load fin@v3 into a device slot"
    assert "activate another version first" in refusal and "nothing sent" in refusal, refusal
    assert ignored == {}, ignored  # the warm of an unknown version is a no-op, not a skipped record
    print(f"retire: the job running on v1 finished with {len(long_result.token_ids)} tokens equal to PEFT's; "
          f"new v1 jobs adapter_not_found; warm loaded fin@v3 with no job; control records skipped: {ignored}")
