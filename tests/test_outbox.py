"""Which answers the exactly-once outbox writes in a transaction: only those its offset commit covers.
(The broker side, kill -9 with read_committed readers, is tests/test_crash_kafka.py.)"""

import asyncio
import contextlib

from aiokafka import TopicPartition

from lorabus.worker.offsets import PartitionOffsets
from lorabus.worker.output import Outgoing, TransactionalOutbox

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

    def deliver(offset):
        outgoing = Outgoing("results", f"r{offset}".encode(), f"k{offset}".encode(), [])
        return asyncio.create_task(outbox.deliver(outgoing, TP, offset, offsets))

    late = [deliver(1), deliver(3)]  # offsets 0 and 2 still running
    await asyncio.sleep(0)
    await outbox.commit()
    assert producer.transactions == []  # 1 and 3 lie past the running 0: nothing may go out yet
    first = deliver(0)
    await asyncio.sleep(0)
    await outbox.commit()
    assert [(sorted(t["values"]), t["offsets"]) for t in producer.transactions] == [([b"r0", b"r1"], {TP: 2})]  # 3 waits
    assert await first and await late[0] and not late[1].done()
    second = deliver(2)
    await asyncio.sleep(0)
    await outbox.commit()
    assert (sorted(producer.transactions[-1]["values"]), producer.transactions[-1]["offsets"]) == ([b"r2", b"r3"], {TP: 4})
    assert await second and await late[1]
    assert offsets.committed == 4 and not offsets.pending
