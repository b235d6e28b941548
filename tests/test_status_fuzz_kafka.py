"""Hostile status records through the real broker (issue 20, item 7): hypothesis draws a batch of records
anyone with WRITE on the status topic can send (bytes that are not JSON, JSON of wrong types, well-formed
statuses with hostile fields: names with control, ANSI and bidi characters, timestamps and intervals at
the edges of their types, long lists; tombstones; keys that are not UTF-8), writes them to a status topic
created as workers create it, then one honest worker's record last. `lorabus status` (text and --json)
must finish within a bound, exit 0, show the honest worker live, print no raw control character, and
account for every hostile key: shown (escaped) as a worker, or listed as skipped."""

import asyncio
import json
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import strategies as st

from fuzz_strategies import draw_specs
from lorabus.schemas import WorkerStatus, encode
from lorabus.worker import cli
from lorabus.worker.topics import CONTROL_TOPIC_CONFIGS, STATUS_TOPIC_CONFIGS, ensure_topics

pytestmark = pytest.mark.kafka

RECORDS = 150
# Characters a terminal acts on: C0 and C1 controls (ESC starts ANSI sequences), DEL, bidi overrides.
TERMINAL_ACTIVE = [chr(c) for c in [*range(0, 9), *range(11, 32), 127, *range(0x80, 0xA0)]] + ["\u202e", "\u2066"]
EDGE_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**53, 2**63 - 1, -(2**63)]
SECONDS_BOUND = 60.0

hostile_text = st.text(st.sampled_from(TERMINAL_ACTIVE + list("ab-.:/ \n")), min_size=1, max_size=40)


@st.composite
def status_records(draw):
    """(key bytes or None, value bytes or None): one record a hostile writer of the status topic sends."""
    key = draw(st.one_of(hostile_text.map(lambda s: s.encode("utf-8", "surrogatepass")),
                         st.binary(min_size=1, max_size=12)))
    # (A record without a key the broker itself refuses on a compacted topic.)
    kind = draw(st.sampled_from(["status", "status", "status", "json", "bytes", "tombstone"]))
    if kind == "tombstone":
        return key, None
    if kind == "bytes":
        return key, draw(st.binary(max_size=300))
    if kind == "json":
        value = draw(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | hostile_text,
                                  lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
                                  max_leaves=20))
        return key, json.dumps(value).encode()
    fields = {
        "worker": draw(hostile_text), "ts_ms": draw(st.sampled_from(EDGE_INTS)),
        "started_ms": draw(st.sampled_from(EDGE_INTS)), "control_offset": draw(st.sampled_from(EDGE_INTS)),
        "interval_ms": draw(st.sampled_from(EDGE_INTS)), "serving": {draw(hostile_text): draw(hostile_text)},
        "activated": {}, "versions": [], "resident": draw(st.lists(hostile_text, max_size=3)),
        "host_cached": draw(st.sampled_from(EDGE_INTS)), "routes": [],
    }
    return key, json.dumps(fields).encode()


def _honest(worker: str) -> bytes:
    now = int(time.time() * 1000)
    return encode(WorkerStatus(worker=worker, ts_ms=now, started_ms=now - 5000, control_offset=0, serving={},
                               activated={}, versions=[], resident=[], host_cached=0, routes=[]))


async def _send(kafka: str, topic: str, records) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def _status_cli(capsys, *args) -> tuple[int, str, float]:
    started = time.monotonic()
    rc = cli.main(["status", *args])
    return rc, capsys.readouterr().out, time.monotonic() - started


def test_hostile_status_records_do_not_make_status_lie_hang_or_print_escapes(kafka, capsys):
    tag = uuid.uuid4().hex[:8]
    control, status = f"control-{tag}", f"status-{tag}"
    asyncio.run(ensure_topics(kafka, {control: 1, status: 1}, {control: CONTROL_TOPIC_CONFIGS, status: STATUS_TOPIC_CONFIGS}))
    hostile = draw_specs(status_records(), RECORDS, huge_cap=0)
    honest = f"honest-{tag}"
    asyncio.run(_send(kafka, status, [*hostile, (honest.encode(), _honest(honest))]))
    where = ["--bootstrap-servers", kafka, "--control-topic", control, "--status-topic", status]

    rc, text, seconds = _status_cli(capsys, *where)
    assert rc == 0 and seconds < SECONDS_BOUND, (rc, seconds)
    active = sorted({repr(ch) for ch in text if ch in TERMINAL_ACTIVE and ch not in "\n"})
    assert not active, f"raw terminal control characters in `lorabus status`: {active}"
    honest_rows = [line for line in text.splitlines() if honest in line]
    assert honest_rows and "live" in honest_rows[0] and "not live" not in honest_rows[0], text[-3000:]

    rc, out, seconds = _status_cli(capsys, *where, "--json")
    assert rc == 0 and seconds < SECONDS_BOUND, (rc, seconds)
    fleet = json.loads(out)
    workers = fleet["workers"]
    assert workers[honest]["live"] is True, workers[honest]
    # No hostile record is live for longer than its own broker timestamp allows: none claims the far future.
    now_ms = time.time() * 1000
    for worker in workers.values():
        assert worker.get("ts_ms", now_ms) <= now_ms + 30_000, worker
    # Every key whose last record was hostile is either a worker (its own record decoded) or listed as skipped.
    skipped = {record["key"] for record in fleet["skipped_status_records"]}
    assert skipped, "a batch of hostile records in which nothing was skipped: the draw is vacuous"
    print(f"\n{len(hostile)} hostile status records: {len(workers) - 1} shown as workers, {len(skipped)} keys skipped")
