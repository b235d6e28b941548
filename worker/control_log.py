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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote

import msgspec

from lorabus.schemas import (DECODE_ERRORS, AdapterActivate, AdapterPublish, AdapterRetire, AdapterWarm, ControlEvent,
                             RouteDelete, RouteSet, decode_control)

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
    its event's canonical key, where compaction would mix it up with other state)."""

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
class Entry:
    offset: int
    event: ControlEvent


@dataclass
class _Name:
    versions: dict[str, Entry]  # version → its last adapter.publish / adapter.retire
    activations: dict[str, int]  # version → offset of its last adapter.activate


@dataclass
class _Routes:
    sets: dict[str, Entry]  # digest → its last route.set
    deleted_at: int = -1  # offset of the last route.delete


class ControlLog:
    """Folds control records into state. Pure: no Kafka, no engine; the worker and the CLI share it."""

    def __init__(self):
        self.entries: dict[str, Entry] = {}
        self._names: dict[str, _Name] = {}
        self._routes: dict[tuple[str, str | None], _Routes] = {}
        self.end_offset = 0  # one past the last record read

    # ---- applying records -------------------------------------------------------------------------

    def apply(self, offset: int, event: ControlEvent) -> None:
        """Record an event read at `offset` under its canonical key."""
        self.end_offset = max(self.end_offset, offset + 1)
        key = control_key(event)
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
        return True

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
        return sorted(n for n in self._names if self.candidates(n))

    def candidates(self, name: str) -> list[str]:
        """The name's live versions in serving order (see the module docstring)."""
        state = self._names.get(name)
        if state is None:
            return []
        live = {v: e.offset for v, e in state.versions.items() if isinstance(e.event, AdapterPublish)}
        activated = sorted((v for v in live if v in state.activations), key=lambda v: -state.activations[v])
        rest = sorted((v for v in live if v not in state.activations), key=lambda v: live[v])
        return activated + rest

    def activated(self, name: str) -> str | None:
        """The version most recently activated, if it is live (what the operator asked to serve)."""
        state = self._names.get(name)
        if state is None:
            return None
        live = [v for v in state.activations if self.published(name, v) is not None]
        return max(live, key=lambda v: state.activations[v]) if live else None

    def routes(self, task: str, tenant: str | None) -> list[RouteSet]:
        """The routes of exactly (task, tenant) set after its last route.delete, newest first."""
        state = self._routes.get((task, tenant))
        if state is None:
            return []
        visible = [e for e in state.sets.values() if e.offset > state.deleted_at]
        return [e.event for e in sorted(visible, key=lambda e: -e.offset)]

    def route_keys(self) -> list[tuple[str, str | None]]:
        return sorted((k for k in self._routes if self.routes(*k)), key=lambda k: (k[0], k[1] or ""))

