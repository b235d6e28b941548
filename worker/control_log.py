"""The control topic as state: the last event under each record key, and what serving follows from it.

The control topic is compacted, so a restarted worker reads only the last record of each key. Every
event therefore has one canonical key (`control_key`), a record whose key is not its event's canonical
key is ignored, and everything here is a function of the last event under each key and its offset.
Compaction keeps exactly that, so a worker restarted after compaction derives the same state:

    adapter:<name>@<version>          adapter.publish, or adapter.retire of that version
    activate:<name>@<version>         adapter.activate; its offset ranks the version among the name's activations
    warm:<name>@<version>             adapter.warm (a command: nothing to keep beyond its record)
    route:<task>:<tenant>             route.delete: hides the routes of (task, tenant) set before it
    route:<task>:<tenant>:<digest>    route.set, one key per distinct (targets, sticky): a route set again
                                      moves to its new offset

`<tenant>` is the tenant percent-encoded, or `*` for a route of every tenant; `<digest>` is the first
16 hex digits of SHA-256 over the route's JSON targets (a mix target's members and weights included) and
sticky key. A tombstone (a record without
a value) clears its key, as compaction eventually does.

Because compaction reorders history (a version's publish may end up after its activation, a retire
replaces the publish it retired), no event is judged by what came before it: an activation of a
version not (yet) published is kept and counts once the version is published; retiring or deleting
what does not exist is a no-op.

Serving order. A name's *candidates* are its live versions (last record a publish) in the order they
should serve: the activated ones by their last activation, newest first, then those never activated
by publish offset, oldest first (so a name's first version serves until another is activated). A
task's *routes* are those set after its last route.delete, newest first. The worker serves the first
candidate or route whose versions have loaded on it and falls back along the order when one fails,
which is the history a compacted log still holds.

Cost. Whatever asks, the answers are kept, not re-derived: a name's candidates, a task's routes, the
sorted lists of names and route keys are computed once after a change and cached until the next change
to that name or route key, and every change is told to the watchers (`watch`), so a reader that keeps
state of its own (the registry's loads to start) updates only what changed. Folding a log of N records
costs O(N); a name whose history changed is re-ordered once, not once per question.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import quote

import msgspec

from lorabus.schemas import (DECODE_ERRORS, AdapterActivate, AdapterPublish, AdapterRetire, AdapterWarm, ControlEvent,
                             RouteDelete, RouteSet, decode_control)
from lorabus.worker.signing import ControlKeys

_DIGEST_HEX = 16
ALL_TENANTS = "*"


def _tenant_part(tenant: str | None) -> str:
    return ALL_TENANTS if tenant is None else quote(tenant, safe="")


def route_digest(route: RouteSet) -> str:
    body = msgspec.json.encode([route.sticky, route.targets])
    return hashlib.sha256(body).hexdigest()[:_DIGEST_HEX]


def control_key(event: ControlEvent) -> str:
    """The canonical record key of a control event (see the module docstring)."""
    match event:
        case AdapterPublish() | AdapterRetire():
            return f"adapter:{event.name}@{event.version}"
        case AdapterActivate():
            return f"activate:{event.name}@{event.version}"
        case AdapterWarm():
            return f"warm:{event.name}@{event.version}"
        case RouteSet():
            return f"route:{event.task}:{_tenant_part(event.tenant)}:{route_digest(event)}"
        case RouteDelete():
            return f"route:{event.task}:{_tenant_part(event.tenant)}"
    raise TypeError(f"not a control event: {type(event).__name__}")


_KEY_KINDS = ("adapter", "activate", "warm", "route")


def is_control_key(key: str) -> bool:
    """Whether a record key has the form of a canonical key (a tombstone under one is a deletion)."""
    kind, sep, rest = key.partition(":")
    return bool(sep and rest) and kind in _KEY_KINDS


def key_text(raw: bytes | None) -> str | None:
    """A record key as text (None when absent or not UTF-8: no canonical key is either)."""
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class SkippedRecord(Exception):
    """A control record no reader may apply: `reason` "invalid" (not a valid event) or "key" (not under
    its event's canonical key, where compaction would mix it up with other state); from `admit_record`
    also "tombstone", a signature Verdict code, "unstamped", "stale" or "replay"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def read_record(key: str | None, value: bytes) -> ControlEvent:
    """The event of a control record (not a tombstone); SkippedRecord when it must be skipped."""
    try:
        event = decode_control(value)
    except DECODE_ERRORS as exc:
        raise SkippedRecord("invalid", f"{type(exc).__name__}: {exc}") from None
    if key != control_key(event):
        raise SkippedRecord("key", f"record key {key!r} is not the event's key {control_key(event)!r}")
    return event


@dataclass(frozen=True)
class SignedControl:
    """What a fleet started with `--control-key` requires of a control record: a valid signature, and a
    signed `event_id` (its nonce) and `ts_ms` (its time) that make it fresh (`admit_record`)."""

    keys: ControlKeys
    max_skew_ms: int  # WorkerConfig.control_max_skew_ms


def admit_record(log: "ControlLog", record, signed: SignedControl | None) -> ControlEvent | str:
    """Whether a worker applies a control record: the one rule, shared by the worker and the CLI (which
    folds only what workers would apply). Returns the event to apply, or the key a tombstone clears;
    raises SkippedRecord(reason, detail) for a record to ignore. `record` is a Kafka record (key, value,
    headers, timestamp: the broker's time on a LogAppendTime topic, as the control topic is created).

    With `signed`, a record must be signed, carry `event_id` and `ts_ms`, and be fresh:
      - "stale": its `ts_ms` is further than `max_skew_ms` from the record's broker timestamp. This reads
        the record alone, so every reader decides it alike, before or after compaction or a restart: a
        signed record re-sent later than `max_skew_ms` after it was signed is never applied.
      - "replay": its `event_id` was already applied under its key, or its `ts_ms` is older than the
        newest event applied under its key by more than `max_skew_ms` (a re-send within the skew, caught
        by a reader that read the original; see docs/trust.md for what this leaves open).
    """
    key = key_text(record.key)
    if record.value is None:
        # A tombstone cannot be signed: applied only when events need no signature (compaction would
        # still apply it, which is why the control topic needs write ACLs).
        if signed is None and key is not None and is_control_key(key):
            return key
        raise SkippedRecord("tombstone", "a record without a value, under no control key")
    if signed is not None:
        verdict = signed.keys.verify(record.value, record.headers)
        if not verdict.ok:
            raise SkippedRecord(verdict.code, verdict.reason)
    event = read_record(key, record.value)
    if signed is not None:
        _check_fresh(log, key, event, record.timestamp, signed.max_skew_ms)
    return event


def _check_fresh(log: "ControlLog", key: str, event: ControlEvent, broker_ms: int, max_skew_ms: int) -> None:
    if event.event_id is None or event.ts_ms is None:
        raise SkippedRecord("unstamped", "a signed event needs an event_id and a ts_ms (its nonce and its time)")
    if abs(broker_ms - event.ts_ms) > max_skew_ms:
        raise SkippedRecord("stale", f"event {event.event_id}: signed at ts_ms {event.ts_ms}, appended at "
                                     f"{broker_ms}: further apart than {max_skew_ms} ms (a re-sent old record?)")
    seen = log.applied_under(key)
    if seen is not None:
        if event.ts_ms < seen.newest_ts_ms - max_skew_ms:
            raise SkippedRecord("replay", f"event {event.event_id}: ts_ms {event.ts_ms} is older than the newest "
                                          f"event applied under {key} ({seen.newest_ts_ms}) by more than {max_skew_ms} ms")
        if event.event_id in seen.event_ids:
            raise SkippedRecord("replay", f"event {event.event_id} was already applied under {key}")
        seen.forget_older_than(seen.newest_ts_ms - max_skew_ms)


@dataclass
class _Applied:
    """What was applied under one key, for replay checks: the newest ts_ms, and the event ids (with their
    ts_ms) that the time rule alone would not refuse."""

    event_ids: dict[str, int] = field(default_factory=dict)  # event id → its ts_ms
    newest_ts_ms: int = -1
    _trim_at: int = 64  # forget_older_than scans only when this many ids are held: amortized O(1) a record

    def add(self, event_id: str, ts_ms: int) -> None:
        self.event_ids[event_id] = ts_ms
        self.newest_ts_ms = max(self.newest_ts_ms, ts_ms)

    def forget_older_than(self, ts_ms: int) -> None:
        """Drop the ids signed before `ts_ms` (newest minus the skew): the time rule refuses their replays,
        so a key's history stays as long as the events within a skew of its newest, not every event ever."""
        if len(self.event_ids) < self._trim_at:
            return
        self.event_ids = {eid: t for eid, t in self.event_ids.items() if t >= ts_ms}
        self._trim_at = max(64, 2 * len(self.event_ids))


MAX_IGNORED_KEPT = 20  # the last ignored records a reader keeps to show; older ones are only counted


@dataclass(frozen=True)
class IgnoredRecord:
    """A control record a reader skipped (as a worker would): where, under which key, and why."""

    offset: int
    key: str | None
    reason: str  # SkippedRecord.reason or a signature Verdict.code
    detail: str


@dataclass(frozen=True)
class Entry:
    offset: int
    event: ControlEvent


# The dicts below are kept in the order their entries were applied (an entry applied again is removed
# first), which is offset order when records are applied as read: sorting them by offset is then linear.
@dataclass
class _Name:
    versions: dict[str, Entry]  # version → its last adapter.publish / adapter.retire
    activations: dict[str, int]  # version → offset of its last adapter.activate
    order: tuple[str, ...] | None = None  # the candidates, until the name changes


@dataclass
class _Routes:
    sets: dict[str, Entry]  # digest → its last route.set
    deleted_at: int = -1  # offset of the last route.delete
    visible: list[RouteSet] | None = None  # routes(), until the route key changes


RouteKey = tuple[str, str | None]  # (task, tenant); None: every tenant


@dataclass
class _Watchers:
    names: list[Callable[[str], None]] = field(default_factory=list)
    routes: list[Callable[[RouteKey], None]] = field(default_factory=list)


class ControlLog:
    """Folds control records into state. Pure: no Kafka, no engine; the worker and the CLI share it."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self._names: dict[str, _Name] = {}
        self._routes: dict[RouteKey, _Routes] = {}
        self.end_offset = 0  # one past the last record read
        self._live_names: list[str] | None = None  # names(), until any name changes
        self._route_keys: list[RouteKey] | None = None  # route_keys(), until any route key changes
        self._watchers = _Watchers()
        self._applied: dict[str, _Applied] = {}  # key → its applied stamped events (kept past tombstones)
        self.ignored: list[IgnoredRecord] = []  # records a reader skipped (the CLI's fold: see read_control_log)
        self.ignored_count = 0

    def note_ignored(self, offset: int, key: str | None, skip: SkippedRecord) -> None:
        """Count a skipped record and keep the last MAX_IGNORED_KEPT of them."""
        self.end_offset = max(self.end_offset, offset + 1)
        self.ignored_count += 1
        self.ignored.append(IgnoredRecord(offset, key, skip.reason, skip.detail))
        del self.ignored[:-MAX_IGNORED_KEPT]

    def applied_under(self, key: str) -> "_Applied | None":
        """The event ids and newest ts_ms applied under a key (None: nothing applied there)."""
        return self._applied.get(key)

    def watch(self, on_name: Callable[[str], None], on_route: Callable[[RouteKey], None]) -> None:
        """Be told of every change: `on_name(name)` when a name's versions or activations change,
        `on_route((task, tenant))` when that route key's sets or delete change."""
        self._watchers.names.append(on_name)
        self._watchers.routes.append(on_route)

    # ---- applying records -------------------------------------------------------------------------

    def apply(self, offset: int, event: ControlEvent) -> None:
        """Record an event read at `offset` under its canonical key."""
        self.end_offset = max(self.end_offset, offset + 1)
        key = control_key(event)
        if event.event_id is not None and event.ts_ms is not None:  # only stamped events are judged for replay
            self._applied.setdefault(key, _Applied()).add(event.event_id, event.ts_ms)
        self._forget(key)
        if isinstance(event, AdapterWarm):
            return  # a command, not state
        self.entries[key] = entry = Entry(offset, event)
        match event:
            case AdapterPublish() | AdapterRetire():
                self._name(event.name).versions[event.version] = entry
            case AdapterActivate():
                self._name(event.name).activations[event.version] = offset
            case RouteSet():
                self._route(event.task, event.tenant).sets[route_digest(event)] = entry
            case RouteDelete():
                self._route(event.task, event.tenant).deleted_at = offset
        self._changed(event)

    def clear(self, offset: int, key: str) -> bool:
        """A tombstone under `key`: forget what it held. False when the key holds nothing."""
        self.end_offset = max(self.end_offset, offset + 1)
        return self._forget(key)

    def _forget(self, key: str) -> bool:
        entry = self.entries.pop(key, None)
        if entry is None:
            return False
        event = entry.event
        match event:
            case AdapterPublish() | AdapterRetire():
                self._names[event.name].versions.pop(event.version, None)
            case AdapterActivate():
                self._names[event.name].activations.pop(event.version, None)
            case RouteSet():
                self._routes[(event.task, event.tenant)].sets.pop(route_digest(event), None)
            case RouteDelete():
                self._routes[(event.task, event.tenant)].deleted_at = -1
        self._changed(event)
        return True

    def _changed(self, event: ControlEvent) -> None:
        """Drop what was cached of the event's name or route key, and tell the watchers."""
        if isinstance(event, (RouteSet, RouteDelete)):
            route_key = (event.task, event.tenant)
            self._routes[route_key].visible = None
            self._route_keys = None
            for on_route in self._watchers.routes:
                on_route(route_key)
        else:
            self._names[event.name].order = None
            self._live_names = None
            for on_name in self._watchers.names:
                on_name(event.name)

    def _name(self, name: str) -> _Name:
        return self._names.setdefault(name, _Name({}, {}))

    def _route(self, task: str, tenant: str | None) -> _Routes:
        return self._routes.setdefault((task, tenant), _Routes({}))

    # ---- what the state says ----------------------------------------------------------------------

    def published(self, name: str, version: str) -> AdapterPublish | None:
        """The publish event of a live version (None: never published, or retired)."""
        state = self._names.get(name)
        entry = state.versions.get(version) if state else None
        return entry.event if entry is not None and isinstance(entry.event, AdapterPublish) else None

    def names(self) -> list[str]:
        """The names with a live version, sorted."""
        if self._live_names is None:
            self._live_names = sorted(n for n in self._names if self.candidate_order(n))
        return list(self._live_names)

    def candidates(self, name: str) -> list[str]:
        """The name's live versions in serving order (see the module docstring)."""
        return list(self.candidate_order(name))

    def candidate_order(self, name: str) -> tuple[str, ...]:
        """candidates() as the cached tuple itself: no copy, for readers that ask per job."""
        state = self._names.get(name)
        if state is None:
            return ()
        if state.order is None:
            live = {v: e.offset for v, e in state.versions.items() if isinstance(e.event, AdapterPublish)}
            activated = sorted((v for v in live if v in state.activations), key=lambda v: -state.activations[v])
            rest = sorted((v for v in live if v not in state.activations), key=live.__getitem__)
            state.order = tuple(activated + rest)
        return state.order

    def activated(self, name: str) -> str | None:
        """The version most recently activated, if it is live (what the operator asked to serve): the
        first candidate when it was activated at all, as activated versions come first."""
        order = self.candidate_order(name)
        return order[0] if order and order[0] in self._names[name].activations else None

    def routes(self, task: str, tenant: str | None) -> list[RouteSet]:
        """The routes of exactly (task, tenant) set after its last route.delete, newest first."""
        state = self._routes.get((task, tenant))
        if state is None:
            return []
        if state.visible is None:
            visible = [e for e in state.sets.values() if e.offset > state.deleted_at]
            state.visible = [e.event for e in sorted(visible, key=lambda e: -e.offset)]
        return list(state.visible)

    def route_keys(self) -> list[RouteKey]:
        """The (task, tenant) keys with a visible route, by task then tenant (every tenant first)."""
        if self._route_keys is None:
            self._route_keys = sorted((k for k in self._routes if self.routes(*k)), key=lambda k: (k[0], k[1] or ""))
        return list(self._route_keys)
