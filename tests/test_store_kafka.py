"""Adapters published as `s3://bucket/prefix/`, served by a real worker through the real broker from a real
S3-compatible store (S3Proxy): their tokens equal PEFT's; a missing prefix and a corrupted object fail only
their versions, with the store's reason in the jobs' answers and in status, while safe activation keeps a
name's traffic on the version it had; the store away for a while stops no resident adapter and makes a
job for a version not fetched yet wait, then be served; and a disk tier with room for one version evicts
what no traffic uses and fetches it again when a job asks for it; a version whose files come after its
publish is fetched by the load retry."""

import asyncio
import hashlib
import json
import time
from pathlib import Path

import pytest

from lorabus.scheduler import EngineConfig
from lorabus.schemas import AdapterActivate, AdapterPublish, decode_status
from lorabus.worker.adapter_paths import ADAPTER_FILES
from lorabus.worker.client import publish_control, run_jobs
from lorabus.worker.registry import Load
from helpers import PeftOracle, read_topic, running_worker, worker_config

pytestmark = pytest.mark.kafka

PROMPT = "the quick brown fox"
MAX_NEW = 5
JOB_TIMEOUT_S = 60
OUTAGE_S = 20  # the store away this long while jobs flow (issue 24)
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def store(s3, monkeypatch):
    """The test's S3Proxy, its keys handed to the in-process worker the way operators do: boto3's chain."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    monkeypatch.setenv("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
    return s3


def _sha256(adapter_dir) -> str:
    return hashlib.sha256((adapter_dir / WEIGHTS).read_bytes()).hexdigest()


def _upload(s3, adapter_dir, name: str, version: str = "v1") -> AdapterPublish:
    """The adapter's files under adapters/<name>/<version>/, published there with its sha256."""
    s3.upload_dir(adapter_dir, "adapters", f"{name}/{version}")
    return AdapterPublish(name, version, f"s3://adapters/{name}/{version}/", _sha256(adapter_dir))


def _config(kafka, tiny_model, s3, tmp_path, **overrides):
    return worker_config(kafka, tiny_model, engine=EngineConfig(kv_cache_mb=64), s3_endpoint_url=s3.endpoint,
                         s3_addressing_style="path", adapter_disk_cache_dir=str(tmp_path / "tier"), **overrides)


class Jobs:
    """Jobs through the broker, each checked against PEFT (ok) or for its error."""

    def __init__(self, kafka, config, oracle, dirs):
        self.kafka, self.config, self.oracle, self.dirs = kafka, config, oracle, dirs
        self.ids = oracle.prompt_ids(PROMPT)
        self.count = 0

    async def run(self, refs: list[str | None]) -> list:
        """One job per ref ("name@version", "name", or None for the base model), sent together."""
        jobs = []
        for ref in refs:
            self.count += 1
            job = {"id": f"j{self.count}", "tenant": "acme", "prompt_ids": self.ids, "max_new_tokens": MAX_NEW}
            if ref is not None:
                job["adapter"] = ref
            jobs.append((job["id"], json.dumps(job).encode()))
        results = await run_jobs(self.kafka, self.config.jobs_topic, self.config.results_topic, jobs, JOB_TIMEOUT_S)
        assert len(results) == len(jobs), f"unanswered: {sorted({i for i, _ in jobs} - results.keys())}"
        return [results[job_id][0] for job_id, _ in jobs]

    def check_ok(self, result, key: str | None) -> None:
        """`result` is ok and PEFT's tokens for version `key` ("name@version"; None: the base model)."""
        assert result.status == "ok", result
        assert (f"{result.adapter}@{result.adapter_version}" if result.adapter else None) == key, result
        self.oracle.assert_matches(self.dirs.get(key), self.ids, result.token_ids, MAX_NEW, result.id)

    async def served(self, ref: str | None, key: str | None = None) -> None:
        (result,) = await self.run([ref])
        self.check_ok(result, key or ref)


def check_failed(result, reason: str) -> None:
    assert (result.status, result.error.code) == ("error", "adapter_load_failed"), result
    assert reason in result.error.message, result.error.message


async def _until(condition, timeout_s: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


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
    bad = _upload(store, c, "bad")
    weights = bytearray((c / WEIGHTS).read_bytes())
    weights[-1] ^= 0xFF
    store.client().put_object(Bucket="adapters", Key="bad/v1/" + WEIGHTS, Body=bytes(weights))
    events = [_upload(store, a, "a"), _upload(store, b, "b"), bad,
              AdapterPublish("gone", "v1", "s3://adapters/gone/v1/", _sha256(a)),  # nothing under that prefix
              AdapterPublish("a", "v2", "s3://adapters/a/v2/", _sha256(b)),  # nor here: activated, never serves
              AdapterActivate("a", "v2")]
    # No load retry within the test: each version is fetched once (the counts below). Adapter roots confine
    # local paths only: the s3:// publishes are not refused by them.
    config = _config(kafka, tiny_model, store, tmp_path, adapter_retry_ms=600_000,
                     adapter_root=[str(tmp_path / "local-adapters")])
    dirs = {"a@v1": a, "b@v1": b, "c@v1": c}
    async with running_worker(config) as worker:
        jobs = Jobs(kafka, config, PeftOracle(tiny_model), dirs)
        await publish_control(kafka, config.control_topic, events)
        await _until(lambda: _settled(worker, len(events)))

        results = await jobs.run(["a@v1", "b@v1", "a", "b", None, "bad@v1", "gone@v1", "a@v2"])
        for result, key in zip(results, ["a@v1", "b@v1", "a@v1", "b@v1", None]):
            jobs.check_ok(result, key)
        check_failed(results[5], "does not match the published " + bad.sha256)
        check_failed(results[6], "not_found: s3://adapters/gone/v1/: no adapter_config.json")
        check_failed(results[7], "not_found: s3://adapters/a/v2/")
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
            return (status.serving.get("a"), status.activated.get("a")) == ("v1", "v2") and \
                "does not match the published" in reasons.get("bad@v1", "") and "not_found" in reasons.get("gone@v1", "") \
                and sources.get("a@v1") == sources.get("b@v1") == "store"  # their loads read the downloaded copies

        assert shows_failures(await read_topic(kafka, config.status_topic, JOB_TIMEOUT_S, shows_failures))

        # The store away: resident adapters keep serving, a job for a version not fetched yet waits for it.
        publish_c = _upload(store, c, "c")
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
    jobs = Jobs(kafka, config, PeftOracle(tiny_model), {"e@base": base, "e@v1": one, "e@v2": two, "e@late": two})
    async with running_worker(config) as worker:
        engine = worker.engine

        def on_disk(key):
            return Path(engine.spec(key).path).is_dir()

        await publish_control(kafka, config.control_topic, [AdapterPublish("e", "base", str(base)),
                                                            AdapterActivate("e", "base")])
        await _until(lambda: _settled(worker, 2))
        # Each store version published, then asked for; the next published once it has loaded (a version still
        # loading is pinned: the tier could not make room).
        for offset, (version, weights) in enumerate([("v1", one), ("v2", two)], start=3):
            await publish_control(kafka, config.control_topic, [_upload(store, weights, "e", version)])
            await jobs.served(f"e@{version}")
            await _until(lambda: _settled(worker, offset))
        assert on_disk("e@v2") and not on_disk("e@v1"), "e@v1 not evicted for e@v2"

        await jobs.served("e", "e@base")
        await jobs.served("e@v1")  # fetched again, evicting e@v2
        assert on_disk("e@v1") and not on_disk("e@v2")
        assert _fetches(worker, "ok") == _downloads(worker) == 3

        # Published before its files are in the store: it fails; once they are, the load retry fetches it.
        await publish_control(kafka, config.control_topic, [AdapterPublish("e", "late", "s3://adapters/e/late/",
                                                                           _sha256(two))])
        await _until(lambda: "not_found" in (worker.adapter_health.failure("e@late") or ""))
        store.upload_dir(two, "adapters", "e/late")
        await _until(lambda: worker.adapter_health.state("e@late") is Load.READY)
        await jobs.served("e@late")
        assert _fetches(worker, "ok") == 4
