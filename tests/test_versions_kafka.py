"""Adapter versions through the real broker: activate (hot swap), roll back, and re-publish a version with
new content; every result names the version that served it and matches PEFT running that version."""

import json

from lorabus.schemas import AdapterActivate, AdapterPublish
from helpers import PeftOracle, running_worker, worker_config
from lorabus.worker.client import publish_control, run_jobs


async def test_activate_rollback_and_republish(kafka, tiny_model, peft_adapters):
    oracle = PeftOracle(tiny_model)
    v1, v2 = peft_adapters["qv-r4"], peft_adapters["all-r8-rslora"]
    prompt = oracle.prompt_ids("the quick brown fox")
    config = worker_config(kafka, tiny_model)
    rounds = 0

    async def serve(ref):
        nonlocal rounds
        rounds += 1
        jobs = [(f"r{rounds}-{i}", json.dumps({"id": f"r{rounds}-{i}", "tenant": "acme", "adapter": ref,
                                               "prompt_ids": prompt, "max_new_tokens": 6}).encode())
                for i in range(3)]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, 60)
        assert len(results) == len(jobs)
        return [r for (r,) in results.values()]

    def check(results, version, weights):
        for result in results:
            assert result.status == "ok", result
            assert (result.adapter, result.adapter_version) == ("fin", version)
            oracle.assert_matches(weights, prompt, result.token_ids, 6, result.id)

    async with running_worker(config):
        await publish_control(kafka, config.control_topic, [AdapterPublish("fin", "v1", str(v1))])
        check(await serve("fin"), "v1", v1)
        # Publishing v2 does not move traffic; activating it does (hot swap), and activating v1 rolls back.
        await publish_control(kafka, config.control_topic, [AdapterPublish("fin", "v2", str(v2))])
        check(await serve("fin"), "v1", v1)
        check(await serve("fin@v2"), "v2", v2)
        await publish_control(kafka, config.control_topic, [AdapterActivate("fin", "v2")])
        check(await serve("fin"), "v2", v2)
        await publish_control(kafka, config.control_topic, [AdapterActivate("fin", "v1")])
        check(await serve("fin"), "v1", v1)
        # Same name and version, new content: the resident copy must not be served again.
        await publish_control(kafka, config.control_topic, [AdapterPublish("fin", "v1", str(v2))])
        check(await serve("fin@v1"), "v1", v2)
