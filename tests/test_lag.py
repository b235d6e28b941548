"""Consumer lag per owned partition: from the worker's own fetches, and from the broker for a partition it
owns but has not read (assigned while backpressure paused fetching). The broker side runs in
tests/test_health_kafka.py; here a stand-in consumer answers the few calls ConsumerLag makes."""

from aiokafka import TopicPartition

from lorabus.worker.lag import BROKER_QUERY_S, ConsumerLag
from lorabus.worker.offsets import PartitionOffsets

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
