"""A route whose targets are a plain version and a weighted mix, through the real broker: jobs of the task
split by the sticky user between the two, a user keeps its target, every result names the route and what
served it (the mix: every member's version), and the mix's greedy tokens equal PEFT's
`add_weighted_adapter(..., combination_type="cat")` (members of different ranks and target modules, one
rsLoRA, a negative weight)."""

import asyncio
import json
import time

import msgspec

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterPublish, MixMember, RouteSet, RouteTarget
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.routing import pick_target
from helpers import MIX_MAX_RANK, MIX_PROMPTS, MixOracle, running_worker, worker_config


MIX = (("mlp", 0.6), ("rs", -0.5))  # Σr 24 at o_proj and gate/up: within MIX_MAX_RANK
USERS_PER_TARGET = 2


def _routed(worker) -> dict[str, float]:
    """lorabus_routed_jobs_total by its adapter label."""
    return {sample.labels["adapter"]: sample.value for metric in worker.metrics.routed_jobs.collect()
            for sample in metric.samples if sample.name.endswith("_total")}


async def test_a_route_splits_a_task_between_a_version_and_a_mix(kafka, tiny_model, peft_adapters):
    paths = {"qv": peft_adapters["qv-r4"], "rs": peft_adapters["all-r8-rslora"],
             "mlp": peft_adapters["mlp-r16-patterns"]}
    oracle = MixOracle(tiny_model, paths)
    route = RouteSet(task="ner", event_id="route-mix-1", targets=[
        RouteTarget(adapter="qv@v1", weight=50),
        RouteTarget(mix=[MixMember(f"{name}@v1", weight) for name, weight in MIX], weight=50)])
    # Users the sticky hash sends to each target (the split itself is tested in tests/test_routing.py).
    candidates = [f"user-{i}" for i in range(64)]
    users = [u for u in candidates if pick_target(route, u, "-").adapter][:USERS_PER_TARGET]
    users += [u for u in candidates if pick_target(route, u, "-").mix][:USERS_PER_TARGET]
    jobs, asked = [], {}
    for round_ in range(2):  # each user twice: the second job must land on the same target
        for i, user in enumerate(users):
            job_id, prompt = f"{round_}-{user}", MIX_PROMPTS[i % len(MIX_PROMPTS)]
            asked[job_id] = (user, prompt)
            jobs.append((job_id, json.dumps({"id": job_id, "tenant": "acme", "task": "ner", "user": user,
                                             "prompt": prompt, "max_new_tokens": 6}).encode()))
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_lora_rank=MIX_MAX_RANK))
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic,
                              [AdapterPublish(name, "v1", str(path)) for name, path in paths.items()] + [route])
        results = {job_id: copies[0] for job_id, copies in
                   (await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, timeout_s=180)).items()}
        # A result can be read before the worker, back from delivering it, has counted it: wait briefly.
        deadline = time.monotonic() + 10
        while sum((routed := _routed(worker)).values()) < len(jobs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    assert len(results) == len(jobs)
    served = {}
    for job_id, result in results.items():
        user, prompt = asked[job_id]
        assert result.status == "ok", msgspec.json.encode(result)
        assert (result.task, result.route_event_id) == ("ner", "route-mix-1")
        if result.mix is None:
            assert (result.adapter, result.adapter_version) == ("qv", "v1")
            which = paths["qv"]
        else:
            assert result.adapter is None and result.adapter_version is None
            assert [(m.adapter, m.version, m.weight) for m in result.mix] == [(n, "v1", w) for n, w in MIX]
            which = MIX
        oracle.assert_matches(which, oracle.prompt_ids(prompt), result.token_ids, 6, label=job_id)
        served.setdefault(user, set()).add("mix" if result.mix else "plain")
    # Sticky: both of a user's jobs went to the target the documented hash picks for it.
    assert served == {u: {"mix" if pick_target(route, u, "-").mix else "plain"} for u in users}, served
    assert routed == {"qv": 2 * USERS_PER_TARGET, "mix": 2 * USERS_PER_TARGET}
