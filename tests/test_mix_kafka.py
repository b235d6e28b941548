"""Weighted adapter mixes through the real broker, against PEFT: jobs asking for mixes (different ranks
and target modules, rank/alpha patterns, rsLoRA, negative weights, the most members a mix may have)
interleaved with plain-adapter and base-model jobs in one stream, so they share forward passes; every
greedy result must equal PEFT's `add_weighted_adapter(..., combination_type="cat")`. Also: a mix whose
rank exceeds the pool is answered adapter_load_failed with the reason, a member the tenant may not use
forbidden, an unknown member adapter_not_found."""

import json

import msgspec

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterPublish
from lorabus.schemas.v1 import MAX_MIX_MEMBERS
from lorabus.worker.client import publish_control, run_jobs
from helpers import MIX_MAX_RANK, MIX_PROMPTS, MixOracle, running_worker, worker_config

COPIES = [f"qv-copy{i}" for i in range(1, MAX_MIX_MEMBERS)]  # qv-r4's content under other names


async def test_mixes_match_peft_cat_in_shared_batches(kafka, tiny_model, peft_adapters):
    paths = {**peft_adapters, **{name: peft_adapters["qv-r4"] for name in COPIES}, "mlp-copy": peft_adapters["mlp-r16-patterns"]}
    oracle = MixOracle(tiny_model, paths)
    mixes = [
        # Σr 24 at o_proj and gate/up (16 + 8); every projection targeted by some member.
        [("mlp-r16-patterns", 0.6), ("qv-r4@v1", -0.8), ("all-r8-rslora", 1.3)],
        [("all-r8-rslora", -0.5), ("qv-r4", 1.0)],  # rsLoRA listed first: the order of a mix changes nothing
        [("qv-r4", 0.75), *[(name, (-1) ** i * 0.25 * i) for i, name in enumerate(COPIES, 1)]],  # 8 members, Σr 32
    ]
    plain = [None, "qv-r4", "all-r8-rslora", "mlp-r16-patterns"]
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_lora_rank=MIX_MAX_RANK))
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic,
                              [AdapterPublish(name, "v1", str(path)) for name, path in paths.items()]
                              + [AdapterPublish("private", "v1", str(peft_adapters["qv-r4"]), tenants=["vip"])])
        jobs, expected = [], {}
        for i in range(21):
            prompt = MIX_PROMPTS[i % len(MIX_PROMPTS)]
            job = {"id": f"job-{i}", "tenant": f"t{i % 2}", "prompt": prompt, "max_new_tokens": 6 + i % 4}
            if i % 3 == 2:
                adapter = plain[i // 3 % len(plain)]
                if adapter is not None:
                    job["adapter"] = adapter
                expected[job["id"]] = (adapter, None, job["max_new_tokens"])
            else:
                mix = mixes[(i - i // 3) % len(mixes)]  # the i-th of the mix jobs
                job["mix"] = [{"adapter": name, "weight": weight} for name, weight in mix]
                expected[job["id"]] = (None, mix, job["max_new_tokens"])
            jobs.append((job["id"], json.dumps(job).encode()))
        refused = {
            # gate_proj: 16 + 16 + 8 = 40 > 32
            "too-big": [{"adapter": "mlp-r16-patterns", "weight": 1}, {"adapter": "mlp-copy", "weight": 1},
                        {"adapter": "all-r8-rslora", "weight": 0.5}],
            "forbidden": [{"adapter": "qv-r4", "weight": 1}, {"adapter": "private@v1", "weight": 0.5}],
            "unknown": [{"adapter": "qv-r4", "weight": 1}, {"adapter": "nope", "weight": 0.5}],
        }
        jobs += [(job_id, json.dumps({"id": job_id, "tenant": "t0", "prompt": "hi", "mix": mix}).encode())
                 for job_id, mix in refused.items()]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, jobs, timeout_s=180)
        registry = worker.metrics.registry
        steps = registry.get_sample_value("lorabus_step_adapters_count")
        single = registry.get_sample_value("lorabus_step_adapters_bucket", {"le": "1.0"})
        mixed_ok = sum(sample.value for metric in registry.collect() for sample in metric.samples
                       if sample.name == "lorabus_jobs_completed_total" and sample.labels.get("adapter") == "mix")
    assert steps > single, "no forward pass mixed two or more adapters"
    assert mixed_ok == sum(mix is not None for _, mix, _ in expected.values())

    (too_big,) = results["too-big"]
    assert too_big.status == "error" and too_big.error.code == "adapter_load_failed"
    assert f"mix rank 40 (layer 0 gate_proj) exceeds the pool's max rank {MIX_MAX_RANK}" in too_big.error.message
    assert [(m.adapter, m.version) for m in too_big.mix] == [("mlp-r16-patterns", "v1"), ("mlp-copy", "v1"),
                                                             ("all-r8-rslora", "v1")]
    (forbidden,) = results["forbidden"]
    assert forbidden.error.code == "forbidden" and "private@v1" in forbidden.error.message
    (unknown,) = results["unknown"]
    assert unknown.error.code == "adapter_not_found" and "nope" in unknown.error.message

    served_mixes = set()
    for job_id, (adapter, mix, max_new) in expected.items():
        (result,) = results[job_id]
        assert result.status == "ok", msgspec.json.encode(result)
        prompt_ids = oracle.prompt_ids(MIX_PROMPTS[int(job_id.split("-")[1]) % len(MIX_PROMPTS)])
        if mix is None:
            assert result.adapter == adapter and result.mix is None
            oracle.assert_matches(peft_adapters.get(adapter), prompt_ids, result.token_ids, max_new, label=job_id)
            continue
        assert result.adapter is None and result.adapter_version is None
        assert [(m.adapter, m.version, m.weight) for m in result.mix] == [
            (name.split("@")[0], "v1", weight) for name, weight in mix]
        members = tuple((name.split("@")[0], weight) for name, weight in mix)
        oracle.assert_matches(members, prompt_ids, result.token_ids, max_new, label=job_id)
        served_mixes.add(members)
    assert len(served_mixes) == len(mixes)


async def test_republished_member_changes_the_mix(kafka, tiny_model, peft_adapters):
    """A member re-published with new content (same name and version): the next job of the same mix runs
    the new content, not a mix cached from the old one."""
    oracle = MixOracle(tiny_model, dict(peft_adapters))
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_lora_rank=MIX_MAX_RANK))
    mix = [{"adapter": "swap@v1", "weight": 1.0}, {"adapter": "mlp", "weight": 0.5}]
    prompt_ids = oracle.prompt_ids(MIX_PROMPTS[0])

    async def run_mix(job_id: str):
        job = {"id": job_id, "tenant": "t", "prompt_ids": prompt_ids, "max_new_tokens": 8, "mix": mix}
        (result,) = (await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                    [(job_id, json.dumps(job).encode())], timeout_s=60))[job_id]
        assert result.status == "ok", msgspec.json.encode(result)
        return result.token_ids

    before = (("qv-r4", 1.0), ("mlp-r16-patterns", 0.5))
    after = (("all-r8-rslora", 1.0), ("mlp-r16-patterns", 0.5))
    assert oracle.greedy(before, prompt_ids, 8) != oracle.greedy(after, prompt_ids, 8)  # the swap is visible
    async with running_worker(config):
        await publish_control(kafka, config.control_topic,
                              [AdapterPublish("swap", "v1", str(peft_adapters["qv-r4"])),
                               AdapterPublish("mlp", "v1", str(peft_adapters["mlp-r16-patterns"]))])
        oracle.assert_matches(before, prompt_ids, await run_mix("first"), 8, label="first")
        await publish_control(kafka, config.control_topic, [AdapterPublish("swap", "v1", str(peft_adapters["all-r8-rslora"]))])
        oracle.assert_matches(after, prompt_ids, await run_mix("second"), 8, label="second")
