"""admit_record, the one rule by which workers and the CLI apply or skip a control record: signatures,
and (with a control key) the replay rules of docs/trust.md. The broker-level tests are in
test_replay_kafka.py."""

from dataclasses import dataclass

import pytest

from lorabus.schemas import AdapterActivate, encode
from lorabus.worker.control_log import (MAX_IGNORED_KEPT, ControlLog, SignedControl, SkippedRecord, admit_record,
                                        control_key)
from lorabus.worker.signing import ControlKeys

SKEW_MS = 1000
T0 = 1_800_000_000_000
KEYS = ControlKeys({"k1": b"S" * 32})
SIGNED = SignedControl(KEYS, SKEW_MS)


@dataclass
class Record:
    key: bytes | None
    value: bytes | None
    headers: list
    timestamp: int
    offset: int = 0


def _record(event, broker_ms: int, sign: bool = True) -> Record:
    value = encode(event)
    return Record(control_key(event).encode(), value, [KEYS.sign(value)] if sign else [], broker_ms)


def _admit(log: ControlLog, record: Record, signed=SIGNED):
    """admit_record, and apply what it admits, as a reader does."""
    event = admit_record(log, record, signed)
    log.apply(record.offset, event)
    return event


def _reason(log: ControlLog, record: Record) -> str:
    with pytest.raises(SkippedRecord) as info:
        admit_record(log, record, SIGNED)
    return info.value.reason


def test_signed_events_need_their_nonce_and_time():
    log = ControlLog()
    assert _reason(log, _record(AdapterActivate("a", "v1"), T0)) == "unstamped"
    assert _reason(log, _record(AdapterActivate("a", "v1", event_id="e1"), T0)) == "unstamped"
    assert _reason(log, _record(AdapterActivate("a", "v1", event_id="e1", ts_ms=T0), T0, sign=False)) == "unsigned"
    assert _admit(log, _record(AdapterActivate("a", "v1", event_id="e1", ts_ms=T0), T0)).event_id == "e1"


def test_stale_reads_the_record_alone():
    """Older or newer than the broker's time by more than the skew: refused by a reader that saw nothing else."""
    event = AdapterActivate("a", "v1", event_id="e1", ts_ms=T0)
    assert _reason(ControlLog(), _record(event, T0 + SKEW_MS + 1)) == "stale"
    assert _reason(ControlLog(), _record(event, T0 - SKEW_MS - 1)) == "stale"  # signed ahead of the broker
    assert _admit(ControlLog(), _record(event, T0 + SKEW_MS)).event_id == "e1"


def test_replay_within_the_skew_is_refused_by_a_reader_that_applied_the_original():
    log = ControlLog()
    original = AdapterActivate("a", "v1", event_id="e1", ts_ms=T0)
    _admit(log, _record(original, T0))
    assert _reason(log, _record(original, T0 + 10)) == "replay"
    # The newest event under the key was signed a skew ahead of the broker's clock; another id signed more
    # than a skew before it is refused, although it is itself within the skew of its record's time.
    broker_ms = T0 + 5 * SKEW_MS
    _admit(log, _record(AdapterActivate("a", "v1", event_id="e2", ts_ms=broker_ms + SKEW_MS), broker_ms))
    older = AdapterActivate("a", "v1", event_id="e0", ts_ms=broker_ms - 1)
    assert _reason(log, _record(older, broker_ms)) == "replay"
    assert _admit(log, _record(AdapterActivate("a", "v1", event_id="e3", ts_ms=broker_ms), broker_ms)).event_id == "e3"
    # Another key is another history: the same id there is not a replay of this one.
    assert _admit(log, _record(AdapterActivate("a", "v2", event_id="e1", ts_ms=T0), T0)).version == "v2"


def test_a_key_keeps_only_the_ids_the_time_rule_would_not_refuse():
    """A key activated 10,000 times holds the ids within a skew of its newest, not every id ever; an id
    forgotten that way is still refused when re-sent, by the time rule."""
    log = ControlLog()
    first = AdapterActivate("a", "v1", event_id="e0", ts_ms=T0)  # re-sent below on a record of its own time
    for i in range(10_000):
        at = T0 + i * SKEW_MS // 10  # ten events a skew
        _admit(log, _record(AdapterActivate("a", "v1", event_id=f"e{i}", ts_ms=at), at))
    held = log.applied_under(control_key(first)).event_ids
    assert 10 <= len(held) <= 2 * 64, len(held)
    assert "e0" not in held and "e9999" in held
    assert _reason(log, _record(first, T0)) == "replay"  # forgotten, refused by its time
    newest = T0 + 9_999 * SKEW_MS // 10
    assert _reason(log, _record(AdapterActivate("a", "v1", event_id="e9999", ts_ms=newest), newest)) == "replay"


def test_without_a_key_nothing_is_judged_by_signature_or_time():
    log = ControlLog()
    event = AdapterActivate("a", "v1")
    assert _admit(log, _record(event, 0, sign=False), signed=None) == event
    assert _admit(log, _record(event, 0, sign=False), signed=None) == event


def test_ignored_records_are_counted_and_the_last_kept():
    log = ControlLog()
    for offset in range(MAX_IGNORED_KEPT + 5):
        log.note_ignored(offset, "k", SkippedRecord("unsigned", "no header"))
    assert log.ignored_count == MAX_IGNORED_KEPT + 5
    assert [r.offset for r in log.ignored] == list(range(5, MAX_IGNORED_KEPT + 5))
