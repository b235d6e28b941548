"""Adapter affinity across a fleet: record keys that keep one adapter's jobs on few partitions, and the
worker's view of which adapters its own partitions carry.

Producer side. Kafka's default partitioner sends a record to murmur2(key) mod partitions, so every
record under one key lands on one partition, hence on one worker of the group. `AffinityKeyer` keys a
job `"<adapter>#<salt>"` (or `"task:<task>#<salt>"` for a routed job without an adapter), with the salt in
[0, n): an adapter's jobs then reach at most n partitions, and the workers that own them keep it
resident instead of every worker loading every adapter. n grows with the adapter's share of the
producer's recent traffic, so a hot adapter is spread over several partitions (and workers) instead of
pinning one:

    n = clamp(ceil(share × partitions × spread), 1, max_salts)
    share = the adapter's jobs among the last `window` jobs / window

Dividing by the window's capacity, not by the jobs seen so far, makes a fresh producer start every
adapter at n = 1 and grow n as traffic accumulates. The salt is a stable hash of the job id mod n, so a
job sent twice lands on the same partition. Base-model jobs carry no adapter to be near: they are keyed
by job id and spread evenly. Every producer computes the same keys for the same traffic mix, and keys
are a placement hint only: a worker serves any job on any partition.

Worker side. `HomeAdapters` counts the adapter keys of the jobs each assigned partition delivered
recently; the worker hands the union to the engine (`Engine.set_adapter_affinity`), whose slot
eviction then gives up idle adapters that its partitions do not bring before ones they do. A
revoked partition's adapters stop counting at once. `adapter_hint` reads a record's adapter from its
`x-adapter-id` header or affinity key without decoding the body, for look-ahead prefetch (`look_ahead`).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter, deque
from collections.abc import Hashable, Mapping

from lorabus.schemas import JobError

TASK_PREFIX = "task:"
SALT_SEPARATOR = "#"


def _stable_hash(text: str) -> int:
    """The first 8 bytes of SHA-256, big-endian: the same in every process and language."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def affinity_target(job: Mapping) -> str | None:
    """What a job should be kept near: its adapter, else its task's route; None for the base model."""
    adapter, task = job.get("adapter"), job.get("task")
    if isinstance(adapter, str) and adapter:
        return adapter
    if isinstance(task, str) and task:
        return TASK_PREFIX + task
    return None


class AffinityKeyer:
    """Record keys for jobs, adapter-affine with traffic-grown salts (module docstring).

    partitions: the jobs topic's partition count. spread (default 1.0): partitions per unit of traffic
    share, so an adapter with 25% of the traffic on 12 partitions gets ceil(0.25 × 12 × 1.0) = 3 salts.
    max_salts (default: partitions): the most partitions one adapter is spread over. window (default
    500): how many recent jobs the shares are counted over (a hot adapter reaches its full spread after
    about that many jobs)."""

    def __init__(self, partitions: int, spread: float = 1.0, max_salts: int | None = None, window: int = 500):
        if partitions < 1 or window < 1 or spread <= 0:
            raise ValueError("partitions and window must be at least 1, spread positive")
        self.partitions, self.spread, self.window = partitions, spread, window
        self.max_salts = max(1, min(max_salts or partitions, partitions))
        self._recent: deque[str] = deque()
        self._counts: Counter[str] = Counter()

    def salts(self, target: str) -> int:
        """How many partitions `target`'s jobs are spread over now."""
        share = self._counts[target] / self.window
        return max(1, min(self.max_salts, math.ceil(share * self.partitions * self.spread)))

    def observe(self, target: str) -> None:
        self._recent.append(target)
        self._counts[target] += 1
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]

    def key(self, job: Mapping) -> str:
        """The record key for `job` (a wire job as a dict); counts it towards its target's share."""
        job_id = str(job["id"])
        target = affinity_target(job)
        if target is None:
            return job_id
        self.observe(target)
        return f"{target}{SALT_SEPARATOR}{_stable_hash(job_id) % self.salts(target)}"


def job_key(job: Mapping, keyer: AffinityKeyer | None = None) -> bytes:
    """The producer helper: the Kafka record key for a wire job (a dict), adapter-affine when a keyer is
    given, the job id otherwise."""
    return (keyer.key(job) if keyer is not None else str(job["id"])).encode()


def adapter_hint(key: bytes | None, headers) -> str | None:
    """The adapter a jobs record names, read without decoding its body: the `x-adapter-id` header, else
    an affinity key's adapter part. A hint only (a job id may contain '#'); None when there is none."""
    for name, value in headers or ():
        if name == "x-adapter-id" and value:
            try:
                return value.decode()
            except UnicodeDecodeError:
                return None
    if not key:
        return None
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return None
    target, sep, salt = text.rpartition(SALT_SEPARATOR)
    if not sep or not target or not salt.isdigit() or target.startswith(TASK_PREFIX):
        return None
    return target


def look_ahead(record, registry, adapter_health, engine) -> None:
    """Start loading a fetched record's adapter (named by its header or affinity key) into a free device slot
    of `engine` before its body is decoded; only a free one, so no adapter its batch neighbours need is
    evicted (docs/scheduling.md, "Look-ahead loads")."""
    hint = adapter_hint(record.key, record.headers)
    if hint is None:
        return
    try:
        key = registry.resolve(hint, "").key
    except (JobError, ValueError):  # malformed, unknown yet, or tenant-restricted: the job itself will tell
        return
    if adapter_health.failure(key) is None and engine.spec(key) is not None:  # s3://: once fetched
        engine.prefetch(key, free_slot_only=True)


class HomeAdapters:
    """Adapter keys of the jobs each assigned partition delivered recently (the last `per_partition`)."""

    def __init__(self, per_partition: int = 256):
        self.per_partition = per_partition
        self._recent: dict[Hashable, deque[str]] = {}
        self._counts: Counter[str] = Counter()
        self.version = 0  # bumped on every change, so callers can push only what changed

    def seen(self, partition: Hashable, key: str) -> None:
        recent = self._recent.setdefault(partition, deque())
        recent.append(key)
        self._counts[key] += 1
        if len(recent) > self.per_partition:
            self._forget(recent.popleft())
        self.version += 1

    def drop(self, partition: Hashable) -> None:
        """The partition was revoked: its adapters no longer count."""
        for key in self._recent.pop(partition, ()):
            self._forget(key)
        self.version += 1

    def scores(self) -> dict[str, int]:
        """Adapter key → jobs among the recent ones of this worker's partitions."""
        return dict(self._counts)

    def _forget(self, key: str) -> None:
        self._counts[key] -= 1
        if not self._counts[key]:
            del self._counts[key]
