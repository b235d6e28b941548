"""The job hand-off between the event loop and the engine, in batches both ways.

Jobs: every request handed over in one event-loop turn (the records of one poll reach the engine in the
same turn) goes to the engine in one `Engine.submit_many` call, on one thread hop (submitting tokenizes,
so it stays off the loop). While one hop runs, later requests gather for the next: under load the
batches grow by themselves.

Completions: the engine answers each job from its step thread. An answer goes into an inbox, and the
loop is woken (`call_soon_threadsafe`) once the step is over (the engine's `on_iteration` hook), and only
when no wake-up is pending already: the answers of one step come back in one loop callback, not one each.
Answers given out on any other thread (a bad request on the submitting one, a stopping engine) wake the
loop at once. One hand-off per engine: it owns the engine's `on_iteration`.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from functools import partial

from lorabus.scheduler import Completion, Engine, Request


class EngineHandoff:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: list[tuple[Request, asyncio.Future]] = []  # gathered for the next submit_many
        self._submitting = False  # a flush is scheduled or its thread hop runs
        self._flushing: asyncio.Task | None = None  # held: the loop keeps only weak references to tasks
        self._answers: collections.deque[tuple[asyncio.Future, Completion]] = collections.deque()
        self._wake_pending = False  # a drain is scheduled on the loop and has not started yet
        self.submit_calls = 0  # submit_many calls (thread hops) made
        self.wakeups = 0  # loop callbacks scheduled from other threads to take answers from the inbox
        self._step_thread: int | None = None  # the engine's step thread, known from its first on_iteration
        self._deferred = False  # the step thread gave out answers in this iteration: wake the loop at its end
        engine.on_iteration = self._iteration_done

    @property
    def batching_answers(self) -> bool:
        """The step thread is known (from the engine's first iteration, within half a second of its start):
        from now on its answers wake the loop once per step."""
        return self._step_thread is not None

    def generate(self, request: Request) -> asyncio.Future:
        """A future of the request's completion; the request reaches the engine with its loop turn's others."""
        loop = self._loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((request, future))
        if not self._submitting:
            self._submitting = True
            loop.call_soon(self._flush)  # after the callbacks of this turn: they may hand over more
        return future

    def _flush(self) -> None:
        self._flushing = self._loop.create_task(self._submit_waiting())

    async def _submit_waiting(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                submissions = [(request, partial(self._answered, future)) for request, future in batch]
                self.submit_calls += 1
                try:
                    await asyncio.to_thread(self.engine.submit_many, submissions)
                except Exception as exc:  # e.g. the thread pool shut down: these jobs fail, not the loop
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                self._drain()  # requests answered during submit (bad ones), without waiting for a wake-up
        finally:
            self._submitting = False

    def _answered(self, future: asyncio.Future, completion: Completion) -> None:
        """on_done, on the engine's step thread (or another): into the inbox; the loop is woken at the end
        of the step (or at once, from another thread)."""
        self._answers.append((future, completion))
        if threading.get_ident() == self._step_thread:
            self._deferred = True
        else:
            self._wake()

    def _iteration_done(self) -> None:
        """The engine's on_iteration, on its step thread: the step's answers are all in the inbox."""
        self._step_thread = threading.get_ident()
        if self._deferred:
            self._deferred = False
            self._wake()

    def _wake(self) -> None:
        if not self._wake_pending:
            self._wake_pending = True
            self.wakeups += 1
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Cleared before taking: an answer appended from here on either is taken below or wakes the loop again.
        self._wake_pending = False
        while self._answers:
            future, completion = self._answers.popleft()
            if not future.done():  # cancelled: the worker stopped waiting for it
                future.set_result(completion)
