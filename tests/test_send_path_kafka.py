"""The per-answer send path against a real broker: ResultProducer runs aiokafka's send() in the caller's task
(no task of its own), yet a stopping worker still withdraws a send waiting there for room in its batch, and
a caller's own cancellation still cancels it; a result's too-large stand-in, now built only when a topic
refuses the result, still lands (worker/producer.py, worker/output.py)."""

import asyncio
import time
import uuid

import pytest
from aiokafka import TopicPartition

from helpers import private_broker, read_topic
from lorabus.schemas import decode_result, error_result
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.output import AtLeastOnceOutput, result_record
from lorabus.worker.producer import ResultProducer
from lorabus.worker.topics import ensure_topics

BATCH_BYTES = 1024  # the producer's batch: one record of RECORD_BYTES fills it, the next waits for room
RECORD_BYTES = 800
SENDS = 6  # sent while the broker is away: the first batch or two take one each, the rest wait for room
PROMPT_S = 1.0  # how soon stopping must answer the waiting sends (aiokafka itself would wait 40 s)
TOPIC_LIMIT = 4096  # max.message.bytes of the small-limit topic
SEND_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with private_broker(tmp_path_factory.mktemp("send-path-kafka")) as b:
        yield b


async def make_topic(bootstrap: str, **configs: str) -> str:
    topic = f"s-{uuid.uuid4().hex[:10]}"
    await ensure_topics(bootstrap, {topic: 1}, {topic: configs})
    return topic


@pytest.mark.kafka
async def test_sends_waiting_for_batch_room_are_withdrawn_on_stopping_and_cancellable(broker):
    broker.start()
    topic = await make_topic(broker.bootstrap)
    stopping = asyncio.Event()
    rp = ResultProducer(broker.bootstrap, stopping, max_batch_size=BATCH_BYTES)
    await rp.start()
    try:
        assert await asyncio.wait_for(rp.send(topic, b"before", key=b"k"), SEND_TIMEOUT_S)
        await asyncio.to_thread(broker.stop)
        sends = [asyncio.create_task(rp.send(topic, b"w" * RECORD_BYTES, key=b"k")) for _ in range(SENDS)]
        await asyncio.sleep(1.0)
        assert not any(t.done() for t in sends)
        # Those past the first batch or two wait inside aiokafka's send() (for room), not for an acknowledgement.
        inside = [t for t in sends if t in rp._enqueuing]
        assert len(inside) >= 2
        # The caller's own cancellation reaches the send: it ends cancelled, not as a quiet False.
        inside[0].cancel()
        await asyncio.gather(inside[0], return_exceptions=True)
        assert inside[0].cancelled() and not stopping.is_set()
        rest = [t for t in sends if t is not inside[0]]
        t0 = time.monotonic()
        stopping.set()
        results = await asyncio.wait_for(asyncio.gather(*rest), PROMPT_S * 5)
        took = time.monotonic() - t0
        print(f"\nstopping answered {len(results)} waiting sends ({len(inside) - 1} inside aiokafka's send()) with "
              f"{set(results)} in {took:.2f} s")
        assert results == [False] * len(rest) and took < PROMPT_S
        assert not any(t.cancelled() for t in rest)  # a halt's cancel is not passed on to the caller
        assert not rp._enqueuing
    finally:
        await rp.stop(1.0)
        broker.start()


@pytest.mark.kafka
async def test_result_too_large_for_its_topic_lands_as_its_stand_in(broker):
    broker.start()
    topic = await make_topic(broker.bootstrap, **{"max.message.bytes": str(TOPIC_LIMIT)})
    rp = ResultProducer(broker.bootstrap, asyncio.Event())
    await rp.start()
    try:
        output, offsets = AtLeastOnceOutput(rp, asyncio.Event(), None, {}), PartitionOffsets()
        big = result_record(error_result("job-1", "internal", "x" * (2 * TOPIC_LIMIT), "w1"), topic)
        small = result_record(error_result("job-2", "internal", "fits", "w1"), topic)
        for offset, outgoing in enumerate((big, small)):
            offsets.begin(offset)
            assert await asyncio.wait_for(output.deliver(outgoing, TopicPartition(topic, 0), offset, offsets),
                                          SEND_TIMEOUT_S)
        assert offsets.committable() == 2
    finally:
        await rp.stop()
    got = [decode_result(r.value) for r in await read_topic(broker.bootstrap, topic, 60, to_end=True)]
    assert [r.id for r in got] == ["job-1", "job-2"]
    assert got[0].error.message.startswith("the result is") and "more than its topic accepts" in got[0].error.message
    assert got[1].error.message == "fits"
