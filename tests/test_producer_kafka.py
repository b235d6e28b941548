"""worker/producer.py against a real Kafka 4.4 broker that these tests start, stop and restart
themselves (own data dir and port; the shared session broker is never touched).

The outage test injects short intervals into the producer and the aiokafka log filter (a 1 s log window,
1 s stall warning, where production has 10 s and 5 s), so a 3 s outage spans several windows and stalls
deliveries; its assertions are stated per window. LORABUS_OUTAGE_S sets the outage's length:
`LORABUS_OUTAGE_S=60 python -m pytest -s tests/test_producer_kafka.py -k outage` reproduces the 60 s
outage that was measured in production.
"""

import asyncio
import collections
import logging
import os
import re
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka import errors as E
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from lorabus.worker import producer as wp
from lorabus.worker.logs import AIOKAFKA_LOGGERS, RATE_LIMIT_INTERVAL_S, limit_aiokafka_logs
from helpers import private_broker, read_topic
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.output import (DEAD_LETTER_KEY_BYTES, DEAD_LETTER_VALUE_BYTES, ORIGINAL_SIZE_HEADER,
                                   TRUNCATED_HEADER, AtLeastOnceOutput, Outgoing, truncated_copy)
from lorabus.worker.producer import PermanentSendError, ResultProducer

LOG_WINDOW_S = 1.0      # injected: one warning per kind of trouble per window (production: LOG_EVERY_S)
STALL_S = 1.0           # injected: a delivery unacknowledged this long is a stall (production: STALL_WARN_S)
OUTAGE_S = float(os.environ.get("LORABUS_OUTAGE_S", 3 * LOG_WINDOW_S))
SEND_RATE = 20          # sends started per second, before, during and after the outage
STEADY_SENDS = 10       # acknowledged before the outage, and again after the recovery
STOP_S = 1.0            # injected: stop()'s flush timeout with the broker down (production: STOP_TIMEOUT_S)
VALUE_BYTES = 1000      # ~ a result with a few hundred token ids
BIG = 2 * 1024 * 1024   # over the broker's default max.message.bytes (1 MiB)
# Warning/error lines allowed per LOG_WINDOW_S window of the outage: each kind of trouble (ours:
# stalled, connection error, recreate; aiokafka's: connect, metadata, produce response, ...) may
# speak once per window. Without the limits aiokafka alone wrote ~40 lines/s, and ~8,000/s while
# its sender spun on an unknown leader.
LINES_PER_WINDOW = 10
# aiokafka's attempts per second while the broker is down, counting the lines the limiter held
# back: its sender refreshed metadata ~8,000 times a second before worker/producer.py spaced them.
AIOKAFKA_ATTEMPTS_PER_S = 20
# A send that should succeed at once but takes longer fails the test instead of hanging it.
SEND_TIMEOUT_S = 30
SUPPRESSED = re.compile(r"\[(\d+) similar lines suppressed")



@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with private_broker(tmp_path_factory.mktemp("producer-kafka"), check_stop=True) as b:
        yield b


@pytest.fixture
def up(broker):
    """The broker, running (a test that stopped it left it stopped only if it failed midway)."""
    broker.start()   # reports the running broker, or restarts it on the same port and data
    return broker


async def make_topic(bootstrap, partitions=3) -> str:
    topic = f"p-{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


async def read_all(bootstrap, topic):
    """Every record of the topic, to its end (fetches large enough for the 2 MiB records)."""
    return await read_topic(bootstrap, topic, 60, to_end=True, fetch_max_bytes=8 << 20,
                            max_partition_fetch_bytes=8 << 20)


async def until(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        await asyncio.sleep(0.05)


async def within(aw, seconds=SEND_TIMEOUT_S):
    return await asyncio.wait_for(aw, seconds)


def warnings_between(caplog, t0: float, t1: float):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and t0 <= r.created <= t1]


# ---- (1) an outage under load: every send lands, logs stay quiet -----------------------------------

@pytest.mark.kafka
async def test_outage_every_send_acknowledged(up, caplog, monkeypatch):
    # The log filter is process-wide and reports what it held back on the next line it lets through:
    # a fresh limiter keeps earlier tests' suppressed counts out of this test's figures.
    limit_aiokafka_logs(LOG_WINDOW_S)
    topic = await make_topic(up.bootstrap)
    stopping = asyncio.Event()
    rp = ResultProducer(up.bootstrap, stopping, log_every_s=LOG_WINDOW_S, stall_warn_s=STALL_S)
    await rp.start()
    sent, tasks, started_at, acked_at = [], [], {}, {}
    generating = True

    def acked_since(t: float) -> int:
        return sum(started_at[i] >= t for i in list(acked_at))

    async def one(i):
        value = f"v{i:06d}-".encode().ljust(VALUE_BYTES, b"x")
        sent.append(value)
        started_at[i] = time.monotonic()
        ok = await rp.send(topic, value, key=f"j-{i}".encode())
        acked_at[i] = time.monotonic()
        return ok

    async def generate():
        i = 0
        while generating:
            tasks.append(asyncio.create_task(one(i)))
            i += 1
            await asyncio.sleep(1 / SEND_RATE)

    try:
        gen = asyncio.create_task(generate())
        await until(lambda: len(acked_at) >= STEADY_SENDS, SEND_TIMEOUT_S)
        wall0 = time.time()
        stop_s = await asyncio.to_thread(up.stop)
        in_flight_at_stop = sum(not t.done() for t in tasks)
        await asyncio.sleep(OUTAGE_S)
        outage_sends = len(tasks)
        outage_tasks = list(tasks)
        restart_at = time.monotonic()
        restart_s = await asyncio.to_thread(up.start)
        back_at = time.monotonic()
        await asyncio.wait(outage_tasks, timeout=120)
        recovered_at = time.monotonic()
        await until(lambda: acked_since(recovered_at) >= STEADY_SENDS, SEND_TIMEOUT_S)
        generating = False
        await gen
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        done_at = time.monotonic()
        wall1 = time.time()
    finally:
        stopping.set()
        await rp.stop()
        limit_aiokafka_logs(RATE_LIMIT_INTERVAL_S)  # the production window again, for whatever runs next

    assert all(results), f"{results.count(False)} sends returned False"
    records = await read_all(up.bootstrap, topic)
    counts = collections.Counter(r.value for r in records)
    missing = [v[:8] for v in sent if counts[v] == 0]
    dups = {v[:8].decode(): n for v, n in counts.items() if n > 1}
    lines = warnings_between(caplog, wall0, wall1)
    by_kind = collections.Counter((r.name, r.levelname, str(r.msg)[:50]) for r in lines)
    aiokafka_lines = [r for r in lines if r.name.startswith("aiokafka")]
    attempts = len(aiokafka_lines) + sum(int(m.group(1)) for r in aiokafka_lines
                                         for m in [SUPPRESSED.search(r.getMessage())] if m)
    print(f"\noutage {OUTAGE_S:g} s (broker stop took {stop_s:.1f} s, restart {restart_s:.1f} s); "
          f"{len(sent)} sends, {in_flight_at_stop} in flight at stop, {outage_sends} started before restart; "
          f"all True; read {len(records)} records, {len(missing)} missing, {len(dups)} duplicated {dups}; "
          f"sends_retried={rp.sends_retried} retries={rp.retries} stalls={rp.stalls} recreations={rp.recreations}; "
          f"every send started before the restart acknowledged {recovered_at - restart_at:.1f} s after the restart "
          f"began, {recovered_at - back_at:.1f} s after local-kafka reported it ready; "
          f"{len(lines)} WARNING+ lines in {wall1 - wall0:.0f} s, standing for {attempts} aiokafka failures:")
    for kind, n in by_kind.most_common():
        print(f"  {n:4d}  {kind}")
    for r in lines:
        if r.name == wp.__name__ and ("recovered" in str(r.msg) or "replacing" in str(r.msg)):
            print("  >", r.getMessage())
    assert not missing, missing
    assert in_flight_at_stop > 0 and outage_sends - in_flight_at_stop > OUTAGE_S * SEND_RATE / 2
    windows = (wall1 - wall0) / LOG_WINDOW_S + 1
    assert len(lines) <= LINES_PER_WINDOW * windows, by_kind
    # no line per failed send: even the noisiest kind speaks about once per window
    assert max(by_kind.values()) <= windows + 1, by_kind
    assert any("recovered" in str(r.msg) for r in lines)
    assert attempts <= AIOKAFKA_ATTEMPTS_PER_S * (wall1 - wall0)
    assert rp.stalls > 0 and recovered_at - back_at < 30 and done_at - back_at < 60


# ---- (2) stopping during an outage -------------------------------------------------------------------

@pytest.mark.kafka
async def test_stopping_during_outage_returns_false_promptly(up):
    topic = await make_topic(up.bootstrap)
    stopping = asyncio.Event()
    rp = ResultProducer(up.bootstrap, stopping)
    await rp.start()
    try:
        assert await rp.send(topic, b"before", key=b"k")
        await asyncio.to_thread(up.stop)
        pending = [asyncio.create_task(rp.send(topic, b"during-%d" % i, key=b"k%d" % i)) for i in range(20)]
        await asyncio.sleep(2)
        assert not any(t.done() for t in pending)    # nothing can be acknowledged now
        t0 = time.monotonic()
        stopping.set()
        results = await asyncio.wait_for(asyncio.gather(*pending), timeout=10)
        took = time.monotonic() - t0
        late = await rp.send(topic, b"after-stopping")
        print(f"\nstopping set during the outage: {len(results)} sends returned {set(results)} in {took:.2f} s")
        assert results == [False] * len(pending) and late is False
        assert took < 1.0
        t0 = time.monotonic()
    finally:
        await rp.stop(STOP_S)   # broker still down: must not hang on the unsent records
    stop_took = time.monotonic() - t0
    print(f"stop({STOP_S:g}) with the broker down took {stop_took:.1f} s")
    assert stop_took < STOP_S * 2 + 5
    with pytest.raises(RuntimeError):
        await rp.send(topic, b"closed")


# ---- (3) records too large for the broker ------------------------------------------------------------

@pytest.mark.kafka
@pytest.mark.parametrize("where", ["client", "broker"])
async def test_too_large_is_permanent_and_truncated_copy_lands(up, where):
    topic = await make_topic(up.bootstrap, partitions=1)
    # "client": aiokafka's max_request_size (1 MiB) refuses it before sending; "broker": the
    # client lets 4 MiB through and the broker's max.message.bytes (1 MiB) refuses it.
    options = {"max_request_size": 4 << 20} if where == "broker" else {}
    rp = ResultProducer(up.bootstrap, asyncio.Event(), **options)
    await rp.start()
    big = b"B" * BIG
    headers = [("x-dlq-code", b"internal"), ("huge", b"h" * 100_000), ("x-dlq-offset", b"7")]
    try:
        with pytest.raises(PermanentSendError) as info:
            await within(rp.send(topic, big, key=b"big", headers=headers))
        assert info.value.too_large and isinstance(info.value.cause, E.MessageSizeTooLargeError)
        assert rp.permanent_errors == 1
        t0 = time.monotonic()
        output, offsets = AtLeastOnceOutput(rp, asyncio.Event(), None, {}), PartitionOffsets()
        copy = truncated_copy(big, b"big", headers)
        letter = Outgoing(topic, big, b"big", headers, dead_letter=True,
                          if_too_large=Outgoing(topic, copy.value, copy.key, copy.headers, dead_letter=True))
        offsets.begin(7)
        assert await within(output.deliver(letter, TopicPartition(topic, 0), 7, offsets))
        assert await within(rp.send(topic, b"next", key=b"n"))   # same partition: still usable
        took = time.monotonic() - t0
        print(f"\n{where}-side refusal: {info.value}; truncated copy and next send acknowledged in {took:.2f} s, "
              f"recreations={rp.recreations}")
        assert output.truncated == 1 and offsets.committable() == 8
        # Each refusal by the broker (the send, then the full dead letter) leaves a sequence gap:
        # the producer is replaced each time. A refusal by the client leaves none.
        assert rp.recreations == (2 if where == "broker" else 0)
    finally:
        await rp.stop()
    records = await read_all(up.bootstrap, topic)
    assert [r.value for r in records] == [big[:DEAD_LETTER_VALUE_BYTES], b"next"]
    got = dict(records[0].headers)
    assert got[TRUNCATED_HEADER] == b"value,headers" and got[ORIGINAL_SIZE_HEADER] == str(BIG).encode()
    assert got["x-dlq-code"] == b"internal" and got["x-dlq-offset"] == b"7" and "huge" not in got


# ---- (4) a broken idempotent producer is replaced --------------------------------------------------

@pytest.mark.kafka
async def test_broken_producer_is_recreated(up):
    """The real broken state: the broker refuses a batch (too large) after aiokafka numbered it;
    every later batch on that partition gets OutOfOrderSequenceNumber (the same gap a batch
    expired after an outage leaves). Raw aiokafka stays broken,
    ResultProducer replaces its producer and delivers."""
    topic = await make_topic(up.bootstrap, partitions=1)
    raw = AIOKafkaProducer(bootstrap_servers=up.bootstrap, enable_idempotence=True, max_request_size=4 << 20)
    await raw.start()
    try:
        # The broker keeps sequence state only once it has written something for this producer.
        await raw.send_and_wait(topic, b"raw-first")
        with pytest.raises(E.MessageSizeTooLargeError):
            await raw.send_and_wait(topic, b"B" * BIG)
        raw_errors = []
        for i in range(3):
            with pytest.raises(E.OutOfOrderSequenceNumber):
                await raw.send_and_wait(topic, b"raw-%d" % i)
            raw_errors.append("OutOfOrderSequenceNumber")
    finally:
        await raw.stop()

    rp = ResultProducer(up.bootstrap, asyncio.Event(), max_request_size=4 << 20)
    await rp.start()
    try:
        assert await within(rp.send(topic, b"first"))
        with pytest.raises(PermanentSendError):
            await within(rp.send(topic, b"B" * BIG))
        results = await within(asyncio.gather(*(rp.send(topic, b"ok-%d" % i) for i in range(30))))
    finally:
        await rp.stop()
    print(f"\nraw aiokafka after the refusal: {raw_errors}; ResultProducer: {results.count(True)}/30 acknowledged, "
          f"recreations={rp.recreations}, sends_retried={rp.sends_retried}")
    # Replaced as soon as the refused delivery left the gap, so no later send even saw the error.
    assert all(results) and rp.recreations == 1 and rp.sends_retried == 0
    values = collections.Counter(r.value for r in await read_all(up.bootstrap, topic))
    assert all(values[b"ok-%d" % i] >= 1 for i in range(30))


class _FailOnce(AIOKafkaProducer):
    """A fake, for the recreate path only: a real producer whose first send fails the way a broken
    idempotent producer does (these errors cannot be provoked at will against one broker). The
    first `failing` producers made fail so; the later ones are plain."""

    made: list = []
    error: type = E.UnknownProducerId
    in_delivery = True
    failing = 1

    def __init__(self, **kw):
        super().__init__(**kw)
        self.fails = len(_FailOnce.made) < _FailOnce.failing
        _FailOnce.made.append(self)

    async def send(self, *args, **kw):
        if self.fails:
            self.fails = False
            if not self.in_delivery:
                raise self.error()
            fut = asyncio.get_running_loop().create_future()
            fut.set_exception(self.error())
            return fut
        return await super().send(*args, **kw)


@pytest.mark.kafka
@pytest.mark.parametrize("error,in_delivery", [(E.UnknownProducerId, True), (E.InvalidProducerEpoch, False),
                                               (E.OutOfOrderSequenceNumber, True), (E.UnknownError, True)])
async def test_recreate_path_with_fake_failure(up, error, in_delivery):
    topic = await make_topic(up.bootstrap, partitions=1)
    _FailOnce.made, _FailOnce.error, _FailOnce.in_delivery, _FailOnce.failing = [], error, in_delivery, 1
    rp = ResultProducer(up.bootstrap, asyncio.Event(), producer_factory=_FailOnce)
    await rp.start()
    try:
        assert await within(rp.send(topic, b"first", key=b"a"))
        assert await within(rp.send(topic, b"second", key=b"b"))
    finally:
        await rp.stop()
    assert rp.recreations == 1 and len(_FailOnce.made) == 2 and _FailOnce.made[0]._closed
    assert rp.sends_retried == 1
    assert [r.value for r in await read_all(up.bootstrap, topic)] == [b"first", b"second"]


@pytest.mark.kafka
async def test_unknown_error_on_a_fresh_producer_too_is_permanent(up):
    """A fake as above: an error of no known kind gets one fresh producer; failing the same way
    there, it is the record's (no endless recreations)."""
    topic = await make_topic(up.bootstrap, partitions=1)
    _FailOnce.made, _FailOnce.error, _FailOnce.in_delivery, _FailOnce.failing = [], E.UnknownError, True, 2
    rp = ResultProducer(up.bootstrap, asyncio.Event(), producer_factory=_FailOnce)
    await rp.start()
    try:
        with pytest.raises(PermanentSendError) as info:
            await within(rp.send(topic, b"poison"))
        assert await within(rp.send(topic, b"fine"))
    finally:
        await rp.stop()
    assert isinstance(info.value.cause, E.UnknownError) and not info.value.too_large
    assert rp.recreations == 2 and rp.permanent_errors == 1   # the second failure's gap: replaced again
    assert [r.value for r in await read_all(up.bootstrap, topic)] == [b"fine"]


# ---- topics that cannot take the record ------------------------------------------------------------

@pytest.mark.kafka
async def test_missing_or_invalid_topic_is_permanent_quickly(up):
    rp = ResultProducer(up.bootstrap, asyncio.Event())
    await rp.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(PermanentSendError) as missing:
            await within(rp.send(f"missing-{uuid.uuid4().hex[:8]}", b"v"))
        took = time.monotonic() - t0
        with pytest.raises(PermanentSendError) as invalid:
            await within(rp.send("no spaces allowed", b"v"))
        assert not await rp.topic_exists(f"missing-{uuid.uuid4().hex[:8]}")
        assert await rp.topic_exists(await make_topic(up.bootstrap))
    finally:
        await rp.stop()
    print(f"\nmissing topic refused in {took:.2f} s: {missing.value}; invalid: {invalid.value}")
    assert isinstance(missing.value.cause, E.UnknownTopicOrPartitionError) and took < 5
    assert isinstance(invalid.value.cause, E.InvalidTopicError) and not missing.value.too_large


# ---- no broker needed --------------------------------------------------------------------------------

def test_truncated_copy_rules():
    small = truncated_copy(b"v" * 10, b"k", [("a", b"1")])
    assert small.value == b"v" * 10 and small.key == b"k"
    assert small.headers == [("a", b"1"), (TRUNCATED_HEADER, b""), (ORIGINAL_SIZE_HEADER, b"10")]
    big = truncated_copy(b"v" * 100, b"k" * 5000, [("x", b"y" * 20_000), ("z", b"1")], limit=40)
    assert big.value == b"v" * 40 and len(big.key) == DEAD_LETTER_KEY_BYTES
    assert dict(big.headers) == {"z": b"1", TRUNCATED_HEADER: b"value,key,headers", ORIGINAL_SIZE_HEADER: b"100"}
    assert truncated_copy(None).headers[-1] == (ORIGINAL_SIZE_HEADER, b"0")


def test_aiokafka_log_lines_are_rate_limited(caplog):
    """What a started producer installs: one shared limit on each of aiokafka's loggers, idempotent."""
    limit = limit_aiokafka_logs(10.0)
    assert limit_aiokafka_logs() is limit  # a producer starting later keeps it
    assert all(logging.getLogger(name).filters.count(limit) == 1 for name in AIOKAFKA_LOGGERS)
    noisy = logging.getLogger("aiokafka")
    caplog.set_level(logging.INFO, logger="aiokafka")  # whatever level an earlier test (e.g. the CLI's main) left
    for i in range(500):
        noisy.error("Unable connect to node with id %s: %s", 1, f"refused {i}")
        logging.getLogger("aiokafka.producer.sender").warning("Got error produce response: %s", i)
    noisy.info("not limited %s", 1)
    noisy.info("not limited %s", 2)
    lines = [r for r in caplog.records if r.name.startswith("aiokafka")]
    assert [r.levelname for r in lines] == ["ERROR", "WARNING", "INFO", "INFO"]
