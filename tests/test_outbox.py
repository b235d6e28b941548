"""Which answers the exactly-once outbox writes in a transaction: only those its offset commit covers.
(The broker side, kill -9 with read_committed readers, is tests/test_crash_kafka.py.)"""

import contextlib

from aiokafka import TopicPartition

from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.output import Outgoing, TransactionalOutbox, queued_size

TP = TopicPartition("jobs", 0)


class RecordingProducer:
    """Stands in for the transactional producer: records what each transaction sent and committed."""

    def __init__(self):
        self.transactions: list[dict] = []

    @contextlib.asynccontextmanager
    async def transaction(self):
        self.transactions.append({"values": [], "offsets": None})
        yield

    async def send(self, topic, value, key=None, headers=None):
        self.transactions[-1]["values"].append(value)

    async def send_offsets_to_transaction(self, offsets, group_id):
        self.transactions[-1]["offsets"] = dict(offsets)


async def test_an_answer_past_a_running_record_waits_for_it():
    outbox = TransactionalOutbox("unused:9092", "txn", "group")
    outbox.producer = producer = RecordingProducer()
    offsets = PartitionOffsets()
    for offset in range(4):
        offsets.begin(offset)

    async def deliver(offset):
        outgoing = Outgoing("results", f"r{offset}".encode(), f"k{offset}".encode(), [])
        assert await outbox.deliver(outgoing, TP, offset, offsets)  # handed over at once: its seat is free

    await deliver(1)
    await deliver(3)  # offsets 0 and 2 still running
    await outbox.commit()
    assert producer.transactions == []  # 1 and 3 lie past the running 0: nothing may go out yet
    assert offsets.pending == {0, 1, 2, 3}  # handed over is not committed: no offset may commit past them
    await deliver(0)
    await outbox.commit()
    assert [(sorted(t["values"]), t["offsets"]) for t in producer.transactions] == [([b"r0", b"r1"], {TP: 2})]  # 3 waits
    assert offsets.pending == {2, 3}
    await deliver(2)
    await outbox.commit()
    assert (sorted(producer.transactions[-1]["values"]), producer.transactions[-1]["offsets"]) == ([b"r2", b"r3"], {TP: 4})
    assert offsets.committed == 4 and not offsets.pending and outbox.queued_bytes == 0


async def test_a_full_outbox_still_takes_the_answer_that_closes_a_gap():
    answer_bytes = queued_size(Outgoing("results", b"r", b"k", []))
    outbox = TransactionalOutbox("unused:9092", "txn", "group", max_queued_bytes=3 * answer_bytes)
    outbox.producer = producer = RecordingProducer()
    offsets = PartitionOffsets()
    for offset in range(5):
        offsets.begin(offset)
    for offset in (1, 2, 3):
        assert await outbox.deliver(Outgoing("results", b"r", b"k", []), TP, offset, offsets)
    assert outbox.full  # the worker pauses fetching now
    assert await outbox.deliver(Outgoing("results", b"r", b"k", []), TP, 0, offsets)  # never refused, never waits
    await outbox.commit()
    assert producer.transactions[-1]["offsets"] == {TP: 4} and not outbox.full and offsets.pending == {4}
