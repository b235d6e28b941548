"""The step loop's decisions, shared by the engine and the simulations.

One `StepLoop.iterate` takes the submissions and adapter messages from the inbox, takes the finished
adapter loads, asks the scheduling policy for a step, answers the jobs past their deadline, hands the
step's loads to the loader, runs the batch, publishes the prompt blocks of each sequence whose prompt is
computed to the prefix cache, appends each sequence's token, and finishes and answers the sequences that
are done. It owns no thread and no clock: the engine (scheduler/engine.py) calls it on
its step thread with the model runner, the adapter manager and the monotonic clock, and
tests/test_scheduler_sim.py calls the very same code with a simulated runner and loader on a fake clock,
so the policy the simulations check is the one the engine runs.

Failures stay with the jobs they belong to: an exception while sampling or finishing one sequence answers
that job `internal` and its neighbours carry on; a failed forward pass answers the jobs of that step; a
failed schedule answers every job the policy holds. Every submitted job is answered exactly once.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from lorabus.scheduler.policy import AdapterSlots, Scheduler
from lorabus.scheduler.requests import (ChoiceOutput, Completion, Partial, Sequence, StopRules, TokenLogprob, call_hook,
                                        deliver)

if TYPE_CHECKING:
    from lorabus.scheduler.adapter_manager import AdapterSpec

log = logging.getLogger(__name__)

STOPPED = "engine stopped"
# How soon to iterate again after Outcome.BLOCKED: deadlines and the bounded-wait rule are time-based, so
# held jobs need a look even when no submission or load wakes the loop.
REPLAN_S = 0.005


class Outcome(enum.Enum):
    IDLE = "idle"  # holds no job: nothing to do until a submission arrives
    BLOCKED = "blocked"  # holds jobs, none runnable yet (adapters loading, the bounded wait): look again soon
    STEPPED = "stepped"  # did work: go on at once


@dataclass(frozen=True)
class Submit:
    seq: Sequence


@dataclass(frozen=True)
class Prefetch:
    key: str
    free_slot_only: bool = False


@dataclass(frozen=True)
class Invalidate:
    old: AdapterSpec  # the content that `old.key` was re-published over


Message = Submit | Prefetch | Invalidate


@dataclass(frozen=True)
class LoadDone:
    """A load the loader finished: into `slot` (None: the host cache only), failed with `error`, or `stale`
    (the key was re-published while it loaded, so what it loaded is outdated)."""

    key: str
    slot: int | None
    error: str | None = None
    stale: bool = False


class StepOutput(Protocol):
    sequences: list[Sequence]  # the sequences that get a token this step
    scored: list  # the sequences whose prompt rows this step scores (prompt logprobs)

    def token(self, row: int, seq: Sequence | None = None) -> int: ...

    def score_prompt(self, index: int) -> None: ...


class Runner(Protocol):
    def run(self, batch: list[tuple[Sequence, int]]) -> StepOutput: ...

    def fork(self, parent: Sequence, choices: list[Sequence]) -> None: ...


class Loader(Protocol):
    def load(self, key: str, slot: int | None) -> bool: ...

    def finished(self) -> list[LoadDone]: ...

    def load_error(self, key: str) -> str | None: ...

    def prefetch(self, key: str, slots: AdapterSlots, wanted: set[str], now: float,
                 free_slot_only: bool = False) -> None: ...

    def invalidate(self, old: AdapterSpec, slots: AdapterSlots) -> None: ...


class StepLoop:
    def __init__(self, scheduler: Scheduler, runner: Runner, loader: Loader, stops: StopRules,
                 clock: Callable[[], float]):
        self.scheduler, self.runner, self.loader, self.stops, self.clock = scheduler, runner, loader, stops, clock
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self.wake = threading.Event()  # set by every message and finished load
        # A job may be answered from the stop() thread while the step thread is stuck: answers go out once.
        self._answer_lock = threading.Lock()

    def put(self, message: Message) -> None:
        """Hand a message to the loop (from any thread)."""
        self.put_many([message])

    def put_many(self, messages: list[Message]) -> None:
        """Hand several messages to the loop (from any thread), with one wake-up."""
        for message in messages:
            self._inbox.put(message)
        self.wake.set()

    def inbox_empty(self) -> bool:
        return self._inbox.empty()

    def iterate(self) -> Outcome:
        sched = self.scheduler
        self.wake.clear()
        self._take_inbox()
        self._take_loads()
        if not sched.has_work():
            return Outcome.IDLE
        try:
            step = sched.schedule(self.clock())
        except Exception as exc:  # its bookkeeping may be half-updated: answer everything it holds
            log.exception("schedule failed")
            self.fail_all(exc)
            return Outcome.STEPPED
        for seq in step.expired:
            self._answer_error(seq, "deadline_exceeded", "the job's deadline passed before it could run")
        for key, slot in step.loads:
            if not self.loader.load(key, slot):  # cannot happen (jobs name registered keys): never wait on it
                for seq in sched.load_failed(key):
                    self._answer_error(seq, "internal", f"adapter {key} is not registered")
        if not step.batch:
            return Outcome.BLOCKED
        self._run(step.batch)
        return Outcome.STEPPED

    def fail_all(self, exc: Exception) -> None:
        """Answer `internal` every job the policy holds and start its bookkeeping afresh."""
        for seq in self.scheduler.reset():
            self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")

    def abort(self) -> None:
        """Answer `internal` every job held or still in the inbox: the engine is stopping and out of time."""
        for message in self._drain_inbox():
            if isinstance(message, Submit):
                self._answer_error(message.seq, "internal", STOPPED)
        for seq in self.scheduler.reset():
            self._answer_error(seq, "internal", STOPPED)

    # ---- intake -----------------------------------------------------------------------------------

    def _drain_inbox(self) -> list[Message]:
        messages = []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _take_inbox(self) -> None:
        for message in self._drain_inbox():
            try:
                self._take(message)
            except Exception as exc:  # one bad message must not stop the others (or the loop)
                log.exception("inbox message %s failed", message)
                if isinstance(message, Submit):
                    self.scheduler.waiting = [s for s in self.scheduler.waiting if s is not message.seq]
                    self._answer_error(message.seq, "internal", f"{type(exc).__name__}: {exc}")

    def _take(self, message: Message) -> None:
        slots = self.scheduler.slots
        match message:
            case Submit(seq):
                key = seq.request.adapter
                error = self.loader.load_error(key) if key is not None else None
                if error is not None:
                    self._answer_error(seq, "adapter_load_failed", error)
                elif not self.scheduler.admissible(seq):  # Engine._sequence checks it too: never held
                    self._answer_error(seq, "prompt_too_long", "the job needs more KV cache than there is")
                else:
                    self.scheduler.add(seq)
            case Prefetch(key, free_slot_only):
                wanted = {s.request.adapter for s in self.scheduler.waiting}
                self.loader.prefetch(key, slots, wanted, self.clock(), free_slot_only)
            case Invalidate(old):
                self.loader.invalidate(old, slots)
                self.scheduler.invalidate_prefixes(old.key)

    def _take_loads(self) -> None:
        for done in self.loader.finished():
            try:
                self._loaded(done)
            except Exception as exc:  # its waiting jobs cannot run on a slot in an unknown state
                log.exception("finishing the load of %s failed", done.key)
                for seq in self.scheduler.load_failed(done.key):
                    self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")

    def _loaded(self, done: LoadDone) -> None:
        slots = self.scheduler.slots
        if done.stale:  # re-published while loading: free the slot, load again later
            if done.slot is not None:
                slots.loaded(done.key, ok=False)
        elif done.error is None:
            if done.slot is not None:
                slots.loaded(done.key, ok=True)
        else:
            for seq in self.scheduler.load_failed(done.key):
                self._answer_error(seq, "adapter_load_failed", done.error)

    # ---- the batch --------------------------------------------------------------------------------

    def _run(self, batch: list[tuple[Sequence, int]]) -> None:
        """One forward pass over the batch, then each sequence's own work, isolated from the others'."""
        sched = self.scheduler
        try:
            output = self.runner.run(batch)
        except Exception as exc:
            log.exception("step failed")
            for seq, _ in batch:
                if seq in sched.running:
                    self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}")
            return
        for seq, n in batch:
            seq.num_computed += n
        now = self.clock()
        for index, (seq, *_) in enumerate(output.scored):
            try:
                output.score_prompt(index)
            except Exception as exc:
                self._fail(seq, exc, now)
        for row, seq in enumerate(output.sequences):
            try:
                if seq.choices and not seq.output_ids and not seq.answered:
                    self._fork(seq, output, row, now)
                if not seq.job.answered:
                    token = output.token(row)
                    if not seq.output_ids and seq.parent is None:  # its prompt is computed and sound: share it
                        sched.publish(seq)
                    self._advance(seq, token, now)
            except Exception as exc:
                self._fail(seq, exc, now)

    def _fail(self, seq: Sequence, exc: Exception, now: float) -> None:
        """A failure of one sequence's own work: its job is answered `internal`, its neighbours carry on."""
        log.exception("job %s failed after the forward pass", seq.request.id)
        self._answer_error(seq, "internal", f"{type(exc).__name__}: {exc}", now)

    def _fork(self, parent: Sequence, output: StepOutput, row: int, now: float) -> None:
        """The prompt of an n-sample job is prefilled: its other choices start from the same cache and logits."""
        self.runner.fork(parent, parent.choices)
        for seq in parent.choices:
            seq.num_computed = parent.num_computed
            self._advance(seq, output.token(row, seq), now)

    def _advance(self, seq: Sequence, token: int, now: float) -> None:
        """Append the sequence's next token; stream it, and finish the sequence if that ends it."""
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.output_ids.append(token)
        reason = self.stops.finish_reason(seq)
        if reason is not None:
            seq.finish_reason = reason
            self.scheduler.finish(seq, now)
        self._stream(seq, done=reason is not None)
        if reason is not None and seq.job.live == 0:  # every choice of the job is done
            self._answer(seq.job, self._completion(seq.job))

    def _stream(self, seq: Sequence, done: bool) -> None:
        """Hand the job's caller the tokens since the last partial, every `stream_every` tokens and at the end."""
        request = seq.request
        new = len(seq.output_ids) - seq.streamed
        if request.on_partial is None or not new or (new < request.stream_every and not done):
            return
        tokens = seq.output_ids[seq.streamed:]
        text = self.stops.text(seq) if done else self.stops.partial_text(seq)
        sent = seq.streamed_text
        if not text.startswith(sent):  # a stop string cut into what was sent: nothing more to add
            text = sent
        seq.streamed, seq.streamed_text = len(seq.output_ids), text
        call_hook(request.on_partial, Partial(request.id, seq.index, tokens, text[len(sent):]))

    def _completion(self, job: Sequence) -> Completion:
        choices = [job, *job.choices]
        outputs = [ChoiceOutput(seq.index, list(seq.output_ids), self.stops.text(seq), seq.finish_reason,
                                self._logprobs(seq.logprobs)) for seq in choices]
        first = outputs[0]
        return Completion(job.request.id, "ok", token_ids=first.token_ids, text=first.text,
                          finish_reason=first.finish_reason, logprobs=first.logprobs,
                          prompt_logprobs=self._logprobs(job.prompt_logprobs),
                          choices=outputs if len(outputs) > 1 else None, **self._timings(job))

    def _logprobs(self, entries: list | None) -> list[TokenLogprob | None] | None:
        """Logprob entries with the text of every token they name."""
        if entries is None:
            return None
        text = self.stops.token_text
        return [None if e is None else
                TokenLogprob(e[0], text(e[0]), e[1], tuple((i, text(i), lp) for i, lp in zip(e[2], e[3])))
                for e in entries]

    # ---- answers ----------------------------------------------------------------------------------

    def _timings(self, seq: Sequence) -> dict:
        now = self.clock()
        return {
            "queue_s": (seq.admitted_at or now) - seq.arrival,
            "ttft_s": None if seq.first_token_at is None else seq.first_token_at - seq.arrival,
            "total_s": now - seq.arrival,
            "cold": seq.cold,
            "prompt_tokens": len(seq.prompt_ids),
        }

    def _answer_error(self, seq: Sequence, code: str, message: str, now: float | None = None) -> None:
        """Answer the job of `seq` with an error; its choices still running stop."""
        job = seq.job
        for member in (job, *job.choices):
            if member in self.scheduler.running:
                self.scheduler.finish(member, self.clock() if now is None else now)
        self._answer(job, Completion(job.request.id, "error", error_code=code, error_message=message,
                                     **self._timings(job)))

    def _answer(self, seq: Sequence, completion: Completion) -> None:
        with self._answer_lock:
            if seq.answered:  # a failure after its answer went out: it stays answered once
                return
            seq.answered = True
        deliver(seq.on_done, completion)
