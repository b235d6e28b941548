"""The worker's store fetches (worker/store_fetches.py) against a real S3-compatible store: a publish of many
versions at once holds at most s3_max_downloads - 1 download slots, so the fetch a job waits for gets a slot at
once, and a job's version still queued behind them is fetched ahead of them; every fetch is reported once."""

import asyncio
import time

from lorabus.worker.config import WorkerConfig
from lorabus.worker.control_log import ControlLog
from lorabus.worker.metrics import Metrics
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load, ResolvedAdapter
from lorabus.worker.store_fetches import StoreFetches

VERSIONS = 12
DOWNLOAD_S = 0.3


class Registrations:
    """The engine's side of a fetch: what was registered, in order (the engine itself is not needed here)."""

    def __init__(self):
        self.keys: list[str] = []

    def register(self, spec) -> None:
        self.keys.append(spec.key)


async def test_a_job_waiting_for_a_version_goes_ahead_of_a_large_publish(store, monkeypatch, peft_adapters, tmp_path):
    adapter = next(iter(peft_adapters.values()))
    control, health = ControlLog(), AdapterHealth()
    for i in range(VERSIONS):  # distinct prefixes (the tier keys a copy by uri and sha256)
        control.apply(i, store.publish(adapter, "a", f"v{i}"))
    config = WorkerConfig(s3_endpoint_url=store.endpoint, s3_addressing_style="path", s3_max_downloads=2,
                          adapter_disk_cache_dir=str(tmp_path / "tier"))
    engine, reports = Registrations(), []
    fetches = StoreFetches(config, engine, control, AdapterRegistry(control, health), health, Metrics(),
                           lambda key, error: reports.append((key, error)))
    fetch_on_thread = fetches._fetch_on_thread

    def slow_fetch(*args):  # every download takes 0.3 s more, so the publish's fetches queue behind each other
        time.sleep(DOWNLOAD_S)
        return fetch_on_thread(*args)

    monkeypatch.setattr(fetches, "_fetch_on_thread", slow_fetch)
    for i in range(VERSIONS - 1):  # the publish: nobody waits for these
        health.set(f"a@v{i}", Load.LOADING)
        assert fetches.fetch(f"a@v{i}")
    await asyncio.sleep(0.05)
    last = f"a@v{VERSIONS - 2}"  # queued at the back of the publish
    versions = {key: ResolvedAdapter("a", key.partition("@")[2], key) for key in (last, f"a@v{VERSIONS - 1}")}
    started = asyncio.get_running_loop().time()
    # A job for a version nobody fetches yet, and one for the publish's last (still queued) version.
    assert await fetches.ready(versions[f"a@v{VERSIONS - 1}"])
    assert await fetches.ready(versions[last])
    waited = asyncio.get_running_loop().time() - started
    # Behind the publish (one slot for it, DOWNLOAD_S a download) they would wait ~11 x 0.3 s; ahead, two downloads.
    assert waited < 1.5, waited
    # Registered ahead of the publish's versions still queued when the jobs came (v0 and v1 held slots then).
    assert {f"a@v{VERSIONS - 1}", last} <= set(engine.keys[:4]), engine.keys
    while len(reports) < VERSIONS:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert sorted(key for key, _ in reports) == sorted(f"a@v{i}" for i in range(VERSIONS)), reports
    assert all(error is None for _, error in reports), reports
    await fetches.stop()
