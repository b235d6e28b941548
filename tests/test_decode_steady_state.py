"""Decode steady state: a step of the same sequences as the last, each one token further, reuses the last
step's host work, and gives exactly what building it anew gives.

- Seats (scheduler/seat_kv.py): the shifted plan equals a full layout of the same step, field by field, and
  attention over it stays exact (float64 reference, `Script` of test_seat_attention), through steady runs,
  capacity growth, reordered and partial batches, prefill chunks and leaving sequences (which all fall back
  to a full layout).
- LoRA (scheduler/runner.py): the last step's mapping is reused for the same token slots, and rebuilt once
  a slot is written: a reused mapping would keep the old adapter's rank in its cached plans.
"""

import numpy as np
import torch

from lorabus import kernels
from lorabus.scheduler import Engine, EngineConfig
from lorabus.scheduler.adapters import AdapterWeights
from lorabus.scheduler.seat_kv import SeatKV, SeatStep
from test_seat_attention import Script

FIELDS = ("write_index", "write_rows", "lo", "hi", "context", "q_rows", "mask", "keep", "out_rows", "in_order")


def _same(got: SeatStep, want: SeatStep) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        if isinstance(b, torch.Tensor):
            assert isinstance(a, torch.Tensor) and torch.equal(a, b), name
        else:
            assert a == b, name


def test_shifted_seat_plans_equal_full_layouts():
    s = Script()
    seats = s.attention.seats
    twin = SeatKV(s.kv)  # the same bookkeeping, laid out in full every step
    shifted = []
    real_plan = seats.plan

    def checked(batch, device):
        last = seats._last
        twin._last = None
        want = twin.plan(batch, device)
        got = real_plan(batch, device)
        _same(got, want)
        shifted.append(last is not None and got.q_rows is last[2].q_rows)
        return got

    seats.plan = checked
    a, b, c = s.sequence("a", 60), s.sequence("b", 60), s.sequence("c", 60)
    s.step([(a, 5), (b, 3), (c, 7)])  # prefill chunks: laid out
    s.step([(a, 1), (b, 1), (c, 1)])  # the first decode step: laid out
    for _ in range(3):
        s.step([(a, 1), (b, 1), (c, 1)])  # steady: shifted
    assert shifted == [False, False, True, True, True]
    s.step([(b, 1), (a, 1), (c, 1)])  # another order: laid out, then shifted
    s.step([(b, 1), (a, 1), (c, 1)])
    s.step([(b, 1), (a, 1)])  # c waits: laid out; c back: laid out
    s.step([(b, 1), (a, 1), (c, 1)])
    s.step([(b, 1), (a, 4), (c, 1)])  # a prefill chunk among decode rows: laid out
    assert shifted[5:] == [False, True, False, False, False]
    capacity = seats.capacity
    while c.num_computed < capacity + 2:  # past the capacity: the rows grow once, laid out then
        s.step([(b, 1), (a, 1), (c, 1)])
    assert seats.capacity > capacity and shifted[-1] and shifted.count(False) == 8  # after the chunk, and at the growth
    s.finish(a)  # a leaves, c moves into its seat: laid out
    s.step([(b, 1), (c, 1)])
    s.step([(b, 1), (c, 1)])
    assert shifted[-2:] == [False, True]


def _weights(pool, rank: int, seed: int) -> AdapterWeights:
    """An adapter of `rank` on layer 0's q/k/v (non-zero B)."""
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for proj in pool.groups["qkv"]:
        group, i = pool._group_of[proj]
        d_in = pool._a_slot_major[0][group].shape[-1]
        d_out = pool.b[0][group][i].shape[1]
        modules[(0, proj)] = (torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen), 0.5)
    return AdapterWeights(f"r{rank}", modules)


def test_lora_mapping_is_reused_until_a_slot_is_written(tiny_model):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=4, max_lora_rank=16, max_loras=4,
                                                  attention_backend="seats", plan_tuning="off"))
    # "off": the fixed default plan, a padded grid at the batch's largest rank (the one a stale mapping keeps)
    runner, pool = engine.runner, engine.model.pool
    pool.write(0, _weights(pool, 4, seed=1))
    pool.write(1, _weights(pool, 4, seed=2))
    slots = np.array([0, 1, 0, -1, 1, 0])

    def mapping():
        return runner._lora_mapping(slots.copy(), torch.from_numpy(slots.copy()))

    def apply(m) -> torch.Tensor:
        x = torch.randn(len(slots), pool._a_slot_major[0]["qkv"].shape[-1], generator=torch.Generator().manual_seed(0))
        y = torch.zeros(len(slots), sum(b.shape[1] for b in pool.b[0]["qkv"]))
        pool.apply(0, "qkv", x, y, m)
        return y

    first = mapping()
    apply(first)  # its plans, at rank 4, are cached on it
    assert mapping() is first  # the same token slots, no slot written: reused
    slots[3] = 1
    assert mapping() is not first  # other token slots: built anew
    slots[3] = -1
    first = mapping()
    apply(first)
    pool.write(0, _weights(pool, 16, seed=3))  # slot 0 now holds a rank-16 adapter
    rebuilt = mapping()
    assert rebuilt is not first
    want = apply(kernels.make_lora_mapping(torch.from_numpy(slots), runner.num_slots))
    torch.testing.assert_close(apply(rebuilt), want, rtol=0, atol=0)
    assert not torch.allclose(apply(first), want)  # the stale mapping runs slot 0 at rank 4
