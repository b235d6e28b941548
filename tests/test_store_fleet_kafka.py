"""Issue 24's fleet check through the real broker and a real S3-compatible store (S3Proxy): two workers in one
group, each with a disk tier of its own (no shared filesystem), download every s3:// version once each and
answer the jobs of their partitions with PEFT's tokens; a version published with `lorabus rollout publish
--wait` is fetched by both at once while jobs for it wait, and none sees a partial file; a worker restarted
with a wrong secret key serves what its tier holds, fails the next version with the store's refusal (in its
jobs' answers and in its status) while its name's traffic stays on the version before, and logs no secret."""

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from lorabus.scheduler import EngineConfig
from lorabus.scheduler.adapters import file_sha256
from lorabus.schemas import AdapterActivate
from lorabus.worker import cli
from lorabus.worker.client import publish_control, read_statuses
from lorabus.worker.registry import Load
from helpers import OracleJobs, PeftOracle, end_offset, make_peft_adapter, running_worker, until, worker_config

pytestmark = pytest.mark.kafka

PROMPT = "the quick brown fox"
MAX_NEW = 5
JOB_TIMEOUT_S = 60
PARTITIONS = 4  # two each
WEIGHTS = "adapter_model.safetensors"
WRONG_SECRET = "wrong-secret-9f3c1a7e5d"  # the restarted worker's key: must never reach a log line
V1 = ("a@v1", "b@v1", "c@v1")
REFUSAL = "denied: ListObjectsV2 s3://adapters/a/v3/: SignatureDoesNotMatch (HTTP 403)"


def _fetches(worker, outcome: str) -> float:
    return worker.metrics.registry.get_sample_value("lorabus_adapter_store_fetches_total", {"outcome": outcome}) or 0


def _downloads(worker) -> float:
    return worker.metrics.registry.get_sample_value("lorabus_adapter_store_download_seconds_count") or 0


def _sharing(w1, w2) -> bool:
    """Both workers in the group, the jobs topic split between them."""
    return bool(w1.partitions) and bool(w2.partitions) and len(set(w1.partitions) | set(w2.partitions)) == PARTITIONS


async def test_two_workers_fetch_once_each_fetch_together_and_a_wrong_key_fails_only_the_new_version(
        kafka, tiny_model, peft_adapters, store, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # every library's lines too (botocore logs its requests at DEBUG)
    a2 = make_peft_adapter(tiny_model, tmp_path / "a-v2", seed=21, r=4, lora_alpha=8,
                           target_modules=["q_proj", "o_proj"])
    a3 = make_peft_adapter(tiny_model, tmp_path / "a-v3", seed=22, r=8, lora_alpha=8,
                           target_modules=["v_proj", "up_proj"])
    dirs = {"a@v1": peft_adapters["qv-r4"], "b@v1": peft_adapters["all-r8-rslora"],
            "c@v1": peft_adapters["mlp-r16-patterns"], "a@v2": a2, "a@v3": a3}
    # No load retry within the test: each version is fetched once per worker (the counts below).
    config = worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64), topic_partitions=PARTITIONS,
                           s3_endpoint_url=store.endpoint, s3_addressing_style="path", adapter_retry_ms=600_000)
    tiers = {"w-1": tmp_path / "tier-1", "w-2": tmp_path / "tier-2"}
    configs = {wid: replace(config, worker_id=wid, adapter_disk_cache_dir=str(tier)) for wid, tier in tiers.items()}
    jobs = OracleJobs(kafka, config, PeftOracle(tiny_model), dirs, PROMPT, MAX_NEW, JOB_TIMEOUT_S, check_versions=True)
    events = [store.publish(dirs[key], key[0], "v1") for key in V1]
    v3 = store.publish(a3, "a", "v3")

    async with running_worker(configs["w-1"]) as w1:
        async with running_worker(configs["w-2"]) as w2:
            await until(lambda: _sharing(w1, w2), JOB_TIMEOUT_S)
            await publish_control(kafka, config.control_topic, events)
            await until(lambda: all(w.control_offset >= 3 and not w.adapter_health.loading for w in (w1, w2)),
                        JOB_TIMEOUT_S)

            # 1. Each worker downloads each version once, into its own tier, and both answer.
            results = await jobs.run(list(V1) * 4)
            for ref, result in zip(V1 * 4, results):
                jobs.check_ok(result, ref)
            assert {r.worker for r in results} == {"w-1", "w-2"}
            for wid, worker in (("w-1", w1), ("w-2", w2)):
                assert (_fetches(worker, "ok"), _downloads(worker)) == (3, 3), wid
                assert len(list((tiers[wid] / "sha256").iterdir())) == 3, wid
                assert all(tiers[wid] in Path(worker.engine.spec(key).path).parents for key in V1), wid
            assert not {w1.engine.spec(key).path for key in V1} & {w2.engine.spec(key).path for key in V1}

            # 2. `rollout publish --wait`: both fetch a@v2 at once while jobs for it wait; each downloads it once.
            store.upload_dir(a2, "adapters", "a/v2")
            before = await end_offset(kafka, config.control_topic)
            publish = asyncio.create_task(asyncio.to_thread(cli.main, [
                "rollout", "publish", "a", "v2", "s3://adapters/a/v2/", "--sha256", file_sha256(a2 / WEIGHTS), "--wait",
                "--timeout", str(JOB_TIMEOUT_S), "--bootstrap-servers", kafka, "--control-topic", config.control_topic,
                "--status-topic", config.status_topic, "--s3-endpoint-url", store.endpoint,
                "--s3-addressing-style", "path"]))
            while await end_offset(kafka, config.control_topic) == before:
                await asyncio.sleep(0.02)
            results = await jobs.run(["a@v2"] * 8)
            assert await publish == 0
            for result in results:
                jobs.check_ok(result, "a@v2")
            assert {r.worker for r in results} == {"w-1", "w-2"}
            for worker in (w1, w2):
                assert (_fetches(worker, "ok"), _downloads(worker)) == (4, 4)
            await publish_control(kafka, config.control_topic, [AdapterActivate("a", "v2")])

        # 3. w-2 back with a wrong secret: its tier still serves what it holds; a@v3 is refused by the store.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)  # w-1's client keeps the key it was made with
        async with running_worker(configs["w-2"]) as w2:
            await until(lambda: _sharing(w1, w2) and w2.control_offset >= 5 and not w2.adapter_health.loading,
                        JOB_TIMEOUT_S)
            await publish_control(kafka, config.control_topic, [v3, AdapterActivate("a", "v3")])
            await until(lambda: w1.adapter_health.state("a@v3") is Load.READY and w2.adapter_health.failure("a@v3"),
                        JOB_TIMEOUT_S)
            results = await jobs.run(["a@v3", "a", "b@v1"] * 4)
            for ref, result in zip(["a@v3", "a", "b@v1"] * 4, results):
                if result.worker == "w-2" and ref == "a@v3":
                    assert (result.status, result.error.code) == ("error", "adapter_load_failed"), result
                    assert REFUSAL in result.error.message and WRONG_SECRET not in result.error.message, result
                else:  # the name's traffic on w-2 stays on a@v2 (safe activation); w-1 moved to a@v3
                    want = {"a@v3": "a@v3", "b@v1": "b@v1", "a": "a@v3" if result.worker == "w-1" else "a@v2"}[ref]
                    jobs.check_ok(result, want)
            assert {r.worker for r in results[::3]} == {"w-1", "w-2"}
            # What serves (a@v2, b@v1, c@v1) came from its own tier at start; only a@v3 asked the store.
            assert (_fetches(w2, "ok"), _fetches(w2, "cached"), _fetches(w2, "denied")) == (0, 3, 1)

            async def w2_status():
                while True:
                    status = (await read_statuses(kafka, config.status_topic)).get("w-2")
                    failed = {v.adapter: v.reason for v in status.versions if v.state == "failed"} if status else {}
                    if "a@v3" in failed:
                        return status, failed["a@v3"]
                    await asyncio.sleep(0.2)

            status, reason = await asyncio.wait_for(w2_status(), JOB_TIMEOUT_S)
            assert REFUSAL in reason and (status.serving["a"], status.activated["a"]) == ("v2", "v3")
        assert (_fetches(w1, "ok"), w1.adapter_health.state("a@v3")) == (5, Load.READY)

    assert "SignatureDoesNotMatch" in caplog.text  # the capture saw w-2's refusal ...
    assert WRONG_SECRET not in caplog.text and store.secret_key not in caplog.text  # ... and no secret
