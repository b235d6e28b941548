"""LaneShares.freed: the jobs loop, with every lane full, waits for an answered job rather than in a poll of
paused partitions, so a freed seat is taken at once instead of when the poll times out (worker/lanes.py)."""

import asyncio
import time

from lorabus.worker.lanes import LaneShares, LaneTable

LONG_S = 5.0  # a wait the tests must never sit out
TOPIC = "lorabus.jobs"


def full_shares(max_inflight: int = 2) -> LaneShares:
    shares = LaneShares(LaneTable.from_config([], "", "", TOPIC), max_inflight)
    for _ in range(max_inflight):
        shares.took(TOPIC)
    assert shares.room(TOPIC) == 0
    return shares


async def test_an_answer_wakes_the_wait_at_once():
    shares = full_shares()
    asyncio.get_running_loop().call_later(0.05, shares.done, TOPIC, 3)
    started = time.monotonic()
    assert await shares.freed(LONG_S)
    assert time.monotonic() - started < LONG_S / 2
    assert shares.room(TOPIC) == 1


async def test_no_answer_waits_out_the_timeout():
    shares = full_shares()
    started = time.monotonic()
    assert not await shares.freed(0.1)
    assert time.monotonic() - started >= 0.09  # the loop may fire a timer a clock tick early
    assert shares.room(TOPIC) == 0


async def test_an_answer_before_the_wait_does_not_count():
    """What was answered before the loop last looked at the rooms is in them already: only later answers wake."""
    shares = full_shares()
    shares.done(TOPIC)
    shares.took(TOPIC)
    assert not await shares.freed(0.1)
