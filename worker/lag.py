"""Consumer lag of the jobs partitions a worker owns, as `lorabus_consumer_lag` reports it.

A partition's lag is the number of records between the offset the worker would resume from (its
committed offset; before its first commit, the first record it still holds) and the partition's end.
Both come for free from the fetches of a partition the worker reads. A partition it owns but has not
read from has neither: one assigned while backpressure paused fetching, which is when lag matters most
for scaling. Its lag is asked of the broker (the group's committed offset, else where
`auto_offset_reset` starts, and the log end), at most every BROKER_QUERY_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from lorabus.worker.offsets import PartitionOffsets

log = logging.getLogger(__name__)

BROKER_QUERY_S = 5.0  # how often the broker is asked about owned partitions the worker has not read
QUERY_TIMEOUT_S = 2.0


class ConsumerLag:
    def __init__(self, consumer, auto_offset_reset: str, clock: Callable[[], float] = time.monotonic):
        self.consumer, self.auto_offset_reset, self.clock = consumer, auto_offset_reset, clock
        self._asked_at = float("-inf")
        self._unread: dict[TopicPartition, int] = {}  # the broker's last answer per unread partition

    async def lags(self, partitions: dict[TopicPartition, PartitionOffsets]) -> dict[tuple[str, int], int]:
        """(topic, partition) → records behind, for every partition the consumer owns now."""
        lags, unread = {}, []
        assigned = self.consumer.assignment()
        for tp, state in list(partitions.items()):
            if tp not in assigned:
                continue
            end = self.consumer.highwater(tp)
            position = state.committed
            if position is None and state.next_offset is not None:
                position = min(state.pending, default=state.next_offset)
            if end is not None and position is not None:
                lags[(tp.topic, tp.partition)] = max(0, end - position)
            else:
                unread.append(tp)
        self._unread = {tp: lag for tp, lag in self._unread.items() if tp in unread}
        if unread and self.clock() - self._asked_at >= BROKER_QUERY_S:
            self._asked_at = self.clock()
            try:
                self._unread.update(await asyncio.wait_for(self._ask_broker(unread), QUERY_TIMEOUT_S))
            except (KafkaError, OSError, TimeoutError) as exc:  # the next query retries; the health page tells
                log.debug("lag of unread partitions not known: %s: %s", type(exc).__name__, exc)
        for tp in unread:
            if tp in self._unread:
                lags[(tp.topic, tp.partition)] = self._unread[tp]
        return lags

    async def _ask_broker(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        ends = await self.consumer.end_offsets(partitions)
        starts = None
        lags = {}
        for tp in partitions:
            resume = await self.consumer.committed(tp)
            if resume is None:  # the group never committed here: the consumer starts where the reset policy says
                if self.auto_offset_reset == "latest":
                    resume = ends[tp]
                else:
                    starts = starts or await self.consumer.beginning_offsets(partitions)
                    resume = starts[tp]
            lags[tp] = max(0, ends[tp] - resume)
        return lags
