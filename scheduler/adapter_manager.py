"""Every adapter tier in one owner: disk → host cache → device slots, and the loader thread between them.

Like vLLM's LoRA model manager. `AdapterManager` sizes and holds the device pool (`AdapterPool`, the slots
the LoRA kernels read) and the host cache (`HostAdapterCache`, parsed adapters in LRU order), knows which
adapters are registered (`AdapterSpec`), runs the loader thread that reads adapters from disk and writes
them into slots while steps run, reports finished loads to the step loop (`LoadDone`), remembers the
adapters that failed to load (their later jobs are answered at once, until a warm-up tries the disk again
or a load succeeds: a file restored makes its adapter loadable), drops what it cached of an adapter
re-published with new content, and builds the dummy job that warms an adapter up. A weighted mix of
adapters (`mix_spec`) is an adapter like any other, keyed by its canonical mix key: the loader builds it
from its members' weights (through the host cache) with `combine_adapters`, and re-publishing a member
drops whatever was cached or loaded of every mix that contains it. Which adapter a slot
holds is the scheduling policy's call (`AdapterSlots` in scheduler/policy.py); the manager loads what it
is handed.

Every read from disk verifies the file afresh (scheduler/adapters.py): the host cache holds copies the
worker owns, so an adapter evicted from it and loaded again is checked against its published sha256 again.

Threads: `register`, `knows` and `retry` from any thread; `_load_loop` on the loader thread; the rest on the step thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from lorabus.scheduler.adapters import (AdapterLoadError, AdapterWeights, MemberLoadError, ModelShapes, combine_adapters,
                                        read_adapter)
from lorabus.scheduler.config import EngineConfig
from lorabus.scheduler.lora import AdapterPool, slot_bytes
from lorabus.scheduler.policy import AdapterSlots
from lorabus.scheduler.requests import Request, SamplingParams, call_hook
from lorabus.scheduler.step_loop import LoadDone

log = logging.getLogger(__name__)

# Sizing when --max-loras / --max-cpu-loras are 0: device slots take this share of device memory, at most
# MAX_AUTO_SLOTS of them; the host cache keeps HOST_ADAPTERS_PER_SLOT adapters per device slot.
SLOT_MEMORY_SHARE = 0.05
MAX_AUTO_SLOTS = 64
HOST_ADAPTERS_PER_SLOT = 4
WARMUP_TENANT = "__warmup__"
# Mixes are registered by the jobs that ask for them, so any weights a producer sends make a new one: the
# manager remembers at most this many, least recently asked forgotten first (its next job registers it again).
MAX_MIX_SPECS = 4096
HOST, DISK = "host", "disk"  # the tiers a load's weights come from (on_load's source)
MIX_PREFIX = "mix:"  # a mix's key: no adapter name can start so (names have no ':')


@dataclass(frozen=True)
class AdapterSpec:
    key: str  # unique per content: "name@version", or a mix's canonical key
    path: str  # "" for a mix
    sha256: str | None = None
    members: tuple[tuple["AdapterSpec", float], ...] = ()  # a mix: (member, weight), in canonical order


def mix_key(members: list[tuple[str, float]]) -> str:
    """The canonical key of a weighted mix of adapter keys: members sorted, weights as Python's shortest
    float repr, so the same mix asked in any order shares one cache entry and one slot."""
    return MIX_PREFIX + "+".join(f"{key}*{float(weight)!r}" for key, weight in sorted(members))


def mix_spec(members: list[tuple[AdapterSpec, float]]) -> AdapterSpec:
    """The spec of a weighted mix of registered adapters (see `combine_adapters` for the math)."""
    ordered = tuple(sorted(((spec, float(weight)) for spec, weight in members), key=lambda m: (m[0].key, m[1])))
    return AdapterSpec(mix_key([(spec.key, weight) for spec, weight in ordered]), "", members=ordered)


def warmup_request(key: str) -> Request:
    """The dummy one-token job that warms an adapter up: its load and its first step, before live traffic."""
    return Request(f"warmup:{key}", WARMUP_TENANT, key, prompt_ids=[0], params=SamplingParams(1))


class HostAdapterCache:
    """The host-memory tier: LRU over parsed adapters, so a re-load skips disk and validation."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        # Keyed by the whole spec, so a same-name re-publish with new content never hits stale weights.
        self._items: OrderedDict[AdapterSpec, AdapterWeights] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, spec: AdapterSpec) -> AdapterWeights | None:
        with self._lock:
            weights = self._items.get(spec)
            if weights is not None:
                self._items.move_to_end(spec)
            return weights

    def put(self, spec: AdapterSpec, weights: AdapterWeights) -> None:
        with self._lock:
            self._items[spec] = weights
            self._items.move_to_end(spec)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def drop(self, spec: AdapterSpec) -> None:
        with self._lock:
            self._items.pop(spec, None)

    def __contains__(self, spec: AdapterSpec) -> bool:  # a look that leaves the LRU order as it is
        with self._lock:
            return spec in self._items

    def __len__(self) -> int:
        return len(self._items)


class AdapterManager:
    def __init__(self, shapes: ModelShapes, config: EngineConfig, dtype: torch.dtype, device: torch.device,
                 device_bytes: int):
        self.shapes, self.max_rank, self.dtype, self.device = shapes, config.max_lora_rank, dtype, device
        per_slot = slot_bytes(shapes.projections, shapes.num_layers, config.max_lora_rank, dtype)
        self.max_loras = config.max_loras or max(1, min(MAX_AUTO_SLOTS, int(SLOT_MEMORY_SHARE * device_bytes) // per_slot))
        self.max_cpu_loras = config.max_cpu_loras or HOST_ADAPTERS_PER_SLOT * self.max_loras
        self.pool = AdapterPool(shapes.projections, shapes.num_layers, self.max_loras, config.max_lora_rank, dtype,
                                device, backend=config.lora_backend)
        self.host_cache = HostAdapterCache(self.max_cpu_loras)
        self._specs: dict[str, AdapterSpec] = {}
        self._mix_keys: OrderedDict[str, None] = OrderedDict()  # registered mixes, least recently asked first
        self._errors: dict[str, str] = {}  # key → why it failed to load
        self._mix_lock = threading.Lock()  # register runs on the caller's threads
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (spec, slot) to load; None stops the loader
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (spec, slot, error, seconds, failed member, source)
        self._thread: threading.Thread | None = None
        # Called from the loader thread when a load finishes (the engine wakes its step thread).
        self.notify: Callable[[], None] = lambda: None
        # Optional metrics hook, called from the step thread: on_load(key, seconds, error, source), source the
        # tier the weights came from: "host" (the host cache) or "disk" (the adapter's files; a mix: built).
        self.on_load: Callable[[str, float, str | None, str], None] | None = None

    # ---- any thread -------------------------------------------------------------------------------

    def register(self, spec: AdapterSpec) -> AdapterSpec | None:
        """Make an adapter known (published); returns the spec it replaces if the content changed."""
        old = self._specs.get(spec.key)
        self._specs[spec.key] = spec
        if spec.members:
            self._remember_mix(spec.key)
        return old if old is not None and old != spec else None

    def _remember_mix(self, key: str) -> None:
        with self._mix_lock:
            self._mix_keys[key] = None
            self._mix_keys.move_to_end(key)
            while len(self._mix_keys) > MAX_MIX_SPECS:
                forgotten, _ = self._mix_keys.popitem(last=False)
                self._specs.pop(forgotten, None)
                self._errors.pop(forgotten, None)

    def knows(self, key: str) -> bool:
        return key in self._specs

    def spec(self, key: str) -> AdapterSpec | None:
        """The registered spec of `key` (what a mix of it is built from)."""
        return self._specs.get(key)

    def retry(self, key: str) -> None:
        """Forget that `key` failed to load, so its next load reads the disk again (its file may be fixed)."""
        self._errors.pop(key, None)

    # ---- the loader thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._load_loop, name="lorabus-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Stop the loader after the load in hand; False if it is still busy after `timeout_s` (a stuck read)."""
        if self._thread is None:
            return True
        self._queue.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _load_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            spec, slot = item
            started = time.perf_counter()
            error, member, source = None, None, DISK
            try:
                source = self._load(spec, slot)
            except AdapterLoadError as exc:
                error, member = str(exc), getattr(exc, "member", None)
            except Exception as exc:  # a loader bug must answer the jobs, not kill the thread
                log.exception("loading %s failed", spec.key)
                error = f"{spec.key}: {type(exc).__name__}: {exc}"
            self._done.put((spec, slot, error, time.perf_counter() - started, member, source))
            self.notify()

    def _load(self, spec: AdapterSpec, slot: int | None) -> str:
        """Load `spec` (into `slot`, or the host cache only); the tier its weights came from."""
        weights, source = self._host_weights(spec)
        if slot is not None:
            self.pool.write(slot, weights)
        return source

    def _host_weights(self, spec: AdapterSpec) -> tuple[AdapterWeights, str]:
        """The adapter's weights from the host cache, else read from disk (a mix: built from its members'), and
        which of the two it was."""
        weights = self.host_cache.get(spec)
        if weights is not None:
            return weights, HOST
        if spec.members:
            members = [(self._member_weights(member), weight) for member, weight in spec.members]
            weights = combine_adapters(spec.key, members, self.max_rank, self.dtype)
        else:
            weights = read_adapter(spec.key, spec.path, self.shapes, self.max_rank, self.dtype, spec.sha256)
        if self.device.type == "cuda":  # pinned pages let the host → device copy run async
            weights.modules = {k: (a.pin_memory(), b.pin_memory(), s) for k, (a, b, s) in weights.modules.items()}
        self.host_cache.put(spec, weights)
        return weights, DISK

    def _member_weights(self, member: AdapterSpec) -> AdapterWeights:
        try:
            return self._host_weights(member)[0]
        except AdapterLoadError as exc:
            raise MemberLoadError(member, str(exc)) from None

    # ---- the step thread --------------------------------------------------------------------------

    def load(self, key: str, slot: int | None) -> bool:
        """Queue `key` for loading (into `slot`, or the host cache only); False if it is not registered."""
        spec = self._specs.get(key)
        if spec is None:
            return False
        self._queue.put((spec, slot))
        return True

    def finished(self) -> list[LoadDone]:
        """The loads finished since the last call; a failed one is remembered for the key's later jobs."""
        done = []
        while True:
            try:
                spec, slot, error, seconds, member, source = self._done.get_nowait()
            except queue.Empty:
                return done
            if member is not None:  # a mix failed on a member's files: that member failed, as if loaded alone
                call_hook(self.on_load, member.key, seconds, error, DISK)
                if self._specs.get(member.key) == member:
                    self._errors[member.key] = error
            call_hook(self.on_load, spec.key, seconds, error, source)
            stale = self._specs.get(spec.key) != spec
            if error is not None and not stale:
                self._errors[spec.key] = error
            elif error is None:
                self._loaded_again(spec.key)
            done.append(LoadDone(spec.key, slot, error, stale))

    def _loaded_again(self, key: str) -> None:
        """`key` loaded: forget its failure, and let every failed mix with it as a member be built again."""
        self._errors.pop(key, None)
        for failed in list(self._errors):  # only failures, usually none; list() in one step: register may pop
            spec = self._specs.get(failed) if failed.startswith(MIX_PREFIX) else None
            if spec is not None and any(member.key == key for member, _ in spec.members):
                self._errors.pop(failed, None)

    def load_error(self, key: str) -> str | None:
        return self._errors.get(key)

    def prefetch(self, key: str, slots: AdapterSlots, wanted: set[str], now: float,
                 free_slot_only: bool = False) -> None:
        """Load `key` into the host tier ahead of traffic, and into a device slot no `wanted` adapter needs;
        with `free_slot_only`, only if a slot is free (nothing evicted, no host-only load)."""
        spec = self._specs.get(key)
        if spec is None:
            log.warning("prefetch of %s ignored: it is not registered", key)
            return
        if free_slot_only and not slots.has_free():
            return
        if key not in slots.slot_of and self.host_cache.get(spec) is None:
            self._queue.put((spec, slots.reserve(key, now, wanted)))

    def invalidate(self, old: AdapterSpec, slots: AdapterSlots) -> None:
        """`old` was re-published with new content: forget its weights, its load error and its ready slot,
        and the same of every registered mix built from it (the next job of such a mix registers it anew)."""
        mixes = [spec for spec in list(self._specs.values()) if any(m == old for m, _ in spec.members)]
        for spec in [old, *mixes]:
            self.host_cache.drop(spec)
            self._errors.pop(spec.key, None)
            # A slot still loading is reported stale when its load finishes (see `finished`).
            if slots.is_ready(spec.key):
                slots.retire(spec.key)
