"""Engine.stop() cannot hang and leaves no job unanswered (no Kafka).

The step thread drains before the adapter loader stops, so jobs waiting on a load still run; a warm-up
is a job like any other; past `stop(timeout_s)` every job still held is answered `internal`; stop()
returns within timeout_s + 2 * THREAD_JOIN_S whatever a thread is stuck in. Each stop() runs in a thread
joined with a bound, so a hang fails the test instead of stalling the suite.
"""

import threading
import time

import pytest

from lorabus.scheduler import adapter_manager
from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.engine import THREAD_JOIN_S

SLACK_S = 5.0  # scheduling noise on a loaded machine, on top of the bound stop() promises
WAIT_S = 60.0  # for things that happen within milliseconds when nothing is wrong
STEP_DELAY_S = 0.05  # an on_step hook that sleeps makes every step this much slower


class Answers:
    """on_done for many jobs: each answer recorded once, waitable by id."""

    def __init__(self):
        self.completions, self._arrived = {}, threading.Condition()

    def __call__(self, completion):
        with self._arrived:
            assert completion.id not in self.completions, f"{completion.id} answered twice"
            self.completions[completion.id] = completion
            self._arrived.notify_all()

    def wait(self, *ids, timeout=WAIT_S):
        with self._arrived:
            assert self._arrived.wait_for(lambda: all(i in self.completions for i in ids), timeout), (
                f"unanswered: {[i for i in ids if i not in self.completions]}")
        return [self.completions[i] for i in ids]


class GatedReads:
    """Reads of one adapter block until `open` is set: a load as slow as the test needs."""

    def __init__(self, monkeypatch, key):
        self.reading, self.open = threading.Event(), threading.Event()
        original = adapter_manager.read_adapter

        def read(k, *args):
            if k == key:
                self.reading.set()
                self.open.wait()
            return original(k, *args)

        monkeypatch.setattr(adapter_manager, "read_adapter", read)


def _engine(model_dir, adapters, **config):
    engine = Engine(str(model_dir), EngineConfig(**{"kv_cache_mb": 4, "max_loras": 1, **config}))
    for name, path in adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    return engine


def _stop(engine, timeout_s=None, bound_s=WAIT_S) -> float:
    """engine.stop(timeout_s) in a thread (engine.stop() when None); fails if it raised or has not returned
    within bound_s; returns its seconds."""
    errors = []

    def stop():
        try:
            engine.stop() if timeout_s is None else engine.stop(timeout_s)
        except Exception as exc:
            errors.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=stop, daemon=True)
    thread.start()
    thread.join(bound_s)
    assert not thread.is_alive(), f"stop() still blocked after {bound_s:.0f} s"
    assert not errors, errors
    return time.monotonic() - started


def _job(rid, adapter=None, max_new=4):
    return Request(rid, "t", adapter, prompt="hello world", params=SamplingParams(max_new))


def test_stop_drains_jobs_that_wait_on_adapter_loads(tiny_model, peft_adapters, monkeypatch):
    """One device slot, two adapters: b's load can only start after a's jobs finish, i.e. after stop()
    began. The loader must still be there for it (it used to be stopped first: stop() hung)."""
    gate = GatedReads(monkeypatch, "qv-r4")
    engine = _engine(tiny_model, peft_adapters)
    answers = Answers()
    try:
        engine.submit(_job("a", "qv-r4"), answers)
        engine.submit(_job("b", "all-r8-rslora"), answers)
        assert gate.reading.wait(WAIT_S)
        threading.Timer(0.2, gate.open.set).start()  # a's load finishes while stop() drains
        _stop(engine)
    finally:
        gate.open.set()
    a, b = answers.wait("a", "b", timeout=0)
    assert a.status == "ok" and b.status == "ok", (a, b)
    assert len(a.token_ids) == len(b.token_ids) == 4


def test_stop_answers_a_job_whose_adapter_load_outlasts_the_timeout(tiny_model, peft_adapters, monkeypatch):
    gate = GatedReads(monkeypatch, "qv-r4")
    engine = _engine(tiny_model, peft_adapters)
    answers = Answers()
    timeout_s = 0.5
    try:
        engine.submit(_job("stuck", "qv-r4"), answers)
        engine.submit(_job("base"), answers)  # needs no adapter: it runs during the drain
        assert gate.reading.wait(WAIT_S)
        seconds = _stop(engine, timeout_s)
    finally:
        gate.open.set()
    assert seconds <= timeout_s + 2 * THREAD_JOIN_S + SLACK_S, f"stop() took {seconds:.1f} s"
    stuck, base = answers.wait("stuck", "base", timeout=0)
    assert (stuck.status, stuck.error_code, stuck.error_message) == ("error", "internal", "engine stopped"), stuck
    assert base.status == "ok", base


@pytest.mark.parametrize("slot", ["free", "busy"])
def test_stop_right_after_warm_answers_the_warmup(tiny_model, peft_adapters, slot):
    """warm() is a job in flight: stop() waits for its load and its step (it used to hang instead). With the
    one device slot busy, the warm-up's load can only start once stop() has begun."""
    engine = _engine(tiny_model, peft_adapters)
    answers = Answers()
    if slot == "busy":
        stepped = threading.Event()
        engine.on_step = lambda *_: (stepped.set(), time.sleep(STEP_DELAY_S))
        engine.submit(_job("busy", "qv-r4", max_new=8), answers)
        assert stepped.wait(WAIT_S), "the job never ran"
    engine.warm("all-r8-rslora", answers)
    _stop(engine)
    (warmup,) = answers.wait("warmup:all-r8-rslora", timeout=0)
    assert warmup.status == "ok", warmup
    assert engine.resident() == ["all-r8-rslora"]
    if slot == "busy":
        assert answers.wait("busy", timeout=0)[0].status == "ok"


def test_stop_answers_a_job_still_running_at_the_timeout_internal(tiny_model, peft_adapters):
    engine = _engine(tiny_model, peft_adapters)
    stepped = threading.Event()

    def slow_step(*_):  # 400 tokens take 20 s, far past the timeout
        stepped.set()
        time.sleep(STEP_DELAY_S)

    engine.on_step = slow_step
    answers = Answers()
    timeout_s = 0.3
    engine.submit(_job("long", max_new=400), answers)
    assert stepped.wait(WAIT_S), "the job never ran"
    seconds = _stop(engine, timeout_s)
    assert seconds <= timeout_s + 2 * THREAD_JOIN_S + SLACK_S, f"stop() took {seconds:.1f} s"
    (long,) = answers.wait("long", timeout=0)
    assert (long.status, long.error_code, long.error_message) == ("error", "internal", "engine stopped"), long
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


@pytest.mark.parametrize("started", [True, False], ids=["started", "never-started"])
def test_a_job_submitted_after_stop_is_answered(tiny_model, started):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=4))
    if started:
        engine.start()
    answers = Answers()
    engine.submit(_job("before"), answers)  # held when stop() begins: drained (started) or answered internal
    _stop(engine)
    engine.submit(_job("after"), answers)
    before, after = answers.wait("before", "after", timeout=0)
    assert before.status == ("ok" if started else "error"), before
    assert (after.status, after.error_code, after.error_message) == ("error", "internal", "engine stopped"), after
