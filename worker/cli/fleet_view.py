"""The fleet as `lorabus status` shows it: which workers are live, and the control log's state with
every worker's status, for humans (`render_status`) or programs (`fleet_json`).

Everything here is a pure function of a `ControlLog` (the control topic folded into state, see
worker/control_log.py) and the `WorkerStatus` records the workers publish on the status topic; the
`lorabus status` and `lorabus rollout ... --wait` commands (status.py, control.py) read both through
worker/client.py.

Anyone who can write the status topic writes what is read here, so nothing a record says is taken on
its word where it matters: a status's time is the broker's record timestamp (worker/client.py puts it
in `ts_ms`), a time further ahead than MAX_CLOCK_SKEW_MS is not believed, the writer's interval counts
for at most MAX_INTERVAL_MS, and every text from a record is escaped before it reaches a terminal.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field

import msgspec

from lorabus.schemas import ControlEvent, RouteDelete, RouteSet, RouteStatus, VersionStatus, WorkerStatus
from lorabus.worker.cli.control_checks import route_label
from lorabus.worker.control_log import ControlLog, control_key

DEFAULT_INTERVAL_MS = 2000  # taken for a status whose interval_ms is 0
SILENT_AFTER_INTERVALS = 3  # a worker is live while its last status is younger than this many intervals
# A status's interval counts for at most this (WorkerConfig.status_interval_ms may not exceed it): a record
# cannot keep a worker "live" longer than 3 of these after it was written, whatever it claims.
MAX_INTERVAL_MS = 60_000
# A status time ahead of this clock by up to this much is clock skew and counts as "now"; further ahead,
# it is not believed and the worker is not live.
MAX_CLOCK_SKEW_MS = 30_000
RECENT_EVENTS = 5  # control events `render_status` shows with the workers that applied them
IGNORED_DETAIL_CHARS = 120  # why a control record was ignored, as the text view shows it (a key may be long)


def status_age_ms(status: WorkerStatus, now_ms: int) -> int | None:
    """How long ago the status was written, by its `ts_ms` (the record's time) and this clock: 0 for a
    time ahead by up to MAX_CLOCK_SKEW_MS (clamped), None further ahead (a time not believed)."""
    age = now_ms - status.ts_ms
    return None if age < -MAX_CLOCK_SKEW_MS else max(0, age)


def is_live(status: WorkerStatus, now_ms: int) -> bool:
    """Whether the worker's last status is recent enough: 3 of its publishing intervals, each counted
    for at most MAX_INTERVAL_MS, and not from a time further ahead than MAX_CLOCK_SKEW_MS."""
    age = status_age_ms(status, now_ms)
    interval = min(status.interval_ms or DEFAULT_INTERVAL_MS, MAX_INTERVAL_MS)
    return age is not None and age <= SILENT_AFTER_INTERVALS * interval


def live_workers(statuses: dict[str, WorkerStatus], now_ms: int) -> dict[str, WorkerStatus]:
    return {w: s for w, s in sorted(statuses.items()) if is_live(s, now_ms)}


def describe_event(event: ControlEvent) -> str:
    """A short human description: the event type and what it is about."""
    tag = event.__struct_config__.tag
    match event:
        case RouteSet():
            targets = " ".join(f"{t.label()}={t.weight}" for t in event.targets)
            return f"{tag} {route_label(event.task, event.tenant)} {targets}"
        case RouteDelete():
            return f"{tag} {route_label(event.task, event.tenant)}"
    return f"{tag} {event.name}@{event.version}"


def terminal_text(text: str) -> str:
    """`text` safe to print: every character that is not printable (control characters such as newline
    and ESC, C1 controls, bidi and other format characters, line separators) written as an escape
    (\\x1b, \\u202e), so a record cannot move the cursor, recolour the terminal or forge rows."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else
                   (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}" if ord(ch) < 0x10000
                    else f"\\U{ord(ch):08x}") for ch in text)


def _table(rows: list[list[str]], indent: str) -> list[str]:
    """Rows of cells (escaped for the terminal), each column padded to its widest cell (the last column
    is not padded)."""
    if not rows:
        return []
    rows = [[terminal_text(cell) for cell in row] for row in rows]
    widths = [0] * max(map(len, rows))
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    return [indent + "  ".join(cell.ljust(widths[i]) if i < len(row) - 1 else cell
                               for i, cell in enumerate(row)).rstrip() for row in rows]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _names(log: ControlLog, statuses: dict[str, WorkerStatus]) -> list[str]:
    names = set(log.names())
    for status in statuses.values():
        names |= set(status.serving) | set(status.activated)
    return sorted(names)


def _name_of(ref: str) -> str:
    return ref.partition("@")[0]


def _version_of(ref: str) -> str:
    return ref.partition("@")[2]


def _worker_state(status: WorkerStatus, live: bool, now_ms: int) -> str:
    age = status_age_ms(status, now_ms)
    if live:
        state = "live"
    elif age is None:
        state = f"not live: status time {(status.ts_ms - now_ms) // 1000} s in the future"
    else:
        state = f"silent for {age // 1000} s"
    if status.truncated:
        cut = [_count(n, noun) for n, noun in ((status.routes_omitted, "route"), (status.versions_omitted, "version"),
                                              (status.names_omitted, "name")) if n]
        state += f" (truncated: {', '.join(cut)} left out)" if cut else " (truncated)"
    return state


@dataclass
class _WorkerIndex:
    """One worker's status indexed for the fleet view: versions and resident versions by adapter name,
    routes by (task, tenant), so the view costs O(names + versions + routes), not their product."""

    versions: dict[str, list[VersionStatus]] = field(default_factory=dict)  # by adapter name
    resident: dict[str, list[str]] = field(default_factory=dict)  # adapter name → its resident versions
    routes: dict[tuple[str, str | None], RouteStatus] = field(default_factory=dict)  # by (task, tenant)

    @classmethod
    def of(cls, status: WorkerStatus) -> "_WorkerIndex":
        index = cls()
        for v in status.versions:
            index.versions.setdefault(_name_of(v.adapter), []).append(v)
        for ref in status.resident:
            index.resident.setdefault(_name_of(ref), []).append(_version_of(ref))
        for r in status.routes:
            index.routes.setdefault((r.task, r.tenant), r)  # the first, as a linear search would find
        return index


def render_status(log: ControlLog, statuses: dict[str, WorkerStatus], now_ms: int) -> str:
    """The fleet for humans: workers (live or silent, how far behind the control log), per adapter name
    what is activated and what each worker serves, failures with their reasons, routes and whether each
    worker has the newest one in force, and which workers have applied the latest control events.
    Status records skipped as invalid (the `skipped` of worker/client.py's `read_statuses`) are listed
    apart. Every line is escaped for the terminal (`terminal_text`)."""
    workers = sorted(statuses)
    live = live_workers(statuses, now_ms)
    index = {w: _WorkerIndex.of(statuses[w]) for w in workers}
    log_names, keys = log.names(), log.route_keys()
    out = [f"control log: end offset {log.end_offset}; {_count(len(log_names), 'adapter name')}, "
           f"{_count(len(keys), 'route')}"]

    out.append(f"workers: {len(workers)} reporting, {len(live)} live")
    if not workers:
        out.append("  (no worker has published a status)")
    rows = [["WORKER", "STATE", "APPLIED", "BEHIND", "JOBS", "RESIDENT"]]
    for w in workers:
        s = statuses[w]
        behind = max(0, log.end_offset - s.control_offset)
        rows.append([w, _worker_state(s, w in live, now_ms), str(s.control_offset),
                     str(behind) if behind else "0 (up to date)", str(s.jobs_inflight), " ".join(s.resident) or "-"])
    if workers:
        out += _table(rows, "  ")
    plans = [[w, *key.split(" ", 1), plan] for w in workers for key, plan in sorted(statuses[w].plans.items())]
    if plans:
        out.append("plans (measured: LoRA per projection group and step shape class, attention per start-up "
                   "decode probe):")
        out += _table([["WORKER", "GROUP", "SHAPE", "PLAN"], *plans], "  ")
    skipped = getattr(statuses, "skipped", ())
    if skipped:
        out.append(f"status records skipped as invalid: {len(skipped)}")
        out += _table([[f"key {record.key}", f"@{record.offset}", record.reason] for record in skipped], "  ")

    names = _names(log, statuses)
    out.append("adapters:" if names else "adapters: none published")
    for name in names:
        live_versions, wanted = log.candidates(name), log.activated(name)
        out.append(f"  {name}: activated {wanted or '-'}; live versions {' '.join(live_versions) or '-'}")
        rows = []
        failures: dict[tuple[str, str], list[str]] = {}
        for w in workers:
            s, mine = statuses[w], index[w].versions.get(name, ())
            loading = [_version_of(v.adapter) for v in mine if v.state == "loading"]
            resident = index[w].resident.get(name, ())
            serves = s.serving.get(name, "-")
            if name not in s.serving and s.names_omitted:  # a truncated status left the name out: unknown
                serves = "(not reported)"
            elif wanted is not None and serves != wanted:
                serves += f" (not {wanted})"
            row = [w, f"serves {serves}", f"resident {' '.join(resident) or '-'}"]
            if loading:
                row.append(f"loading {' '.join(loading)}")
            loaded = [f"{_version_of(v.adapter)} from {v.source}" for v in mine if v.state == "ready" and v.source]
            if loaded:
                row.append(f"last loads: {', '.join(loaded)}")
            rows.append(row)
            for v in mine:
                if v.state == "failed":
                    failures.setdefault((v.adapter, v.reason or "failed to load"), []).append(w)
        out += _table(rows, "    ")
        for (ref, reason), where in sorted(failures.items()):
            out.append(f"    FAILED {ref} on {', '.join(where)}: {reason}")

    out.append("routes:" if keys else "routes: none")
    for task, tenant in keys:
        newest = log.routes(task, tenant)[0]
        offset = log.entries[control_key(newest)].offset
        targets = " ".join(f"{t.label()}={t.weight}" for t in newest.targets)
        out.append(f"  {route_label(task, tenant)}: newest {newest.event_id or '(no event id)'} @{offset}: "
                   f"{targets} (sticky {newest.sticky})")
        rows = []
        for w in workers:
            s = statuses[w]
            here = index[w].routes.get((task, tenant))
            serving = here.event_id if here is not None and here.event_id else None
            if here is not None and newest.event_id is not None and here.event_id == newest.event_id:
                text = "in force"
            elif s.control_offset <= offset:
                text = f"not read yet; serving {serving or 'no route'}"
            elif here is not None and here.pending_event_id == newest.event_id and newest.event_id is not None:
                text = f"pending (loading or failed); {serving or 'no route'} still serving"
            else:
                text = f"serving {serving or 'no route'}"
            rows.append([w, text])
        out += _table(rows, "    ")

    recent = heapq.nlargest(RECENT_EVENTS, log.entries.values(), key=lambda e: e.offset)
    if recent:
        out.append("latest control events (applied = read by the worker's last status):")
        rows = []
        for entry in recent:
            applied = [w for w in workers if statuses[w].control_offset > entry.offset]
            waiting = [w for w in workers if statuses[w].control_offset <= entry.offset]
            text = "applied by " + (", ".join(applied) or "no worker")
            if applied and waiting:
                text += f"; not yet {', '.join(waiting)}"
            rows.append([f"@{entry.offset}", describe_event(entry.event), entry.event.event_id or "-", text])
        out += _table(rows, "  ")
    if log.ignored_count:  # what workers skip is not state: shown apart, never folded in above
        out.append(f"ignored control records (workers skip them): {log.ignored_count}, the last {len(log.ignored)}:")
        out += _table([[f"@{r.offset}", r.key if r.key is not None else "-", r.reason, r.detail[:IGNORED_DETAIL_CHARS]]
                       for r in log.ignored], "  ")
    return "\n".join(map(terminal_text, out))  # lines from _table are escaped already: a no-op on them


def fleet_json(log: ControlLog, statuses: dict[str, WorkerStatus], now_ms: int) -> dict:
    """The same view as plain data: the control log's state and every worker's status as published
    (`ts_ms`: the record's time, see `read_statuses`), with `live` and `behind` added, and the status
    records skipped as invalid."""
    adapters = {name: {"activated": log.activated(name), "live_versions": log.candidates(name)}
                for name in log.names()}
    routes = [{"task": task, "tenant": tenant,
               "routes": [{"offset": log.entries[control_key(r)].offset, **msgspec.to_builtins(r)}
                          for r in log.routes(task, tenant)]} for task, tenant in log.route_keys()]
    entries = [{"offset": e.offset, "key": key, "event": msgspec.to_builtins(e.event)}
               for key, e in sorted(log.entries.items(), key=lambda item: item[1].offset)]
    workers = {w: {**msgspec.to_builtins(s), "live": is_live(s, now_ms),
                   "behind": max(0, log.end_offset - s.control_offset)} for w, s in sorted(statuses.items())}
    skipped = [msgspec.to_builtins(record) for record in getattr(statuses, "skipped", ())]
    return {"now_ms": now_ms,
            "control_log": {"end_offset": log.end_offset, "adapters": adapters, "routes": routes, "entries": entries,
                            "ignored_count": log.ignored_count,
                            "ignored": [dataclasses.asdict(r) for r in log.ignored]},
            "workers": workers, "skipped_status_records": skipped}
