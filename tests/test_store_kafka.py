"""Adapters published as `s3://bucket/prefix/`, served by a real worker through the real broker from a real
S3-compatible store (S3Proxy): their tokens equal PEFT's; a missing prefix and a corrupted object fail only
their versions, with the store's reason in the jobs' answers and in status, while safe activation keeps a
name's traffic on the version it had; the store away for a while stops no resident adapter and makes a
job for a version not fetched yet wait, then be served; and a disk tier with room for one version evicts
what no traffic uses and fetches it again when a job asks for it; a version whose files come after its
publish is fetched by the load retry."""

import asyncio
import time
from pathlib import Path

import pytest

from lorabus.scheduler import EngineConfig
from lorabus.scheduler.adapters import file_sha256
from lorabus.schemas import AdapterActivate, AdapterPublish, decode_status
from lorabus.worker.adapter_paths import ADAPTER_FILES
from lorabus.worker.client import publish_control
from lorabus.worker.registry import Load
from helpers import OracleJobs, PeftOracle, read_topic, running_worker, until, worker_config

pytestmark = pytest.mark.kafka

PROMPT = "the quick brown fox"
MAX_NEW = 5
JOB_TIMEOUT_S = 60
OUTAGE_S = 20  # the store away this long while jobs flow (issue 24)
WEIGHTS = "adapter_model.safetensors"


def _config(kafka, tiny_model, s3, tmp_path, **overrides):
    return worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64), s3_endpoint_url=s3.endpoint,
                         s3_addressing_style="path", adapter_disk_cache_dir=str(tmp_path / "tier"), **overrides)


def _settled(worker, events: int) -> bool:
    """The worker has applied `events` control records and loads (or fetches) none of their versions."""
    return worker.control_offset >= events and not worker.adapter_health.loading


def _fetches(worker, outcome: str) -> float:
    return worker.metrics.registry.get_sample_value("lorabus_adapter_store_fetches_total", {"outcome": outcome})


def _downloads(worker) -> float:
    return worker.metrics.registry.get_sample_value("lorabus_adapter_store_download_seconds_count")


async def test_store_adapters_serve_fail_with_the_stores_reason_and_outlast_an_outage(
        kafka, tiny_model, peft_adapters, store, tmp_path):
    a, b, c = peft_adapters["qv-r4"], peft_adapters["all-r8-rslora"], peft_adapters["mlp-r16-patterns"]
    # bad@v1: its weights object overwritten after upload, published with the sha256 of what was uploaded.
    bad = store.publish(c, "bad")
    weights = bytearray((c / WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF
    store.client().put_object(Bucket="adapters", Key="bad/v1/" + WEIGHTS, Body=bytes(weights))
    events = [store.publish(a, "a"), store.publish(b, "b"), bad,
              # Nothing under gone/v1/, nor under a/v2/ (activated: it never serves).
              AdapterPublish("gone", "v1", "s3://adapters/gone/v1/", file_sha256(a / WEIGHTS)),
              AdapterPublish("a", "v2", "s3://adapters/a/v2/", file_sha256(b / WEIGHTS)),
              AdapterActivate("a", "v2")]
    # No load retry within the test: each version is fetched once (the counts below). Adapter roots confine
    # local paths only: the s3:// publishes are not refused by them.
    config = _config(kafka, tiny_model, store, tmp_path, adapter_retry_ms=600_000,
                     adapter_root=[str(tmp_path / "local-adapters")])
    dirs = {"a@v1": a, "b@v1": b, "c@v1": c}
    async with running_worker(config) as worker:
        jobs = OracleJobs(kafka, config, PeftOracle(tiny_model), dirs, PROMPT, MAX_NEW, JOB_TIMEOUT_S,
                          check_versions=True)
        await publish_control(kafka, config.control_topic, events)
        await until(lambda: _settled(worker, len(events)), JOB_TIMEOUT_S)

        results = await jobs.run(["a@v1", "b@v1", "a", "b", None, "bad@v1", "gone@v1", "a@v2"])
        for result, key in zip(results, ["a@v1", "b@v1", "a@v1", "b@v1", None]):
            jobs.check_ok(result, key)
        OracleJobs.check_failed(results[5], "does not match the published " + bad.sha256)
        OracleJobs.check_failed(results[6], "not_found: s3://adapters/gone/v1/: no adapter_config.json")
        OracleJobs.check_failed(results[7], "not_found: s3://adapters/a/v2/")
        assert (_fetches(worker, "ok"), _fetches(worker, "corrupt"), _fetches(worker, "not_found")) == (2, 1, 2)
        assert _downloads(worker) == 2
        loads = worker.metrics.registry.get_sample_value("lorabus_adapter_load_seconds_count", {"source": "disk"})
        assert loads >= 2, loads  # a@v1 and b@v1 read from the disk tier's copies into the engine

        def shows_failures(records):
            if not records or records[-1].value is None:
                return False
            status = decode_status(records[-1].value)
            reasons = {v.adapter: v.reason or "" for v in status.versions if v.state == "failed"}
            sources = {v.adapter: v.source for v in status.versions if v.state == "ready"}
            # a@v1 and b@v1: their loads read the downloaded copies
            return (status.serving.get("a"), status.activated.get("a")) == ("v1", "v2") \
                and "does not match the published" in reasons.get("bad@v1", "") \
                and "not_found" in reasons.get("gone@v1", "") and sources.get("a@v1") == sources.get("b@v1") == "store"

        assert shows_failures(await read_topic(kafka, config.status_topic, JOB_TIMEOUT_S, shows_failures))

        # The store away: resident adapters keep serving, a job for a version not fetched yet waits for it.
        publish_c = store.publish(c, "c")
        store.stop()
        away = time.monotonic()
        await publish_control(kafka, config.control_topic, [publish_c])
        waiting = asyncio.create_task(jobs.run(["c@v1"]))
        while time.monotonic() - away < OUTAGE_S:
            for result, key in zip(await jobs.run(["a@v1", "b", None]), ["a@v1", "b@v1", None]):
                jobs.check_ok(result, key)
            assert not waiting.done(), waiting
            assert worker.adapter_health.state("c@v1") is Load.LOADING
        assert _fetches(worker, "unavailable") >= 2  # tried again while it was away
        store.start()
        (result,) = await waiting
        jobs.check_ok(result, "c@v1")
        assert _fetches(worker, "ok") == 3


async def test_a_disk_tier_for_one_version_evicts_what_no_traffic_uses_and_fetches_it_again(
        kafka, tiny_model, peft_adapters, store, tmp_path):
    base, one, two = peft_adapters["mlp-r16-patterns"], peft_adapters["qv-r4"], peft_adapters["all-r8-rslora"]
    sizes = [sum((d / name).stat().st_size for name in ADAPTER_FILES) for d in (one, two)]
    # Room for either store version, never both. Name-only jobs go to e@base (local, activated): neither
    # store version takes traffic, so neither is pinned.
    config = _config(kafka, tiny_model, store, tmp_path, adapter_disk_cache_bytes=max(sizes) + min(sizes) // 2,
                     adapter_retry_ms=300, adapter_retry_max_ms=1000)
    jobs = OracleJobs(kafka, config, PeftOracle(tiny_model), {"e@base": base, "e@v1": one, "e@v2": two, "e@late": two},
                      PROMPT, MAX_NEW, JOB_TIMEOUT_S, check_versions=True)
    async with running_worker(config) as worker:
        engine = worker.engine

        def on_disk(key):
            return Path(engine.spec(key).path).is_dir()

        await publish_control(kafka, config.control_topic, [AdapterPublish("e", "base", str(base)),
                                                            AdapterActivate("e", "base")])
        await until(lambda: _settled(worker, 2), JOB_TIMEOUT_S)
        # Each store version published, then asked for; the next published once it has loaded (a version still
        # loading is pinned: the tier could not make room).
        for offset, (version, weights) in enumerate([("v1", one), ("v2", two)], start=3):
            await publish_control(kafka, config.control_topic, [store.publish(weights, "e", version)])
            await jobs.served(f"e@{version}")
            await until(lambda: _settled(worker, offset), JOB_TIMEOUT_S)
        assert on_disk("e@v2") and not on_disk("e@v1"), "e@v1 not evicted for e@v2"

        await jobs.served("e", "e@base")
        await jobs.served("e@v1")  # fetched again, evicting e@v2
        assert on_disk("e@v1") and not on_disk("e@v2")
        assert _fetches(worker, "ok") == _downloads(worker) == 3

        # Published before its files are in the store: it fails; once they are, the load retry fetches it.
        await publish_control(kafka, config.control_topic, [AdapterPublish("e", "late", "s3://adapters/e/late/",
                                                                           file_sha256(two / WEIGHTS))])
        await until(lambda: "not_found" in (worker.adapter_health.failure("e@late") or ""), JOB_TIMEOUT_S)
        store.upload_dir(two, "adapters", "e/late")
        await until(lambda: worker.adapter_health.state("e@late") is Load.READY, JOB_TIMEOUT_S)
        await jobs.served("e@late")
        assert _fetches(worker, "ok") == 4
