"""Adapter-aware continuous batching: which sequences run in the next step, which adapters to load.

Pure bookkeeping (no tensors, no threads, time passed in), so tests/test_scheduler_sim.py can simulate it;
the rules and their guarantees: docs/scheduling.md, "The policy and its guarantees".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorabus.scheduler.kv_cache import BlockAllocator
from lorabus.scheduler.requests import Sequence, State


@dataclass
class SchedulerLimits:
    max_running: int = 64
    max_step_tokens: int = 512
    max_wait_s: float = 0.25


class AdapterSlots:
    """The table of device adapter slots: which key each holds, whether loaded, and who uses it."""

    def __init__(self, num_slots: int):
        self.key_of: list[str | None] = [None] * num_slots
        self.refs = [0] * num_slots
        self.ready = [False] * num_slots
        self.last_used = [0.0] * num_slots
        self.slot_of: dict[str, int] = {}
        # Adapter key → how much of this worker's own traffic it gets (Engine.set_adapter_affinity);
        # replaced whole by the caller's thread, read here: unknown keys score 0.
        self.affinity: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.key_of)

    def is_ready(self, key: str) -> bool:
        slot = self.slot_of.get(key)
        return slot is not None and self.ready[slot]

    def has_free(self) -> bool:
        return None in self.key_of

    def reserve(self, key: str, now: float, wanted: set[str]) -> int | None:
        """A slot to load `key` into: a free one, else an idle one not in `wanted` (the lowest affinity
        score first, least recently used among equals); None if none."""
        free = [s for s, k in enumerate(self.key_of) if k is None]
        if free:
            return self.take(free[0], key, now)
        idle = [s for s, k in enumerate(self.key_of) if self.ready[s] and self.refs[s] == 0 and k not in wanted]
        if not idle:
            return None
        affinity = self.affinity
        return self.take(min(idle, key=lambda s: (affinity.get(self.key_of[s], 0), self.last_used[s])), key, now)

    def take(self, slot: int, key: str, now: float) -> int:
        """Give a free or idle slot to `key` (evicting what it held); the caller loads it."""
        old = self.key_of[slot]
        if old is not None:
            del self.slot_of[old]
        self.key_of[slot], self.ready[slot], self.last_used[slot] = key, False, now
        self.slot_of[key] = slot
        return slot

    def loaded(self, key: str, ok: bool) -> None:
        """`key`'s load ended: its slot is ready, or (failed, or outdated meanwhile) free again unless in use."""
        slot = self.slot_of.get(key)
        if slot is None:
            return
        if ok:
            self.ready[slot] = True
        elif not self.refs[slot]:
            del self.slot_of[key]
            self.key_of[slot], self.ready[slot] = None, False

    def retire(self, key: str) -> None:
        """`key`'s slot holds outdated content: new jobs no longer match it, running ones finish on it,
        and it is evicted like any idle slot afterwards."""
        slot = self.slot_of.pop(key, None)
        if slot is not None:
            self.key_of[slot] = f"{key}#retired-{slot}"
            self.slot_of[self.key_of[slot]] = slot

    def acquire(self, key: str, now: float) -> int:
        slot = self.slot_of[key]
        self.refs[slot] += 1
        self.last_used[slot] = now
        return slot

    def release(self, slot: int, now: float) -> None:
        self.refs[slot] -= 1
        self.last_used[slot] = now


@dataclass
class Reservation:
    """What the head of the KV queue is promised: at step `at` it fits; what is spare then beyond it."""

    head: Sequence
    at: int
    spare_blocks: int
    spare_seats: int

    def allows(self, done_by: int, blocks: int, seats: int = 1) -> bool:
        """May a job that is done by step `done_by` and needs `blocks` and `seats` be admitted now (and if so,
        book it)?"""
        if done_by <= self.at:
            return True
        if blocks <= self.spare_blocks and seats <= self.spare_seats:
            self.spare_blocks -= blocks
            self.spare_seats -= seats
            return True
        return False


@dataclass
class Step:
    expired: list[Sequence] = field(default_factory=list)
    loads: list[tuple[str, int]] = field(default_factory=list)  # (adapter key, slot) to load now
    batch: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)


class Scheduler:
    def __init__(self, limits: SchedulerLimits, blocks: BlockAllocator, slots: AdapterSlots):
        if limits.max_step_tokens < limits.max_running:
            raise ValueError("max_step_tokens must be at least max_running (one decode token per sequence)")
        self.limits, self.blocks, self.slots = limits, blocks, slots
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.usage: dict[str, float] = {}  # tenant → tokens admitted (virtual service)
        # slot → (the adapter it holds, the adapter an overdue job waits to load there once it drains)
        self.draining: dict[int, tuple[str, str]] = {}
        self.steps = 0  # schedule() calls that returned a batch: the clock of `Sequence.done_by`
        self.head: Sequence | None = None  # the overdue job the KV cache keeps out, holding a reservation
        self.reservation: Reservation | None = None  # the head's, as of the last schedule()
        # Adapter key → how many times its content changed (Engine.register over new content): part of the
        # prefix cache's identity, so K/V computed with older content is never hit again.
        self.epochs: dict[str, int] = {}
        # Prefill tokens a step gives the prefilling sequences (in running order), at the least: one
        # decode token goes to each of the at most max_running - 1 other sequences first.
        self._prefill_rate = limits.max_step_tokens - limits.max_running + 1

    def admissible(self, seq: Sequence) -> bool:
        """False for a job that can never run: it needs more KV blocks than exist, or more seats than a batch has."""
        return self.blocks_needed(seq) <= self.blocks.num_blocks and seq.width <= self.limits.max_running

    def blocks_needed(self, seq: Sequence) -> int:
        """KV blocks for the job of `seq`: its prompt + max_new_tokens, and for each other choice of an n-sample
        job what it does not share of them (the prompt's full blocks are shared)."""
        own = self.blocks.blocks_for(seq.cost)
        return own + len(seq.choices) * (own - len(seq.prompt_ids) // self.blocks.block_size)

    def reset(self) -> list[Sequence]:
        """Drop every waiting and running sequence and return them (the caller answers them); for when a
        failure leaves this bookkeeping untrustworthy. Slots keep their adapters, loads in flight included."""
        dropped = self.waiting + self.running
        for seq in dropped:
            seq.state = State.FINISHED
            seq.blocks = []
        self.waiting, self.running, self.draining, self.head, self.reservation = [], [], {}, None, None
        self.blocks.reset()
        self.slots.refs = [0] * len(self.slots)
        return dropped

    def _active_tenants(self) -> set[str]:
        return {s.request.tenant for s in self.waiting} | {s.request.tenant for s in self.running}

    def add(self, seq: Sequence) -> None:
        if not self.admissible(seq):
            raise ValueError(f"{seq.request.id} needs more KV blocks than the cache has")
        tenant = seq.request.tenant
        active = self._active_tenants()
        if tenant not in active:
            floor = min((self.usage.get(t, 0.0) for t in active), default=0.0)
            self.usage[tenant] = max(self.usage.get(tenant, 0.0), floor)
        key = seq.request.adapter
        seq.cold = key is not None and not self.slots.is_ready(key)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def load_failed(self, key: str) -> list[Sequence]:
        """Drop the waiting sequences of an adapter that failed to load; the caller answers them."""
        self.slots.loaded(key, ok=False)
        failed = [s for s in self.waiting if s.request.adapter == key]
        self.waiting = [s for s in self.waiting if s.request.adapter != key]
        for seq in failed:
            seq.state = State.FINISHED
        return failed

    def _order(self) -> list[Sequence]:
        """Waiting jobs interleaved across tenants by virtual service, FIFO within a tenant."""
        queues: dict[str, list[Sequence]] = {}
        for seq in self.waiting:
            queues.setdefault(seq.request.tenant, []).append(seq)
        projected = {t: self.usage.get(t, 0.0) for t in queues}
        heads = {t: 0 for t in queues}
        fair: list[Sequence] = []
        while queues:
            tenant = min(queues, key=lambda t: (projected[t], t))
            seq = queues[tenant][heads[tenant]]
            fair.append(seq)
            projected[tenant] += seq.cost
            heads[tenant] += 1
            if heads[tenant] == len(queues[tenant]):
                del queues[tenant]
        return fair

    def _claim_slots(self, keys: list[str], now: float, overdue: set[str]) -> list[tuple[str, int]]:
        """Overdue jobs' adapters without a slot (in order) each get one now, a draining one that freed for
        them, else a free or idle one; when none is left, a busy slot starts draining for the adapter.
        Slots are only taken here, never freed, so once no slot can be reserved (or none is left to drain)
        the later keys skip that search: with hundreds of overdue adapters the step does not pay it each."""
        loads = []
        can_reserve = can_drain = True
        targets = self._drain_targets()
        for key in keys:
            if key in self.slots.slot_of:
                continue
            slot = None
            drained = [s for s, (_, k) in self.draining.items() if k == key and self.slots.refs[s] == 0] \
                if key in targets else []
            if drained:
                slot = self.slots.take(drained[0], key, now)
            elif can_reserve:
                slot = self.slots.reserve(key, now, wanted=overdue)
                can_reserve = slot is not None
            if slot is not None:
                self.draining = {s: d for s, d in self.draining.items() if d[1] != key and s != slot}
                targets = self._drain_targets()
                can_drain = True  # a drain that ended may have made its slot busy-and-drainable again
                loads.append((key, slot))
            elif can_drain and key not in targets:
                # Only a slot in use is worth draining: an idle one's queued jobs get admitted this very step.
                busy = [s for s in range(len(self.slots))
                        if self.slots.ready[s] and self.slots.refs[s] > 0 and s not in self.draining]
                if busy:
                    victim = min(busy, key=lambda s: (self.slots.refs[s], self.slots.last_used[s]))
                    self.draining[victim] = (self.slots.key_of[victim], key)
                else:
                    can_drain = False
        return loads

    def _drain_targets(self) -> set[str]:
        return {waiting for _, waiting in self.draining.values()}

    def schedule(self, now: float) -> Step:
        step = Step()
        live = []
        for seq in self.waiting:
            deadline = seq.deadline
            if deadline is not None and now > deadline:
                seq.state = State.FINISHED
                step.expired.append(seq)
            else:
                live.append(seq)
        self.waiting = live

        max_wait = self.limits.max_wait_s
        fair = self._order()
        overdue = [s for s in fair if now - s.arrival > max_wait]
        if self.head is not None and self.head.state is not State.WAITING:  # admitted, expired or failed
            self.head = None
        if self.head is None:
            kept_out = [s for s in overdue if self.blocks_needed(s) > self.blocks.num_free]
            self.head = min(kept_out, key=lambda s: s.arrival, default=None)
        # The head first, then the other overdue jobs (still in fair order among themselves), then the rest.
        first = ([self.head] if self.head is not None else []) + overdue
        first_ids = {id(s) for s in first}
        order = list({id(s): s for s in first}.values()) + [s for s in fair if id(s) not in first_ids]
        overdue_keys = [s.request.adapter for s in overdue if s.request.adapter is not None]
        overdue_set = set(overdue_keys)
        # A drain is only for an adapter that overdue jobs still wait for and that has no slot yet.
        # It also ends when the slot changed hands meanwhile (evicted for another adapter).
        self.draining = {s: (held, k) for s, (held, k) in self.draining.items()
                         if k in overdue_set and k not in self.slots.slot_of and self.slots.key_of[s] == held}
        step.loads.extend(self._claim_slots(list(dict.fromkeys(overdue_keys)), now, overdue_set))
        wanted = [s.request.adapter for s in order if s.request.adapter is not None]
        wanted_set = set(wanted)
        drain_targets = self._drain_targets()
        for key in dict.fromkeys(wanted):  # prefetch in admission order, each adapter once
            if key in self.slots.slot_of or key in drain_targets:
                continue
            slot = self.slots.reserve(key, now, wanted_set)
            if slot is None:
                break
            step.loads.append((key, slot))

        admitted = set()
        prefill_ahead = sum(s.num_tokens - s.num_computed for s in self.running if not s.output_ids and s.parent is None)
        self.reservation = None
        for seq in order:
            if len(self.running) >= self.limits.max_running:
                break
            if self.head is not None and seq is not self.head and self.reservation is None:
                self.reservation = self._reserve(self.head)  # the head (first in order) is still waiting
            if self._admit(seq, now, prefill_ahead):
                admitted.add(id(seq))
                prefill_ahead += len(seq.prompt_ids) - seq.num_computed
                if seq is self.head:
                    self.head = None
        if self.head is not None and self.reservation is None:
            self.reservation = self._reserve(self.head)
        if admitted:
            self.waiting = [s for s in self.waiting if id(s) not in admitted]

        budget = self.limits.max_step_tokens
        prefilling = []
        for seq in self.running:
            pending = seq.num_tokens - seq.num_computed
            if seq.parent is not None and not seq.output_ids:  # a choice waiting for its job's prefill
                continue
            if seq.output_ids:
                step.batch.append((seq, 1))
                budget -= 1
            else:
                prefilling.append((seq, pending))
        for seq, pending in prefilling:
            if budget <= 0:
                break
            chunk = min(pending, budget)
            step.batch.append((seq, chunk))
            budget -= chunk
        if step.batch:
            self.steps += 1
        return step

    def _admit(self, seq: Sequence, now: float, prefill_ahead: int) -> bool:
        """Admit `seq` if its adapter is ready, the reservation allows it and its KV blocks are free."""
        key = seq.request.adapter
        if key is not None and (not self.slots.is_ready(key) or self.slots.slot_of[key] in self.draining):
            return False
        if len(self.running) + seq.width > self.limits.max_running:
            return False
        need = self.blocks_needed(seq)
        hits = self._cached_prefix(seq, need)
        # Cached blocks take no fresh ones, but an idle one leaves the free count when taken.
        if need - len(hits) + self.blocks.idle_among(hits) > self.blocks.num_free:
            return False
        done_by = self._done_by(seq, prefill_ahead)
        # Against a reservation every block counts: a cached one it holds past `at` is not freed by then either.
        if self.reservation is not None and not self.reservation.allows(done_by, need, seq.width):
            return False
        bs = self.blocks.block_size
        if self._looks_up(seq):
            # Before allocating, which may evict idle cached blocks. Looked up: what the cache could have served.
            self.blocks.acquire(hits, self._shareable(seq) * bs)
        seq.blocks = hits + self.blocks.allocate(seq.cost - len(hits) * bs)
        seq.cached_blocks = len(hits)
        seq.num_computed = len(hits) * bs
        shared = len(seq.prompt_ids) // bs
        for choice in seq.choices:  # their blocks past the shared ones; the runner copies the partial one in
            choice.blocks = self.blocks.allocate(seq.cost - shared * bs)
        seq.live = seq.width
        for member in (seq, *seq.choices):
            member.state = State.RUNNING
            member.admitted_at = now
            member.done_by = done_by
            if key is not None:
                member.slot = self.slots.acquire(key, now)
            self.running.append(member)
        self.usage[seq.request.tenant] = self.usage.get(seq.request.tenant, 0.0) + seq.cost * seq.width
        return True

    def _cached_prefix(self, seq: Sequence, need: int) -> list[int]:
        """The prefix cache's blocks for `seq`'s prompt (none if the cache is off, or if even all it could hit
        would not make `need` blocks fit). A job that scores its prompt (prompt logprobs) computes every
        prompt row, so it looks nothing up; it still publishes its prompt's blocks."""
        if not self.blocks.prefix_cache:
            return []
        seq.prefix_identity = self._identity(seq)
        limit = self._shareable(seq)
        if not self._looks_up(seq) or need - limit > self.blocks.num_free:
            return []
        return self.blocks.cached_prefix(seq.prefix_identity, seq.prompt_ids, limit)

    def _looks_up(self, seq: Sequence) -> bool:
        return self.blocks.prefix_cache and seq.request.params.prompt_logprobs is None

    def _shareable(self, seq: Sequence) -> int:
        """Prompt blocks a sequence may share: the full ones before the block of its last prompt token, whose
        logits a sequence must compute itself (its first token comes from them)."""
        return (len(seq.prompt_ids) - 1) // self.blocks.block_size

    def _identity(self, seq: Sequence) -> tuple:
        """What a block's K/V depend on besides the tokens: the adapter (None: the base model), a mix's
        members, and how many times each one's content changed."""
        epochs = self.epochs
        return tuple((key, epochs.get(key, 0)) for key in (seq.request.adapter, *seq.adapter_parts))

    def publish(self, seq: Sequence) -> None:
        """`seq` computed its prompt and drew its first token: its shareable prompt blocks join the prefix
        cache, under the identity it was admitted with, unless its adapter's content changed since (it ran
        on the outdated slot). A sequence that failed before this point never publishes."""
        if seq.prefix_identity is not None and seq.prefix_identity == self._identity(seq):
            self.blocks.publish(seq.prefix_identity, seq.prompt_ids, seq.blocks[:self._shareable(seq)])

    def invalidate_prefixes(self, key: str) -> None:
        """`key` was re-published with new content: no cached prefix computed with the old one (its own, or
        a mix's that has it as a member) is hit again, and those no sequence holds are free again."""
        self.epochs[key] = self.epochs.get(key, 0) + 1
        self.blocks.drop(lambda identity: any(part == key for part, _ in identity))

    def _done_by(self, seq: Sequence, prefill_ahead: int) -> int:
        """The step by which `seq`, admitted now behind `prefill_ahead` prompt tokens still to prefill, is
        finished at the latest (docs/scheduling.md, rule 5)."""
        prefill_steps = -(-(prefill_ahead + len(seq.prompt_ids)) // self._prefill_rate)
        return self.steps + prefill_steps + seq.request.params.max_new_tokens - 1

    def _reserve(self, head: Sequence) -> Reservation:
        """The head's reservation: the first step at which, with no one else admitted, it fits."""
        need = self.blocks_needed(head)
        free, seats = self.blocks.num_free, self.limits.max_running - len(self.running)
        at = self.steps
        ending = sorted(self.running, key=lambda s: s.done_by)
        i = 0
        while (free < need or seats < head.width) and i < len(ending):
            at = max(at, ending[i].done_by)
            while i < len(ending) and ending[i].done_by <= at:  # everything ending by then
                free += self.blocks.held_only_by(ending[i].blocks)
                seats += 1
                i += 1
        return Reservation(head, at, free - need, seats - head.width)

    def finish(self, seq: Sequence, now: float) -> None:
        """`seq` leaves the batch. The blocks of an n-sample job's choices are freed together, with its last."""
        seq.state = State.FINISHED
        self.running.remove(seq)
        if seq.slot >= 0:
            self.slots.release(seq.slot, now)
        job = seq.job
        job.live -= 1
        if job.live <= 0:
            for member in (job, *job.choices):
                self.blocks.free(member.blocks)
                member.blocks = []
