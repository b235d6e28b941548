"""Published adapter files changed under a running worker, through the real broker: each weights file is
truncated, overwritten in place or deleted while its version sits in each tier (device slot, host cache,
disk only), with jobs flowing. Only that version's jobs are affected (adapter_load_failed with the reason,
once it must be read from disk again; what the worker holds was verified and keeps serving), the worker
never dies, and the file restored to its published bytes serves again without a restart. And the switch
(activate) to a version whose file broke since it loaded falls back to the previous version: no
name-only job fails."""

import asyncio
import json
import time

import pytest

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterActivate, AdapterPublish, decode_status
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.registry import Load
from lorabus.worker.topics import ensure_topics
from file_changes import CHANGES, REASONS, change, copy_adapter, restore
from helpers import (MixOracle, OracleJobs, PeftOracle, read_topic, running_worker, start_worker_process, unique, until,
                     worker_config)

pytestmark = pytest.mark.kafka

PROMPT = "the quick brown fox"
MAX_NEW = 5
TIERS = ("device", "host", "disk")
# One device slot and two host entries: a job for a version puts it in the slot (and the host cache);
# each job for another adapter pushes it one tier down.
TIER_SETTINGS = dict(max_loras=1, max_cpu_loras=2)
RETRY = dict(adapter_retry_ms=300, adapter_retry_max_ms=1000)  # a restored file is tried again soon
JOB_TIMEOUT_S = 60
RECOVERY_TIMEOUT_S = 30


async def _change_in_each_tier(jobs: OracleJobs, how: str, targets: dict, held=None) -> None:
    """For each tier: put its own version of `t` there, change its file `how` with jobs flowing, push it out
    to disk, restore the file. `held(key)` (in-process workers) says (in a device slot, in the host cache).
    Call it once every version's publish-time warm-up is done, so none lands in a tier behind its back."""
    for tier in TIERS:
        key = f"t@{tier}"
        await jobs.served(key, "t")
        for other in ["o1@v1", "o2@v1"][:TIERS.index(tier)]:
            await jobs.served(other)
        if held is not None:
            assert held(key) == {"device": (True, True), "host": (False, True), "disk": (False, False)}[tier]

        original = change(targets[tier], how)
        refs = [key, "o1@v1", None, key, "o1@v1", key]
        for ref, result in zip(refs, await jobs.run(refs)):
            if ref != key:  # the other versions and the base model never notice
                jobs.check_ok(result, ref)
            elif tier == "disk":  # read from disk now: refused, with the reason
                assert (result.status, result.error.code) == ("error", "adapter_load_failed"), result
                assert REASONS[how] in result.error.message, result.error.message
            else:  # held in memory and verified when it was read: still the published weights
                jobs.check_ok(result, "t")

        # Pushed out of both tiers, it is read from disk again and verified again.
        await jobs.served("o2@v1")
        await jobs.served("o1@v1")
        if held is not None:
            assert held(key) == (False, False)
        await jobs.failed(key, REASONS[how])

        # Restored to its published bytes: it serves again, no restart (the worker tries it again).
        restore(targets[tier], original)
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            (result,) = await jobs.run([key])
            if result.status == "ok":
                jobs.check_ok(result, "t")
                break
            assert result.error.code == "adapter_load_failed", result
            assert time.monotonic() < deadline, f"{key} still fails {RECOVERY_TIMEOUT_S} s after its file was restored"
            await asyncio.sleep(0.2)


def _settled(worker, events: int) -> bool:
    """The worker has applied `events` control records and loads none of their versions (warm-ups done)."""
    return worker.control_offset >= events and Load.LOADING not in worker.adapter_health.states.values()


def _publish_events(peft_adapters, tmp_path):
    targets, events = {}, []
    for tier in TIERS:
        targets[tier], sha = copy_adapter(peft_adapters["qv-r4"], tmp_path / f"t-{tier}")
        events.append(AdapterPublish("t", tier, str(targets[tier]), sha))
    events += [AdapterPublish("o1", "v1", str(peft_adapters["all-r8-rslora"])),
               AdapterPublish("o2", "v1", str(peft_adapters["mlp-r16-patterns"]))]
    dirs = {"t": peft_adapters["qv-r4"], "o1@v1": peft_adapters["all-r8-rslora"],
            "o2@v1": peft_adapters["mlp-r16-patterns"]}
    return targets, events, dirs


@pytest.mark.parametrize("how", [c for c in CHANGES if c != "truncate"])
async def test_a_changed_file_affects_only_its_version_in_each_tier(kafka, tiny_model, peft_adapters, tmp_path, how):
    targets, events, dirs = _publish_events(peft_adapters, tmp_path)
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, **TIER_SETTINGS), **RETRY)
    async with running_worker(config) as worker:
        engine = worker.engine

        def held(key):
            return key in engine.resident(), engine.adapters.spec(key) in engine.adapters.host_cache

        await publish_control(kafka, config.control_topic, events)
        await until(lambda: _settled(worker, len(events)), JOB_TIMEOUT_S)
        jobs = OracleJobs(kafka, config, PeftOracle(tiny_model), dirs, PROMPT, MAX_NEW, JOB_TIMEOUT_S)
        await _change_in_each_tier(jobs, how, targets, held)


async def test_a_truncated_file_never_kills_the_worker(kafka, tiny_model, peft_adapters, tmp_path):
    """The worker in a process of its own: were its tensors still mapped from the file, touching them
    after the truncation would kill it with SIGBUS (and an in-process worker would take pytest with it)."""
    targets, events, dirs = _publish_events(peft_adapters, tmp_path)
    tag = unique("files")
    topics = {t: f"{t}-{tag}" for t in ("jobs", "results", "control", "dlq", "status")}
    await ensure_topics(kafka, {topics["jobs"]: 3, topics["results"]: 3, topics["control"]: 1, topics["dlq"]: 1})
    config = worker_config(kafka, tiny_model, jobs_topic=topics["jobs"], results_topic=topics["results"])
    worker = start_worker_process(kafka, tiny_model, topics, f"g-{tag}", tmp_path / "worker.log",
                                  status_topic=topics["status"], **TIER_SETTINGS, **RETRY)

    def alive():
        assert worker.poll() is None, (f"the worker died (exit {worker.returncode}; -7 is SIGBUS):\n"
                                       + (tmp_path / "worker.log").read_text()[-3000:])

    try:
        jobs = OracleJobs(kafka, config, PeftOracle(tiny_model), dirs, PROMPT, MAX_NEW, JOB_TIMEOUT_S, alive=alive)
        await jobs.served(None)  # the worker is up
        await publish_control(kafka, topics["control"], events)

        def settled(records):
            if not records or records[-1].value is None:
                return False
            status = decode_status(records[-1].value)
            return status.control_offset >= len(events) and all(v.state != "loading" for v in status.versions)

        assert settled(await read_topic(kafka, topics["status"], JOB_TIMEOUT_S, settled)), "warm-ups not done"
        await _change_in_each_tier(jobs, "truncate", targets)
        alive()
    finally:
        worker.terminate()
        worker.wait(60)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


async def test_the_switch_to_a_version_whose_file_broke_falls_back(kafka, tiny_model, peft_adapters, tmp_path):
    """v2 loaded when published, was evicted, then its file was overwritten. Activating it moves no
    name-only job onto it, alone or as a mix member: its load fails, and every job is served by v1. Restored, v2 takes the traffic
    without a restart. Jobs naming fin@v2 meanwhile are the only ones answered adapter_load_failed."""
    v1, (v2, sha2) = peft_adapters["qv-r4"], copy_adapter(peft_adapters["all-r8-rslora"], tmp_path / "v2")
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64, max_loras=1, max_cpu_loras=1),
                           **RETRY)
    dirs = {"fin@v1": v1, "fin@v2": peft_adapters["all-r8-rslora"], "other@v1": peft_adapters["mlp-r16-patterns"]}
    async with running_worker(config) as worker:
        jobs = OracleJobs(kafka, config, PeftOracle(tiny_model), dirs, PROMPT, MAX_NEW, JOB_TIMEOUT_S)
        await publish_control(kafka, config.control_topic, [AdapterPublish("fin", "v1", str(v1)),
                                                            AdapterPublish("fin", "v2", str(v2), sha2),
                                                            AdapterPublish("other", "v1", str(dirs["other@v1"]))])
        await until(lambda: _settled(worker, 3), JOB_TIMEOUT_S)
        await jobs.served("fin@v2")
        await jobs.served("fin", "fin@v1")  # v1 in the only slot and the only host entry: v2 on disk only
        assert worker.adapter_health.state("fin@v2") is Load.READY
        spec2 = worker.engine.adapters.spec("fin@v2")
        assert "fin@v2" not in worker.engine.resident() and spec2 not in worker.engine.adapters.host_cache

        original = change(v2, "overwrite")
        (offset,) = await publish_control(kafka, config.control_topic, [AdapterActivate("fin", "v2")])
        await until(lambda: worker.control_offset > offset, JOB_TIMEOUT_S)
        # First a mix naming "fin": it is built on fin@v2, whose read fails; that is fin@v2's failure, and the
        # mix is served with fin@v1 instead.
        mix_job = {"id": "mix-1", "tenant": "acme", "prompt_ids": jobs.ids, "max_new_tokens": MAX_NEW,
                   "mix": [{"adapter": "fin", "weight": 0.5}]}
        answered = await run_jobs(kafka, config.jobs_topic, config.results_topic,
                                  [("mix-1", json.dumps(mix_job).encode())], JOB_TIMEOUT_S)
        mixed = answered["mix-1"][0]
        assert mixed.status == "ok", mixed
        MixOracle(tiny_model, {"fin": v1}).assert_matches((("fin", 0.5),), jobs.ids, mixed.token_ids, MAX_NEW, "mix")
        assert "sha256" in (worker.adapter_health.failure("fin@v2") or "")
        results = await jobs.run(["fin", "other@v1", "fin", None, "fin", "fin"])
        for result in results:
            if result.adapter == "fin":
                assert result.adapter_version == "v1", result
            jobs.check_ok(result, f"{result.adapter}@{result.adapter_version}" if result.adapter else None)
        # failed, shown in status
        await until(lambda: "sha256" in (worker.adapter_health.failure("fin@v2") or ""), JOB_TIMEOUT_S)
        await jobs.failed("fin@v2", "sha256")

        restore(v2, original)
        deadline = time.monotonic() + RECOVERY_TIMEOUT_S
        while True:
            (result,) = await jobs.run(["fin"])
            jobs.check_ok(result, f"fin@{result.adapter_version}")
            if result.adapter_version == "v2":
                break
            assert time.monotonic() < deadline, f"fin@v2 not serving {RECOVERY_TIMEOUT_S} s after its file was restored"
            await asyncio.sleep(0.2)
