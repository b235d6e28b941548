"""Consumer lag per owned partition: from the worker's own fetches, and from the broker for a partition it
owns but has not read (assigned while backpressure paused fetching). A stand-in consumer answers the
few calls ConsumerLag makes for the policy; the last test asks a real broker."""

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from lorabus.worker.lag import BROKER_QUERY_S, ConsumerLag
from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.topics import ensure_topics
from helpers import unique

READ, UNREAD, NEVER_COMMITTED, REVOKED = (TopicPartition("jobs", p) for p in range(4))


class StandInConsumer:
    def __init__(self):
        self.owned = {READ, UNREAD, NEVER_COMMITTED}
        self.ends = {READ: 50, UNREAD: 120, NEVER_COMMITTED: 30, REVOKED: 9}
        self.commits = {UNREAD: 100, NEVER_COMMITTED: None}
        self.starts = {UNREAD: 0, NEVER_COMMITTED: 10}
        self.queries = 0

    def assignment(self):
        return set(self.owned)

    def highwater(self, tp):
        return self.ends[tp] if tp in (READ, REVOKED) else None  # fetched from READ only

    async def end_offsets(self, tps):
        self.queries += 1
        return {tp: self.ends[tp] for tp in tps}

    async def committed(self, tp):
        return self.commits[tp]

    async def beginning_offsets(self, tps):
        return {tp: self.starts[tp] for tp in tps}


def _partitions():
    read = PartitionOffsets()
    for offset in range(40, 45):
        read.begin(offset)
    read.done(40)  # 41 is the first record still held
    return {READ: read, UNREAD: PartitionOffsets(), NEVER_COMMITTED: PartitionOffsets(), REVOKED: PartitionOffsets()}


async def test_read_partitions_from_fetches_unread_ones_from_the_broker():
    clock = [0.0]
    consumer = StandInConsumer()
    lag = ConsumerLag(consumer, "earliest", clock=lambda: clock[0])
    partitions = _partitions()
    assert await lag.lags(partitions) == {("jobs", 0): 50 - 41, ("jobs", 1): 120 - 100, ("jobs", 2): 30 - 10}
    consumer.ends[UNREAD] = 150
    clock[0] += BROKER_QUERY_S / 2
    assert (await lag.lags(partitions))[("jobs", 1)] == 20  # the broker is not asked again this soon
    clock[0] += BROKER_QUERY_S
    assert (await lag.lags(partitions))[("jobs", 1)] == 50 and consumer.queries == 2
    consumer.owned.discard(UNREAD)  # revoked: no series, whatever was known
    assert ("jobs", 1) not in await lag.lags(partitions)


async def test_a_never_committed_partition_starts_where_the_reset_policy_says():
    consumer = StandInConsumer()
    lags = await ConsumerLag(consumer, "latest").lags(_partitions())
    assert lags[("jobs", 2)] == 0 and lags[("jobs", 1)] == 20


@pytest.mark.kafka
async def test_unread_partitions_ask_the_real_broker(kafka):
    """The broker path end to end: the group's committed offset where there is one, the log start where
    there is none (earliest), to the log end."""
    topic, group = unique("lag"), unique("lag-g")
    await ensure_topics(kafka, {topic: 2})
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        for partition, count in ((0, 5), (1, 3)):
            for i in range(count):
                await producer.send_and_wait(topic, b"x", partition=partition)
    finally:
        await producer.stop()
    committed, unread = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([committed, unread])
        await consumer.commit({committed: 2})
        lags = await ConsumerLag(consumer, "earliest").lags({committed: PartitionOffsets(), unread: PartitionOffsets()})
    finally:
        await consumer.stop()
    assert lags == {(topic, 0): 5 - 2, (topic, 1): 3}
