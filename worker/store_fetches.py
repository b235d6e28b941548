"""Adapter versions published as `s3://bucket/prefix/`: fetched into the disk tier (worker/adapter_store.py),
then registered with the engine as the local directory they now are, and loaded like any other.

- The tier is opened on the first fetch: a worker that serves only local adapters touches neither the
  tier's directory nor the store.
- A fetch starts when AdapterLoads loads a version (at publish, or as what serves at start-up), or when a
  job needs a version whose copy is not on disk here (`ready`, awaited before the job goes to the engine,
  as a cold load is). One fetch per version at a time, whoever asks; each runs on a thread
  (`asyncio.to_thread`), at most `s3_max_downloads` at once, so jobs of resident adapters never wait on one.
  Fetches nobody waits for (publishes, what serves at start-up) take at most `s3_max_downloads - 1` of those
  slots: a publish of a thousand versions leaves a slot to the fetch a job waits for, and a job's version
  still queued behind them is fetched at once (its queued fetch gives way).
- `unavailable` (the store away, throttled) is tried again after `StoreSettings.retry_delay` for as long as
  the version stays published as it was: the version stays loading and its jobs wait. Any other failure
  ends the fetch: the version fails here with the store's reason (its jobs get adapter_load_failed, status
  shows it, and name-only traffic stays where it was), and the load retry (worker/load_retry.py) fetches it
  again later.
- Pins: the versions that take traffic here (`AdapterRegistry.serves`: a name's serving version, a route's
  targets) and those loading stay pinned in the tier; the rest are unpinned, so eviction takes only
  versions no traffic uses. Pins are brought up to date before each fetch, the only time this worker's tier
  evicts. A job for an unpinned version whose copy was evicted fetches it again first (`ready`); a copy
  evicted after that check (by another process sharing the tier) fails the engine's load, and the load
  retry fetches it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lorabus.scheduler import AdapterSpec, Engine
from lorabus.worker.adapter_paths import is_store_path
from lorabus.worker.adapter_store import DiskTier, StoreError, StoreSettings
from lorabus.worker.config import WorkerConfig
from lorabus.worker.control_log import ControlLog
from lorabus.worker.metrics import Metrics
from lorabus.worker.model_store import cache_root
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load, ResolvedAdapter

log = logging.getLogger(__name__)

Source = tuple[str, str | None]  # a publish's (uri, sha256): what a copy in the tier is a copy of


def store_settings(config: WorkerConfig) -> StoreSettings:
    """The store settings of the worker's --s3-* flags (an empty value: boto3's own resolution)."""
    return StoreSettings(endpoint_url=config.s3_endpoint_url or None, region=config.s3_region or None,
                         addressing_style=config.s3_addressing_style, ca_bundle=config.s3_ca_bundle or None,
                         max_concurrent_downloads=config.s3_max_downloads)


def tier_dir(config: WorkerConfig) -> Path:
    """--adapter-disk-cache-dir, else `${LORABUS_CACHE:-~/.cache/lorabus}/adapter-store`."""
    if config.adapter_disk_cache_dir:
        return Path(config.adapter_disk_cache_dir).expanduser()
    return cache_root() / "adapter-store"


@dataclass
class _Copy:
    """A version's directory in the tier, registered with the engine."""

    source: Source
    path: Path
    pinned: bool


class StoreFetches:
    def __init__(self, config: WorkerConfig, engine: Engine, control_log: ControlLog, registry: AdapterRegistry,
                 health: AdapterHealth, metrics: Metrics, on_done: Callable[[str, str | None], None]):
        self.config, self.engine, self.control_log, self.registry = config, engine, control_log, registry
        self.health, self.metrics = health, metrics
        self.on_done = on_done  # (key, None or why it cannot be fetched), once per fetch of a current publish
        self.settings = store_settings(config)
        self._tier: DiskTier | None = None
        self._tier_lock = threading.Lock()
        self._copies: dict[str, _Copy] = {}
        self._fetching: dict[str, tuple[Source, asyncio.Task, bool]] = {}  # key → (source, task, a job waits)
        self._downloading: set[str] = set()  # keys whose download holds a slot
        self._downloaded: set[str] = set()  # keys whose copy came from the store and has not been loaded since
        self._slots = asyncio.Semaphore(config.s3_max_downloads)
        self._background = asyncio.Semaphore(max(1, config.s3_max_downloads - 1))
        self._gets = threading.local()  # GetObject calls of the fetch on this thread: 0 = found in the tier

    def fetch(self, key: str) -> bool:
        """Fetch version `key` unless it is no store version or its copy is on disk here; True when a fetch
        (this one, or one already running) will report to `on_done`."""
        source = self._source(key)
        if source is None or self._on_disk(key, source):
            return False
        self._start(key, source)
        return True

    async def ready(self, resolved: ResolvedAdapter | None) -> bool:
        """Before a job goes to the engine: wait for its adapter's download (a mix: its members'), starting one
        when the version's copy is not on disk here; True if it waited. Nothing to wait for with local
        versions, copies on disk, and versions that failed here (the job is answered with the failure)."""
        waited = False
        for adapter in ([member for member, _ in resolved.mix] or [resolved]) if resolved is not None else []:
            source = self._source(adapter.key)
            if source is None or self.health.failure(adapter.key) is not None or self._on_disk(adapter.key, source):
                continue
            while True:
                task = self._start(adapter.key, source, urgent=True)
                try:
                    await asyncio.shield(task)  # a job cancelled at shutdown leaves the fetch running
                    break
                except asyncio.CancelledError:
                    if asyncio.current_task().cancelling() or not task.cancelled():
                        raise
                    # a queued fetch that gave way to another job's: wait for that one
            waited = True
        return waited

    async def stop(self) -> None:
        """Cancel the fetches (a download on its thread runs out; its result is dropped) and drop the pins."""
        tasks = [task for _, task, _ in self._fetching.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for key in list(self._copies):
            self._forget(key)

    def _source(self, key: str) -> Source | None:
        """(uri, sha256) of the version's publish when it names the object store; else None."""
        name, _, version = key.partition("@")
        publish = self.control_log.published(name, version)
        if publish is None or not is_store_path(publish.path):
            return None
        return publish.path, publish.sha256

    def _on_disk(self, key: str, source: Source) -> bool:
        copy = self._copies.get(key)
        return copy is not None and copy.source == source and copy.path.is_dir()

    def _start(self, key: str, source: Source, urgent: bool = False) -> asyncio.Task:
        running = self._fetching.get(key)
        if running is not None and running[0] == source:
            queued = not running[2] and key not in self._downloading
            if not (urgent and queued):
                return running[1]
            running[1].cancel()  # queued behind fetches nobody waits for, and now a job does
        # A fetch of an older publish runs out on its own; its result is dropped.
        task = asyncio.create_task(self._run(key, source, urgent), name=f"fetch {key}")
        self._fetching[key] = (source, task, urgent)
        return task

    async def _run(self, key: str, source: Source, urgent: bool) -> None:
        try:
            outcome, downloaded = await self._download(key, source, urgent)
        finally:
            running = self._fetching.get(key)
            if running is not None and running[1] is asyncio.current_task():
                del self._fetching[key]
        if self._source(key) != source:  # re-published or retired meanwhile: that publish's fetch reports
            if isinstance(outcome, Path):
                self._tier.unpin(outcome)
            return
        if isinstance(outcome, Path):
            self._forget(key)
            self._copies[key] = _Copy(source, outcome, pinned=True)
            if downloaded:
                self._downloaded.add(key)
            else:
                self._downloaded.discard(key)
            self.engine.register(AdapterSpec(key, str(outcome), source[1]))
            outcome = None
        self.on_done(key, outcome)

    def from_store(self, key: str) -> bool:
        """Whether the engine's load of `key` that just ended read a copy downloaded for it (asked once per load)."""
        downloaded = key in self._downloaded
        self._downloaded.discard(key)
        return downloaded

    async def _download(self, key: str, source: Source, urgent: bool) -> tuple[Path | str, bool]:
        """The version's directory in the tier (pinned) and whether it was downloaded now, or why it cannot be
        had."""
        for attempt in itertools.count():
            try:
                async with contextlib.nullcontext() if urgent else self._background, self._slots:
                    self._repin()
                    self._downloading.add(key)
                    try:
                        return await asyncio.to_thread(self._fetch_on_thread, *source)
                    finally:
                        self._downloading.discard(key)
            except StoreError as exc:
                self.metrics.store_fetches.labels(exc.kind).inc()
                if exc.kind != "unavailable":
                    return f"{key}: {exc}", False
                delay = self.settings.retry_delay(attempt)
                log.warning("fetching adapter %s: %s; trying again in %.1f s", key, exc, delay)
                await asyncio.sleep(delay)
                if self._source(key) != source:
                    return f"{key}: {exc}", False  # dropped by _run: no longer what is published
            except Exception as exc:  # the local disk (a tier directory it cannot write) or a bug: this version fails
                log.exception("fetching adapter %s failed", key)
                return f"{key}: disk tier {tier_dir(self.config)}: {type(exc).__name__}: {exc}", False

    def _fetch_on_thread(self, uri: str, sha256: str | None) -> tuple[Path, bool]:
        tier = self._open_tier()
        self._gets.count = 0
        started = time.monotonic()
        path = tier.fetch(uri, sha256, pin=True)
        if self._gets.count:
            self.metrics.store_download.observe(time.monotonic() - started)
            self.metrics.store_fetches.labels("ok").inc()
        else:
            self.metrics.store_fetches.labels("cached").inc()
        return path, self._gets.count > 0

    def _open_tier(self) -> DiskTier:
        with self._tier_lock:
            if self._tier is None:
                tier = DiskTier(tier_dir(self.config), self.config.adapter_disk_cache_bytes, self.settings)
                tier.client.meta.events.register("before-call.s3.GetObject", self._count_get)
                log.info("adapters from the object store are kept in %s (at most %d bytes)", tier.root, tier.max_bytes)
                self._tier = tier
            return self._tier

    def _count_get(self, **_) -> None:  # botocore's event hook, on the fetching thread
        self._gets.count = getattr(self._gets, "count", 0) + 1

    def _repin(self) -> None:
        """Pin the copies of the versions that take traffic here or are loading, unpin the rest; forget the
        copies of versions no longer published as they were."""
        for key, copy in list(self._copies.items()):
            if self._source(key) != copy.source:
                self._forget(key)
                continue
            keep = self.health.state(key) is Load.LOADING or self.registry.serves(key)
            if keep and not copy.pinned:
                if not copy.path.is_dir():  # evicted while unpinned: fetched again when needed
                    self._forget(key)
                    continue
                self._tier.pin(copy.path)
            elif copy.pinned and not keep:
                self._tier.unpin(copy.path)
            copy.pinned = keep

    def _forget(self, key: str) -> None:
        copy = self._copies.pop(key, None)
        if copy is not None and copy.pinned:
            self._tier.unpin(copy.path)
