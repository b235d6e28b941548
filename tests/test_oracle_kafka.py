"""The PEFT oracle through the real broker: jobs for three adapters and the bare base model, interleaved,
served in mixed batches by one worker; every result's greedy tokens must equal PEFT running that
adapter alone. The adapters are published immediately before the jobs (read-your-writes)."""

import asyncio
import json
import time

import msgspec
import pytest

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterPublish
from helpers import PeftOracle, running_worker, worker_config
from lorabus.worker.client import publish_control, run_jobs

PROMPTS = ["the quick brown fox", "hello world", "summarize: the meeting moved to thursday",
           "classify sentiment: i loved this film", "jobs arrive on kafka", "translate english to french: hello"]


@pytest.mark.parametrize("max_loras", [0, 2], ids=["auto-slots", "fewer-slots-than-adapters"])
async def test_mixed_adapter_jobs_match_peft(kafka, tiny_model, peft_adapters, max_loras):
    oracle = PeftOracle(tiny_model)
    names = [None, *peft_adapters]
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_loras=max_loras))
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic,
                              [AdapterPublish(name, "v1", str(path)) for name, path in peft_adapters.items()])
        if not max_loras:  # publishing warms each adapter up (load + one step) before any job names it
            deadline = time.monotonic() + 30
            while len(worker.engine.resident()) < len(peft_adapters) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert sorted(worker.engine.resident()) == sorted(f"{name}@v1" for name in peft_adapters)
        jobs, expected = [], {}
        for i in range(36):
            adapter, prompt = names[i % len(names)], PROMPTS[i % len(PROMPTS)]
            job = {"id": f"job-{i}", "tenant": f"t{i % 3}", "max_new_tokens": 6 + i % 5}
            if adapter is not None:
                job["adapter"] = adapter if i % 2 else f"{adapter}@v1"
            if i % 3 == 0:
                job["prompt_ids"] = oracle.prompt_ids(prompt)
            else:
                job["prompt"] = prompt
            jobs.append((job["id"], json.dumps(job).encode()))
            expected[job["id"]] = (adapter, oracle.prompt_ids(prompt), job["max_new_tokens"])
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, timeout_s=120)
        registry = worker.metrics.registry
        steps = registry.get_sample_value("lorabus_step_adapters_count")
        single = registry.get_sample_value("lorabus_step_adapters_bucket", {"le": "1.0"})
    assert steps > single, "no forward pass mixed two or more adapters"

    assert set(results) == set(expected), f"missing results: {set(expected) - set(results)}"
    served_adapters = set()
    for job_id, (adapter, prompt_ids, max_new) in expected.items():
        (result,) = results[job_id]
        assert result.status == "ok", msgspec.json.encode(result)
        assert result.adapter == adapter
        assert result.adapter_version == ("v1" if adapter else None)
        assert result.usage.prompt_tokens == len(prompt_ids)
        assert result.usage.completion_tokens == len(result.token_ids)
        assert result.finish_reason in ("stop", "length")
        oracle.assert_matches(peft_adapters.get(adapter), prompt_ids, result.token_ids, max_new, label=job_id)
        served_adapters.add(adapter)
    assert served_adapters == set(names)
