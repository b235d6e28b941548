"""Which adapter versions a worker loads, in what order, and what it learns from each load.

Traffic moves to a version only once it has loaded here (safe activation): each version a name or a
route should serve next (`AdapterRegistry.to_load`) is warmed up (loaded, one dummy step) through the
engine, at most `max_warmups` at a time so a log of many names never queues thousands ahead of jobs.
Every finished load, a warm-up's or a job's, lands in `AdapterHealth`; a failure moves the name on to
its next version, and is tried again later in case its file is restored (worker/load_retry.py).
A version published in the object store (`s3://`) is fetched into the disk tier first (`StoreFetches`,
worker/store_fetches.py: loading meanwhile); a failed fetch is a failed load, and its retry fetches again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from lorabus.scheduler import Completion, Engine
from lorabus.worker.adapter_paths import AdapterPathError, confine_adapter_path, is_store_path
from lorabus.worker.config import WorkerConfig
from lorabus.worker.control_log import ControlLog
from lorabus.worker.load_retry import LoadRetries
from lorabus.worker.metrics import Metrics
from lorabus.worker.registry import AdapterHealth, AdapterRegistry, Load, is_mix_key
from lorabus.worker.store_fetches import StoreFetches

log = logging.getLogger(__name__)

# Queuing what serves at start-up gives the event loop back this often (tens of thousands of names).
START_SLICE_S = 0.02
STORE = "store"  # VersionStatus.source of a load that read a copy just downloaded from the object store


class AdapterLoads:
    def __init__(self, config: WorkerConfig, engine: Engine, control_log: ControlLog, registry: AdapterRegistry,
                 health: AdapterHealth, metrics: Metrics, on_change: Callable[[], None],
                 stopping: Callable[[], bool]):
        self.config, self.engine, self.control_log, self.registry = config, engine, control_log, registry
        self.health, self.metrics, self.on_change, self.stopping = health, metrics, on_change, stopping
        # False while start-up reads the control log: a name's versions are history then, and loading each
        # of thousands would only evict the others. From True on, every event and every finished load asks
        # for what serves next.
        self.active = False
        self.fetches = StoreFetches(config, engine, control_log, registry, health, metrics, self._fetched)
        self._retries = LoadRetries(config.adapter_retry_ms / 1000, config.adapter_retry_max_ms / 1000, self._retry)
        self._queue: collections.deque[str] = collections.deque()
        self._queued: set[str] = set()
        self._warming = 0  # warm-ups handed to the engine and not answered yet
        self._changed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def watch_engine(self, loop: asyncio.AbstractEventLoop) -> Callable[[str, float, str | None], None]:
        """The engine's on_load hook for loads a job asked for (warm-ups report through their answers)."""
        self._loop = loop

        def on_load(key: str, _seconds: float, error: str | None, source: str) -> None:  # on an engine thread
            if not is_mix_key(key):  # a mix is no published version: its members' loads are what health tracks
                self._from_engine(self._loaded, key, Load.READY if error is None else Load.FAILED, error, source)

        return on_load

    async def start(self) -> None:
        """Start-up, once the control log as read is applied: queue what serves, in slices, then go live."""
        slice_ends = time.monotonic() + START_SLICE_S
        for key in self.registry.to_load():
            if self.health.state(key) is None:
                self.load(key)
            if time.monotonic() >= slice_ends:
                await asyncio.sleep(0)
                slice_ends = time.monotonic() + START_SLICE_S
        self.active = True
        self.load_what_serves()  # what changed while the slices were queued

    def load_what_serves(self) -> None:
        """Warm up the next version each name and each route should serve, if it has not been tried here."""
        for key in self.registry.to_load():
            self.load(key)

    def load(self, key: str) -> None:
        """Load a version and run one dummy step on it; traffic moves to it only once it is ready. Queued
        behind the warm-ups already asked for."""
        self.health.set(key, Load.LOADING)
        if not self.fetches.fetch(key):  # else queued once its copy is on disk here (_fetched)
            self._enqueue(key)

    def _enqueue(self, key: str) -> None:
        if key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
        self._start_warmups()

    async def settle(self) -> None:
        """Wait until no version that serves here is still loading (bounded by control_wait_ms)."""
        deadline = time.monotonic() + self.config.control_wait_ms / 1000
        while self.health.loading:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("adapters still loading after %d ms; serving meanwhile", self.config.control_wait_ms)
                return
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    def _start_warmups(self) -> None:
        """Hand queued warm-ups to the engine while fewer than `max_warmups` are there (none once stopping:
        the engine would only answer them `internal`)."""
        while self._queue and self._warming < self.config.max_warmups and not self.stopping():
            key = self._queue.popleft()
            self._queued.discard(key)
            name, _, version = key.partition("@")
            if self.control_log.published(name, version) is None:  # retired while it waited
                self.health.forget(key)
                continue
            if self.health.state(key) is not Load.LOADING:  # a job's load got there first
                continue
            if self.fetches.fetch(key):  # re-published (or evicted) while it waited: queued again once fetched
                continue
            self._warming += 1
            self.engine.warm(key, self._warm_done(key))

    def _fetched(self, key: str, error: str | None) -> None:
        """A store version's fetch ended: warm it up if it is loading, or record why it cannot load."""
        if error is not None:
            self._loaded(key, Load.FAILED, error)
        elif self.health.state(key) is Load.LOADING:
            self._enqueue(key)

    def _warm_done(self, key: str) -> Callable[[Completion], None]:
        def done(c: Completion) -> None:  # on an engine thread
            if c.status == "ok":
                state, reason = Load.READY, None
            elif c.error_code in ("adapter_load_failed", "adapter_not_found"):
                state, reason = Load.FAILED, c.error_message
            else:  # e.g. the engine is stopping: nothing learned about the adapter
                state, reason = None, c.error_message
            self._from_engine(self._warmed, key, state, reason)

        return done

    def _warmed(self, key: str, state: Load | None, reason: str | None) -> None:
        self._warming -= 1
        self._loaded(key, state, reason)
        self._start_warmups()

    def _from_engine(self, fn, *args) -> None:
        """Run `fn(*args)` on the event loop, called from an engine thread; dropped once the loop has closed."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the worker has stopped: nothing left to tell
            pass

    def _loaded(self, key: str, state: Load | None, reason: str | None, source: str | None = None) -> None:
        """A load finished (`source`: the tier the engine read it from, when the engine says): record it; a
        failure moves on to the next version in order."""
        if state is Load.READY and source is not None:  # before the state: a status built on it says where from
            self.health.sources[key] = STORE if source == "disk" and self.fetches.from_store(key) else source
        if state is None:
            if self.health.state(key) is Load.LOADING:
                self.health.forget(key)
            changed = True
        else:
            changed = self.health.set(key, state, reason)
            if state is Load.FAILED and changed:
                log.warning("adapter %s failed to load: %s", key, reason)
                self.metrics.adapter_load_failures.inc()
        if state is Load.FAILED:  # its file may be restored: tried again later
            self._retries.failed(key)
        elif state is Load.READY:
            self._retries.settled(key)
        if changed:
            if state is not None and self.active:
                self.load_what_serves()
            self.on_change()
            self._changed.set()

    def _retry(self, key: str) -> None:
        """A failed version's next try: loaded again as at publish (a store version: fetched again), while it
        still fails here and the engine holds what is published (a re-publish whose path was refused keeps
        failing until the next one)."""
        name, _, version = key.partition("@")
        publish = self.control_log.published(name, version)
        if self.stopping() or publish is None or self.health.state(key) is not Load.FAILED or not (
                is_store_path(publish.path) or self._registered(key, publish.path, publish.sha256)):
            self._retries.settled(key)
            return
        log.info("trying adapter %s again (it failed: %s)", key, self.health.failure(key))
        self.load(key)

    def _registered(self, key: str, path: str, sha256: str | None) -> bool:
        """Whether the engine holds the local version as published (its path confined as at publish)."""
        spec = self.engine.spec(key)
        try:
            return spec is not None and (spec.path, spec.sha256) == (confine_adapter_path(path, self.config.adapter_root),
                                                                     sha256)
        except AdapterPathError:
            return False
