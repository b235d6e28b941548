"""At-least-once offset tracking: which offset of a partition may be committed.

An offset is committable only when every record before it has been answered (its result or dead
letter acknowledged by the broker). Records finish out of order, so each partition keeps the set
of offsets still in flight and commits up to the lowest one.
"""

from __future__ import annotations


class PartitionOffsets:
    def __init__(self):
        self.pending: set[int] = set()
        self.next_offset: int | None = None  # one past the highest offset taken
        self.committed: int | None = None
        self.revoked = False  # the partition moved to another consumer

    def begin(self, offset: int) -> None:
        self.pending.add(offset)
        self.next_offset = max(self.next_offset or 0, offset + 1)

    def done(self, offset: int) -> None:
        self.pending.discard(offset)

    def committable(self, answered: set[int] = frozenset()) -> int | None:
        """The offset to commit now (Kafka's "next record to read"), or None if nothing new.

        `answered`: offsets to count as done although they are still pending (exactly-once mode commits
        them in the same transaction as their results)."""
        if self.next_offset is None:
            return None
        pending = self.pending - answered if answered else self.pending
        offset = min(pending) if pending else self.next_offset
        return offset if offset != self.committed else None
