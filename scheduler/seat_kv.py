"""Each running sequence's K/V in one contiguous row (its seat), so CPU decode attention reads them in place.

The paged cache (scheduler/kv_cache.py) stays the source of truth: prefix sharing, forks and the in-place
Triton kernel read it. The seat backend (scheduler/model.py `SeatAttention`) also writes every new token's
K/V into its sequence's row of a [layers, seats, Hkv, capacity, D] buffer (one for K, one for V), so a
decode step reads every seated sequence's context as one strided view `k[layer, lo:hi, :, :C]` and runs one
masked SDPA over it: no per-step copy of the context, which the block gather makes once per layer.

Seats stay compact: a finished sequence's row is filled by moving the last seat's row into it (one row
copy), so the decode rows read seats [lo, hi) of a contiguous range. A sequence that arrives with context
it did not write here (an n-sample choice forked from its parent, a prefix read from a prefix cache, a
sequence that had no seat before) copies its cached positions in once. Rows are zero past what their
sequence wrote (new rows are zero, a vacated row is zeroed): masked-out keys are then 0, never a stale NaN
that 0 x NaN would spread.

A decode step of the same sequences as the last step, in the same order, each one token further, reuses
the last step's layout shifted by one position (`_shift`): the steady state of decoding costs no layout.

Memory: seats x capacity never exceeds the paged cache's slots (`max_positions`), so the mirror holds at
most as much as the paged cache (twice that while a resize copies). Capacity and seats grow by doubling
within that bound; a sequence that does not fit has no seat and is read through the block gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lorabus.scheduler.kv_cache import PagedKVCache
from lorabus.scheduler.requests import Sequence, State


@dataclass
class SeatStep:
    """A step's work on the seats: where seated rows' K/V go, and the decode read over seats [lo, hi).

    Seat lo + i reads the query of step row `q_rows[i]` over its first `mask[i]` keys of `context` (a
    seat that does not decode this step reads one key; its result is dropped); the decoding ones are
    `keep` (None: all) and their results go to step rows `out_rows`."""

    write_index: torch.Tensor  # [W * Hkv] rows of one layer's [seats * Hkv * capacity, D] view
    write_rows: torch.Tensor | None  # [W] the step rows written there (None: every row of the step, in order)
    lo: int
    hi: int
    context: int
    q_rows: torch.Tensor  # [hi - lo]
    mask: torch.Tensor  # [hi - lo, 1, 1, context] additive: 0 where a key is read, -inf elsewhere
    keep: torch.Tensor | None  # [R] positions in [0, hi - lo) of the seats that decode (None: all)
    out_rows: torch.Tensor  # [R] their step rows (`q_rows` when keep is None)
    in_order: bool = False  # seat i decodes step row i, for every row of the step: no reordering at all


class SeatKV:
    """The seat rows of the running sequences; `plan(batch)` seats the step's sequences and says where
    their K/V go and what the decode rows read."""

    def __init__(self, kv: PagedKVCache, max_positions: int | None = None):
        self.kv = kv
        layers, slots, self.heads, self.dim = kv.k.shape
        self.max_positions = slots if max_positions is None else max_positions  # seats x capacity bound
        self.max_seats = slots  # the runner sets its batch's limit: seats never grow past it
        self.k = kv.k.new_zeros(layers, 0, self.heads, 0, self.dim)
        self.v = torch.zeros_like(self.k)
        self.holders: list[Sequence] = []  # seat -> sequence
        self.written: list[int] = []  # seat -> positions [0, written) hold its K/V
        self.seat_index: dict[int, int] = {}  # id(sequence) -> seat (the holders keep the ids unique)
        # The last decode-only step's (sequence ids, their seats, plan, positions in [lo, hi) that decode, their
        # context lengths): what `_shift` moves one position on. None after any change to the seats.
        self._last: tuple[tuple[int, ...], list[int], SeatStep, np.ndarray, np.ndarray] | None = None

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def plan(self, batch: list[tuple[Sequence, int]], device: torch.device) -> SeatStep | None:
        """Seat the batch's sequences that fit, copy in context they did not write here, and lay out the
        step's seat writes and decode read (None: no sequence of the step has a seat)."""
        for seat in reversed(range(len(self.holders))):  # from the end: a compaction move brings a checked row
            if self.holders[seat].state is State.FINISHED:
                self._release(seat)
        shifted = self._shift(batch, device)
        if shifted is not None:
            return shifted
        self._last = None
        need = list(self.written)  # capacity each seat needs this step
        joining = []
        for seq, n in batch:
            seat = self.seat_index.get(id(seq))
            if seat is None:
                joining.append((seq.num_computed + n, seq))
            else:
                need[seat] = seq.num_computed + n
        while need and self._size_for(len(need), max(need)) is None:  # the longest gives its seat up
            seat = need.index(max(need))
            self._release(seat)
            need[seat] = need[-1]
            need.pop()
        capacity, seated = max(need, default=0), len(need)
        admitted = []
        for end, seq in sorted(joining, key=lambda e: e[0]):
            if self._size_for(seated + len(admitted) + 1, max(capacity, end)) is None:
                break
            admitted.append(seq)
            capacity = max(capacity, end)
        if not seated + len(admitted):
            return None
        self._resize(*self._size_for(seated + len(admitted), capacity))
        for seq in admitted:  # their rows are zero: `_layout` copies in what they hold elsewhere
            self.seat_index[id(seq)] = len(self.holders)
            self.holders.append(seq)
            self.written.append(0)
        return self._layout(batch, device)

    def write(self, layer: int, step: SeatStep, k: torch.Tensor, v: torch.Tensor) -> None:
        """The step's new K/V [T, Hkv, D] of seated rows into their seats' rows."""
        if step.write_rows is not None:
            k, v = k.index_select(0, step.write_rows), v.index_select(0, step.write_rows)
        self.k[layer].view(-1, self.dim).index_copy_(0, step.write_index, k.reshape(-1, self.dim))
        self.v[layer].view(-1, self.dim).index_copy_(0, step.write_index, v.reshape(-1, self.dim))

    def _shift(self, batch: list[tuple[Sequence, int]], device: torch.device) -> SeatStep | None:
        """The last step's plan one position on, when this step decodes the same sequences in the same order,
        each one token past what its seat holds, and the buffer holds that (None otherwise): every seat
        writes and reads one position further, so only the write index and the mask move."""
        last = self._last
        if last is None or len(batch) != len(last[0]):
            return None
        ids, seats, step, decoding, ctx = last
        written = self.written
        for (seq, n), key, seat in zip(batch, ids, seats):
            if n != 1 or id(seq) != key or seq.num_computed != written[seat]:
                return None
        if max(written[seat] for seat in seats) >= self.capacity:
            return None
        for seat in seats:
            written[seat] += 1
        ctx = ctx + 1
        context = step.context + 1
        step = SeatStep(step.write_index + 1, step.write_rows, step.lo, step.hi, context, step.q_rows,
                        self._mask(decoding, ctx, step.hi - step.lo, context).to(device), step.keep, step.out_rows,
                        step.in_order)
        self._last = (ids, seats, step, decoding, ctx)
        return step

    def _mask(self, decoding: np.ndarray, ctx: np.ndarray, width: int, context: int) -> torch.Tensor:
        """[width, 1, 1, context] additive mask: the seats at positions `decoding` read their first `ctx` keys,
        the others their first one."""
        lengths = np.ones(width, dtype=np.int64)
        lengths[decoding] = ctx
        # Additive, built once for every layer: SDPA turns a boolean mask into this on each call (~20% of
        # a small decode call's time, measured on CPU).
        hidden = torch.from_numpy(np.arange(context)[None, :] >= lengths[:, None])[:, None, None, :]
        return torch.zeros(hidden.shape, dtype=self.k.dtype).masked_fill_(hidden, float("-inf"))

    def _layout(self, batch: list[tuple[Sequence, int]], device: torch.device) -> SeatStep:
        seats, pasts, counts, firsts = [], [], [], []
        row = 0
        for seq, n in batch:
            seat = self.seat_index.get(id(seq))
            if seat is not None:
                past = seq.num_computed
                if self.written[seat] < past:  # context it did not write here
                    self._copy_in(seat, seq, self.written[seat], past)
                self.written[seat] = past + n
                seats.append(seat)
                pasts.append(past)
                counts.append(n)
                firsts.append(row)
            row += n
        seats_a, pasts_a, counts_a, firsts_a = (np.array(x, dtype=np.int64) for x in (seats, pasts, counts, firsts))
        total = int(counts_a.sum())
        per_row = np.repeat(np.arange(len(seats)), counts_a)
        offsets = np.arange(total) - np.repeat(np.cumsum(counts_a) - counts_a, counts_a)
        rows, positions, row_seats = firsts_a[per_row] + offsets, pasts_a[per_row] + offsets, seats_a[per_row]
        heads = np.arange(self.heads)
        index = ((row_seats[:, None] * self.heads + heads[None, :]) * self.capacity + positions[:, None]).reshape(-1)
        write_rows = None if total == row else torch.from_numpy(rows).to(device)
        decoding = counts_a == 1
        dec_seats, dec_rows, dec_ctx = seats_a[decoding], firsts_a[decoding], pasts_a[decoding] + 1
        lo = int(dec_seats.min()) if dec_seats.size else 0
        hi = int(dec_seats.max()) + 1 if dec_seats.size else 0
        context = int(dec_ctx.max()) if dec_seats.size else 0
        q_rows = np.full(hi - lo, dec_rows[0] if dec_seats.size else 0, dtype=np.int64)
        q_rows[dec_seats - lo] = dec_rows
        mask = self._mask(dec_seats - lo, dec_ctx, hi - lo, context)
        in_order = hi - lo == row and bool((q_rows == np.arange(row)).all())
        q_rows = torch.from_numpy(q_rows).to(device)
        if dec_seats.size == hi - lo:  # every seat of the window decodes: results in seat order
            keep, out_rows = None, q_rows
        else:
            keep, out_rows = torch.from_numpy(dec_seats - lo).to(device), torch.from_numpy(dec_rows).to(device)
        step = SeatStep(torch.from_numpy(index).to(device), write_rows, lo, hi, context, q_rows, mask.to(device),
                        keep, out_rows, in_order)
        if seats and len(seats) == len(batch) and decoding.all():  # all rows seated decodes: the next may shift
            self._last = (tuple(id(seq) for seq, _ in batch), seats, step, dec_seats - lo, dec_ctx)
        return step

    def _copy_in(self, seat: int, seq: Sequence, start: int, end: int) -> None:
        """Positions [start, end) of `seq` from the paged cache into its seat (every layer)."""
        bs = self.kv.block_size
        positions = np.arange(start, end)
        slots = seq.kv_slots.numpy()[positions // bs] * bs + positions % bs
        slots = torch.from_numpy(slots).to(self.kv.k.device)
        self.k[:, seat, :, start:end] = self.kv.k.index_select(1, slots).transpose(1, 2)
        self.v[:, seat, :, start:end] = self.kv.v.index_select(1, slots).transpose(1, 2)

    def _release(self, seat: int) -> None:
        """Free a seat: the last seat's row moves into it, and what the rows held past that is zeroed (only
        the written positions: the rest is zero already)."""
        self._last = None
        last = len(self.holders) - 1
        del self.seat_index[id(self.holders[seat])]
        held, moved_len = self.written[seat], self.written[last]
        if seat != last:
            for rows in (self.k, self.v):
                rows[:, seat, :, :moved_len] = rows[:, last, :, :moved_len]
                rows[:, seat, :, moved_len:held].zero_()
            moved = self.holders[seat] = self.holders[last]
            self.written[seat] = moved_len
            self.seat_index[id(moved)] = seat
        for rows in (self.k, self.v):
            rows[:, last, :, :moved_len].zero_()
        self.holders.pop()
        self.written.pop()

    def _size_for(self, seats: int, capacity: int) -> tuple[int, int] | None:
        """The buffer size to hold `seats` rows of `capacity` positions within the bound: the current size
        where it is enough; else each short dimension doubled; else, where the bound stops that, the most
        positions it allows per seat (so that growing one position at a time never reallocates every step);
        None when even `seats` rows of `capacity` exceed it."""
        have_seats, have_capacity = self.k.shape[1], self.capacity
        if seats <= have_seats and capacity <= have_capacity:
            return have_seats, have_capacity
        grown_seats = have_seats if seats <= have_seats else min(max(seats, 2 * have_seats), self.max_seats)
        grown_capacity = have_capacity if capacity <= have_capacity else max(capacity, 2 * have_capacity)
        for size in ((grown_seats, grown_capacity), (grown_seats, self.max_positions // grown_seats),
                     (seats, self.max_positions // seats)):
            if size[1] >= capacity and size[0] * size[1] <= self.max_positions:
                return size
        return None

    def _resize(self, seats: int, capacity: int) -> None:
        """Reallocate to [layers, seats, Hkv, capacity, D] keeping the held rows (they fit: see `plan`)."""
        if (seats, capacity) == (self.k.shape[1], self.capacity):
            return
        used, kept = len(self.holders), min(capacity, self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], seats, self.heads, capacity, self.dim)
            new[:, :used, :, :kept] = old[:, :used, :, :kept]
            setattr(self, name, new)
