"""The batched hand-off (worker/handoff.py) through a real engine, no Kafka: the jobs of one event-loop turn
reach the engine in one `submit_many` call on one thread hop, answers that arrive together come back in
one loop callback, each job gets its own answer (PEFT's tokens), a bad request fails alone, and a stopped
engine still answers every job."""

import asyncio
import threading

import pytest

from helpers import PeftOracle, until
from lorabus.scheduler import Engine, EngineConfig, Request, SamplingParams
from lorabus.worker.handoff import EngineHandoff

JOBS = 24
NEW_TOKENS = 3
WAIT_S = 60.0


def request(i: int, **overrides) -> Request:
    return Request(id=f"h-{i}", tenant="acme", prompt_ids=[5, 6, 7 + i % 11],
                   params=SamplingParams(max_new_tokens=overrides.pop("max_new_tokens", NEW_TOKENS)), **overrides)


class CountedEngine:
    """The real engine, with every submit_many call recorded (calling thread, batch size) and every answer
    counted once its on_done has returned."""

    def __init__(self, engine: Engine):
        self.engine, self.calls, self.answered = engine, [], 0
        self._lock, self.all_answered = threading.Lock(), threading.Event()
        self.expected = None
        self.go = threading.Event()  # submit_many waits for it (set: no wait)
        self.go.set()

    @property
    def on_iteration(self):
        return self.engine.on_iteration

    @on_iteration.setter
    def on_iteration(self, hook):
        self.engine.on_iteration = hook

    def submit(self, request, on_done):
        raise AssertionError("the hand-off submits one job at a time")

    def submit_many(self, submissions):
        self.calls.append((threading.current_thread(), len(submissions)))
        assert self.go.wait(WAIT_S)
        self.engine.submit_many([(r, self._counting(on_done)) for r, on_done in submissions])

    def _counting(self, on_done):
        def counted(completion):
            on_done(completion)
            with self._lock:
                self.answered += 1
                if self.answered == self.expected:
                    self.all_answered.set()
        return counted


@pytest.fixture(scope="module")
def engine(tiny_model):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16))
    engine.start()
    yield engine
    engine.stop()


async def hand_over(handoff: EngineHandoff, requests: list[Request]) -> list[asyncio.Task]:
    """One task per request created in one loop turn, as the worker does for the records of one poll."""
    async def job(r):
        return await handoff.generate(r)

    return [asyncio.create_task(job(r)) for r in requests]


async def test_one_turns_jobs_reach_the_engine_in_one_call_and_get_their_own_answers(engine, tiny_model):
    counted = CountedEngine(engine)
    handoff = EngineHandoff(counted)
    requests = [request(i) for i in range(JOBS)]
    completions = await asyncio.wait_for(asyncio.gather(*await hand_over(handoff, requests)), WAIT_S)
    assert [(thread is threading.main_thread(), size) for thread, size in counted.calls] == [(False, JOBS)]
    assert handoff.submit_calls == 1
    assert [c.id for c in completions] == [r.id for r in requests] and all(c.status == "ok" for c in completions)
    oracle = PeftOracle(tiny_model)
    for r, c in list(zip(requests, completions))[:11]:  # the distinct prompts
        assert c.token_ids == oracle.greedy(None, r.prompt_ids, NEW_TOKENS), r.id


async def test_the_answers_of_one_step_come_back_in_one_loop_callback(engine):
    counted = CountedEngine(engine)
    handoff = EngineHandoff(counted)
    await until(lambda: handoff.batching_answers, WAIT_S)  # one idle iteration of the step thread
    steps = engine.steps
    done = await asyncio.wait_for(asyncio.gather(*await hand_over(handoff, [request(i, max_new_tokens=1)
                                                                              for i in range(JOBS)])), WAIT_S)
    assert [c.status for c in done] == ["ok"] * JOBS
    # The old hand-off woke the loop once per job; now once per step that answered (one, for one-token jobs
    # that fit a step together, unless the step thread took the submissions in two iterations).
    assert engine.steps - steps <= 2
    assert handoff.wakeups <= engine.steps - steps < JOBS


async def test_answers_that_arrive_while_the_loop_is_busy_come_back_in_one_loop_callback(engine):
    counted = CountedEngine(engine)
    counted.expected = JOBS
    counted.go.clear()
    handoff = EngineHandoff(counted)
    tasks = await hand_over(handoff, [request(i, max_new_tokens=1) for i in range(JOBS)])
    await until(lambda: counted.calls, WAIT_S)  # the thread hop has begun; the jobs wait for `go`
    # From `go` on this blocks the loop while the engine answers every job: the inbox takes them all, and
    # one wake-up hands them out.
    counted.go.set()
    assert counted.all_answered.wait(WAIT_S)
    done = await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    assert handoff.wakeups == 1
    assert [c.status for c in done] == ["ok"] * JOBS


async def test_a_bad_request_fails_alone(engine):
    handoff = EngineHandoff(engine)
    out_of_vocab = Request(id="h-2", tenant="acme", prompt_ids=[5, 10**9])
    requests = [request(0), request(1, max_new_tokens=0), out_of_vocab, request(3)]
    done = await asyncio.wait_for(asyncio.gather(*await hand_over(handoff, requests)), WAIT_S)
    assert [(c.id, c.status) for c in done] == [("h-0", "ok"), ("h-1", "error"), ("h-2", "error"), ("h-3", "ok")]
    assert done[1].error_code == done[2].error_code == "invalid_job"
    assert handoff.submit_calls == 1


async def test_a_stopped_engine_answers_every_job(tiny_model):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16))
    engine.start()
    await asyncio.to_thread(engine.stop)
    handoff = EngineHandoff(engine)
    done = await asyncio.wait_for(asyncio.gather(*await hand_over(handoff, [request(i) for i in range(4)])), WAIT_S)
    assert [(c.status, c.error_code, c.error_message) for c in done] == [("error", "internal", "engine stopped")] * 4
