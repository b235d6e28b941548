"""Prefix caching keyed by adapter (docs/scheduling.md, "Prefix caching").

First the bookkeeping alone (scheduler/kv_cache.py's BlockAllocator and the policy's admission, no model):
the chain of block keys, LRU eviction, identities, what may be published. Then the engine on the tiny model
against PEFT with the cache on: shared prefixes across adapters (which must not share), prompts that differ
by one token at a block edge, a re-published version and a re-published mix member, a NaN or failed
sequence, chunked prefill, n > 1, prompt logprobs, and LRU eviction in a tiny cache. The hit counters
(Engine.prefix_cache_stats) are checked job by job, so a lookup that hits too much or too little fails
even where greedy tokens happen to agree."""

import math
import random

import pytest
import torch

from generation_oracle import prompt_logits
from helpers import MixOracle, PeftOracle, submit_all
from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams, mix_spec
from lorabus.scheduler.adapters import read_adapter
from lorabus.scheduler.kv_cache import BlockAllocator
from lorabus.scheduler.model import ATTENTION_BACKENDS
from lorabus.scheduler.policy import AdapterSlots, Scheduler, SchedulerLimits
from lorabus.scheduler.requests import Sequence
from helpers import FAILING_SEED, fail_sampling

BS = 4  # tokens per KV block in these tests: short prompts span several blocks
MAX_NEW = 4
QV, RS, MLP = "qv-r4", "all-r8-rslora", "mlp-r16-patterns"


def ids(seed: int, length: int) -> list[int]:
    """Prompt token ids clear of the tiny tokenizer's special ids."""
    rng = random.Random(seed)
    return [rng.randrange(8, 500) for _ in range(length)]


PREFIX = ids(1, 16)  # four full blocks
S1 = PREFIX + ids(2, 5)  # 21 tokens: five shareable blocks (the sixth holds the last prompt token)
S2 = PREFIX + ids(3, 5)  # shares the four prefix blocks with S1
E1 = PREFIX[:8] + [PREFIX[8] + 1] + PREFIX[9:] + ids(4, 5)  # differs at the first token of block 2: shares 2
E2 = PREFIX[:7] + [PREFIX[7] + 1] + PREFIX[8:] + ids(5, 5)  # differs at the last token of block 1: shares 1


# ---- the bookkeeping, no model -------------------------------------------------------------------


def test_allocator_chains_blocks_by_prefix_and_identity_and_evicts_tails_first():
    alloc = BlockAllocator(8, BS, prefix_cache=True)
    prompt = list(range(12))
    a = alloc.allocate(12)
    alloc.publish("x", prompt, a)
    assert alloc.cached_prefix("x", prompt, 3) == a
    assert alloc.cached_prefix("x", prompt, 2) == a[:2], "a lookup stops at its limit"
    assert alloc.cached_prefix("y", prompt, 3) == [], "another identity shares nothing"
    assert alloc.cached_prefix("x", [0, 1, 2, 3, 9, 5, 6, 7, 8, 9, 10, 11], 3) == a[:1], "the chain stops at a change"
    assert alloc.cached_prefix("x", prompt[4:], 2) == [], "a block's key holds its whole prefix, not its own tokens"
    alloc.free(a)
    assert alloc.num_free == 8 and alloc.num_cached == 3
    b = alloc.allocate(4 * 6)  # the five free blocks, then one evicted: the tail of the cached prefix
    assert a[2] in b and alloc.cached_prefix("x", prompt, 3) == a[:2]
    alloc.acquire(alloc.cached_prefix("x", prompt, 3), queried_tokens=12)
    assert alloc.num_free == 0 and alloc.allocate(1) is None, "held cached blocks are not free"
    assert (alloc.queried_tokens, alloc.hit_tokens) == (12, 8)
    alloc.free(b)
    alloc.free(a[:2])
    alloc.drop(lambda identity: identity == "x")
    assert alloc.num_cached == 0 and len(alloc._free) == 8


def test_a_prefix_cached_by_another_sequence_keeps_its_block_and_unsound_blocks_are_not_published():
    alloc = BlockAllocator(8, BS, prefix_cache=True, publishable=lambda blocks: 5 not in blocks)
    prompt = list(range(8))
    first, second = alloc.allocate(8), alloc.allocate(8)
    alloc.publish("x", prompt, first)
    alloc.publish("x", prompt, second)  # the same prefix: the first copy stays the cached one
    assert alloc.cached_prefix("x", prompt, 2) == first and alloc.num_cached == 2
    third = alloc.allocate(8)
    assert 5 in third
    alloc.publish("z", prompt, third)
    assert alloc.cached_prefix("z", prompt, 2) == [], "a block that fails the check publishes nothing"


def _sequence(prompt, adapter=None, max_new=2, **params):
    return Sequence(Request(f"r{random.random()}", "t", adapter, prompt_ids=prompt,
                            params=SamplingParams(max_new, **params)), prompt, 0.0, lambda c: None)


def test_admission_starts_past_the_cached_prefix_and_counts_only_fresh_blocks():
    alloc = BlockAllocator(16, BS, prefix_cache=True)
    sched = Scheduler(SchedulerLimits(max_running=8, max_step_tokens=64), alloc, AdapterSlots(1))
    first = _sequence(S1)
    sched.add(first)
    assert sched.schedule(0.0).batch == [(first, len(S1))]
    first.num_computed, first.output_ids = len(S1), [7]
    sched.publish(first)
    scored, hit = _sequence(S1, prompt_logprobs=1), _sequence(S2)
    for seq in (hit, scored):
        sched.add(seq)
    batch = dict(sched.schedule(0.0).batch)
    assert hit.num_computed == 4 * BS and hit.blocks[:4] == first.blocks[:4] and batch[hit] == len(S2) - 4 * BS
    assert len(hit.blocks) == alloc.blocks_for(hit.cost) and hit.cached_blocks == 4
    assert scored.num_computed == 0 and batch[scored] == len(S1), "prompt logprobs need every prompt row"
    assert alloc.num_free == 16 - 6 - 2 - 6, "the shared blocks are counted once"
    assert alloc.hit_tokens == 4 * BS and alloc.queried_tokens == 2 * 5 * BS, "looked up: the shareable blocks"


def test_content_changes_hide_old_prefixes_and_stop_late_publishers():
    alloc = BlockAllocator(32, BS, prefix_cache=True)
    slots = AdapterSlots(2)
    sched = Scheduler(SchedulerLimits(max_running=8, max_step_tokens=64), alloc, slots)
    for slot, key in enumerate(("a@1", "mix:a@1*0.5")):
        slots.take(slot, key, 0.0)
        slots.loaded(key, ok=True)

    def run(key, parts=()):
        seq = _sequence(S1, key)
        seq.adapter_parts = parts
        sched.add(seq)
        sched.schedule(0.0)
        seq.num_computed = len(S1)
        return seq

    plain, mix = run("a@1"), run("mix:a@1*0.5", ("a@1",))
    sched.publish(plain)
    sched.publish(mix)
    assert alloc.num_cached == 10
    late = run("a@1")
    assert late.cached_blocks == 5
    sched.invalidate_prefixes("a@1")  # a@1 re-published: its prefixes and its mixes' are gone
    assert alloc.num_cached == 0
    sched.publish(late)  # admitted before the change, it ran on the old content: it publishes nothing
    assert alloc.num_cached == 0
    assert run("a@1").cached_blocks == 0 and run("mix:a@1*0.5", ("a@1",)).cached_blocks == 0


# ---- the engine against PEFT ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle(tiny_model):
    return PeftOracle(tiny_model)


def _engine(model_dir, adapters: dict, **config) -> Engine:
    engine = Engine(str(model_dir), EngineConfig(**{"kv_cache_mb": 4, "kv_block_size": BS, **config}))
    assert engine.config.prefix_cache, "the prefix cache is on by default"
    for name, path in adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    return engine


class Hits:
    """The engine's hit counter, read around each batch of jobs."""

    def __init__(self, engine):
        self.engine, self.seen = engine, 0

    def delta(self) -> int:
        now = self.engine.prefix_cache_stats()["hit_tokens"]
        delta, self.seen = now - self.seen, now
        return delta


def _greedy(adapter, prompt, rid, max_new=MAX_NEW, **params):
    return Request(rid, "t", adapter, prompt_ids=list(prompt), params=SamplingParams(max_new, **params))


@pytest.mark.parametrize("backend", [b for b in ATTENTION_BACKENDS if b != "auto"])
def test_shared_prefixes_hit_only_their_own_adapter_and_equal_peft(tiny_model, peft_adapters, oracle, backend):
    adapters = {None: None, QV: peft_adapters[QV], RS: peft_adapters[RS]}
    # Every attention backend: each reads a cached prefix it did not write (in place, gathered, or copied in).
    engine = _engine(tiny_model, {QV: peft_adapters[QV], RS: peft_adapters[RS]}, attention_backend=backend)
    hits = Hits(engine)
    try:
        first = {}
        for name in adapters:  # the same prompt under each adapter, one after another: none shares another's
            first[name] = engine.generate(_greedy(name, S1, f"first-{name}"), 60)
            assert hits.delta() == 0, f"{name} hit blocks another adapter computed"
        # Then all together, interleaved: the same prompt again, a shared prefix with a new tail, and prompts
        # that differ from the prefix by one token on either side of a block edge.
        requests = [_greedy(name, prompt, f"{label}-{name}")
                    for label, prompt in (("s2", S2), ("e1", E1), ("s1", S1), ("e2", E2)) for name in adapters]
        results = submit_all(engine, requests)
        assert hits.delta() == len(adapters) * (4 + 2 + 5 + 1) * BS
        stats = engine.prefix_cache_stats()
    finally:
        engine.stop()
    for name, answer in first.items():
        oracle.assert_matches(adapters[name], S1, answer.token_ids, MAX_NEW, f"first-{name}")
    oracle.assert_answers(adapters, requests, results)
    assert stats["queried_tokens"] == len(adapters) * 5 * 5 * BS  # five jobs each, five shareable blocks each
    assert 0 < stats["cached_blocks"] <= engine.scheduler.blocks.num_blocks


def test_a_republished_version_and_a_mix_of_it_never_hit_their_old_blocks(tiny_model, peft_adapters, tmp_path):
    engine = _engine(tiny_model, {}, max_lora_rank=32)
    hits = Hits(engine)
    old, rs = AdapterSpec("ad@1", str(peft_adapters[QV])), AdapterSpec("rs@1", str(peft_adapters[RS]))
    engine.register(old)
    engine.register(rs)
    mix_old = mix_spec([(old, 0.5), (rs, -0.7)])
    engine.register(mix_old)
    try:
        answers = []
        for key in (old.key, old.key, mix_old.key, mix_old.key):
            answers.append(engine.generate(_greedy(key, S1, f"before-{len(answers)}"), 60))
        assert hits.delta() == 2 * 5 * BS, "the second job of each adapter hits what the first computed"
        new = AdapterSpec("ad@1", str(peft_adapters[MLP]))  # the same key over new content
        engine.register(new)
        mix_new = mix_spec([(new, 0.5), (rs, -0.7)])
        engine.register(mix_new)  # as the worker does: the mix built again from its members' current specs
        after = [engine.generate(_greedy(key, S1, f"after-{i}"), 60) for i, key in enumerate((new.key, mix_new.key))]
        assert hits.delta() == 0, "blocks computed with the old content served the new"
        assert engine.prefix_cache_stats()["cached_blocks"] == 2 * 5, "the old blocks are dropped"
        again = engine.generate(_greedy(new.key, S1, "again"), 60)
        assert hits.delta() == 5 * BS
    finally:
        engine.stop()
    before_oracle = MixOracle(tiny_model, {"ad": peft_adapters[QV], "rs": peft_adapters[RS]})
    after_oracle = MixOracle(tiny_model, {"ad": peft_adapters[MLP], "rs": peft_adapters[RS]})
    mix = (("ad", 0.5), ("rs", -0.7))
    for i, which in enumerate((peft_adapters[QV], peft_adapters[QV], mix, mix)):
        before_oracle.assert_matches(which, S1, answers[i].token_ids, MAX_NEW, f"before-{i}")
    after_oracle.assert_matches(peft_adapters[MLP], S1, after[0].token_ids, MAX_NEW, "after ad@1")
    after_oracle.assert_matches(mix, S1, after[1].token_ids, MAX_NEW, "after the mix")
    after_oracle.assert_matches(peft_adapters[MLP], S1, again.token_ids, MAX_NEW, "again")


def _poisoned(weights):
    for module, (a, b, scale) in weights.modules.items():
        weights.modules[module] = (torch.full_like(a, math.nan), torch.full_like(b, math.nan), scale)
    return weights


def test_nan_and_failed_sequences_publish_nothing(tiny_model, peft_adapters, oracle, monkeypatch):
    fail_sampling(monkeypatch)
    engine = _engine(tiny_model, {QV: peft_adapters[QV]})
    poison = AdapterSpec("poison@1", str(peft_adapters[QV]))
    engine.register(poison)
    weights = read_adapter(poison.key, poison.path, engine.model.shapes, engine.config.max_lora_rank, engine.dtype)
    engine.adapters.host_cache.put(poison, _poisoned(weights))  # past validation, as a corrupt pool would be
    hits = Hits(engine)
    try:
        assert engine.generate(_greedy(poison.key, S1, "nan"), 60).status == "ok"
        assert engine.generate(_greedy(poison.key, S1, "nan-again"), 60).status == "ok"
        failed = engine.generate(_greedy(QV, S1, "failed", temperature=0.7, seed=FAILING_SEED), 60)
        assert failed.status == "error" and "injected" in failed.error_message
        assert engine.prefix_cache_stats()["cached_blocks"] == 0 and hits.delta() == 0
        clean = [engine.generate(_greedy(QV, S1, f"clean-{i}"), 60) for i in range(2)]
        assert hits.delta() == 5 * BS, "a sound sequence publishes (the checks above are not vacuous)"
    finally:
        engine.stop()
    for answer in clean:
        oracle.assert_matches(peft_adapters[QV], S1, answer.token_ids, MAX_NEW, answer.id)


def test_chunked_prefill_n_samples_and_prompt_logprobs(tiny_model, peft_adapters, oracle):
    # 8 tokens a step: prompts are prefilled in chunks, the cached prefix's remainder too.
    engine = _engine(tiny_model, {QV: peft_adapters[QV]}, max_step_tokens=8, max_running=8)
    hits = Hits(engine)
    try:
        warm = engine.generate(_greedy(QV, S1, "warm"), 60)
        requests = [_greedy(QV, S2, "s2"), _greedy(None, S1, "base"), Request("n2", "t", QV, prompt_ids=S1, n=2,
                                                                             params=SamplingParams(MAX_NEW))]
        results = submit_all(engine, requests)
        assert hits.delta() == (4 + 5) * BS
        after_n = engine.generate(_greedy(None, S1, "base-again"), 60)
        assert hits.delta() == 5 * BS
        queried = engine.prefix_cache_stats()["queried_tokens"]
        scored = engine.generate(_greedy(QV, S1, "scored", prompt_logprobs=0), 60)
        assert hits.delta() == 0 and engine.prefix_cache_stats()["queried_tokens"] == queried
    finally:
        engine.stop()
    adapters = {None: None, QV: peft_adapters[QV]}
    oracle.assert_matches(peft_adapters[QV], S1, warm.token_ids, MAX_NEW, "warm")
    oracle.assert_answers(adapters, requests, results)
    assert [c.token_ids for c in results["n2"].choices] == [results["n2"].token_ids] * 2
    oracle.assert_matches(None, S1, after_n.token_ids, MAX_NEW, "base-again")
    oracle.assert_matches(peft_adapters[QV], S1, scored.token_ids, MAX_NEW, "scored")
    want = torch.log_softmax(prompt_logits(tiny_model, peft_adapters[QV], S1), dim=-1)
    got = scored.prompt_logprobs
    assert len(got) == len(S1) and got[0] is None
    for i, entry in enumerate(got[1:], start=1):
        assert entry.id == S1[i] and math.isclose(entry.logprob, float(want[i - 1, S1[i]]), abs_tol=1e-4), i


def test_lru_eviction_in_a_tiny_cache_keeps_answers_right(tiny_model, peft_adapters, oracle):
    engine = _engine(tiny_model, {QV: peft_adapters[QV]})
    # 16 blocks for jobs of 6 (21 prompt + 3 new tokens): a fourth prompt evicts what was used least recently.
    blocks = engine.scheduler.blocks
    engine.scheduler.blocks = BlockAllocator(16, BS, prefix_cache=True, publishable=blocks.publishable)
    hits = Hits(engine)
    prompts = {name: ids(10 + i, 21) for i, name in enumerate("ABCD")}
    order = "ABCADBA"
    try:
        answers, seen = [], []
        for i, name in enumerate(order):
            answers.append(engine.generate(_greedy(QV, prompts[name], f"{name}{i}", max_new=3), 60))
            seen.append(hits.delta() // BS)
            assert engine.scheduler.blocks.num_cached <= 16
    finally:
        engine.stop()
    # A again hits (C and B were used after it, but blocks were still free); D evicts B, the least recently
    # released; B again finds nothing and evicts C; A, released after C, is still cached.
    assert seen == [0, 0, 0, 5, 0, 0, 5]
    for name, answer in zip(order, answers):
        oracle.assert_matches(peft_adapters[QV], prompts[name], answer.token_ids, 3, answer.id)
