"""Hostile input against the engine (no Kafka): whatever one job brings (a seed out of range, degenerate
sampling numbers, an adapter full of NaN, stale NaN in the KV cache) or whatever fails while serving it,
only that job is affected. Every other job still equals PEFT's greedy tokens, every job is answered,
and the step thread keeps running."""

import math

import pytest
import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.adapters import read_adapter
from lorabus.scheduler.sampling import Sampler
from helpers import FAILING_SEED, fail_sampling
from helpers import PeftOracle, submit_all

PROMPTS = ["the quick brown fox", "hello world", "summarize: the meeting moved to thursday",
           "jobs arrive on kafka", "0123456789", "lazy dog"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def oracle(tiny_model):
    return PeftOracle(tiny_model)


def _engine(model_dir, adapters, **config):
    engine = Engine(str(model_dir), EngineConfig(**{"kv_cache_mb": 4, **config}))
    for name, path in adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    return engine


def _greedy_neighbours(oracle, adapters, count=8, prefix="g"):
    """Greedy jobs across the base model and every adapter: the ones that must not notice anything."""
    return oracle.greedy_requests(adapters, PROMPTS, MAX_NEW, count, prefix)


# ---- 1. a failure belongs to its job, never to the step thread --------------------------------------


def test_seed_beyond_the_generators_range_is_served(tiny_model, peft_adapters, oracle):
    adapters = dict(list(peft_adapters.items())[:2])
    engine = _engine(tiny_model, adapters)
    huge = SamplingParams(MAX_NEW, temperature=0.7, seed=2**64)
    try:
        greedy = _greedy_neighbours(oracle, adapters)
        odd = [Request(f"huge{i}", "t", name, prompt="hello world", params=huge)
               for i, name in enumerate([None, "qv-r4"])]
        odd.append(Request("negative", "t", None, prompt="hello world",
                           params=SamplingParams(MAX_NEW, temperature=0.7, seed=-(2**70))))
        results = submit_all(engine, greedy + odd)
        again = engine.generate(Request("again", "t", None, prompt="hello world", params=huge), 60)
    finally:
        engine.stop()
    oracle.assert_answers(adapters, greedy, results)
    for request in odd:
        assert results[request.id].status == "ok", results[request.id]
        assert len(results[request.id].token_ids) == MAX_NEW
    assert again.token_ids == results["huge0"].token_ids, "a seed must make sampling reproducible, whatever its size"


def test_sampler_maps_any_int_seed_deterministically():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    for seed in (2**64, -(2**63) - 1, 10**40, -(10**40)):
        params = SamplingParams(temperature=1.0, seed=seed)
        first, second = Sampler(params, cpu), Sampler(params, cpu)
        assert [first.sample(logits) for _ in range(10)] == [second.sample(logits) for _ in range(10)]
    # Seeds torch already accepted keep the stream torch gives them, so existing seeded jobs are unchanged.
    for seed in (-5, 0, 2**63, 2**64 - 1):
        expected = torch.Generator().manual_seed(seed).initial_seed()
        assert Sampler(SamplingParams(temperature=1.0, seed=seed), cpu).generator.initial_seed() == expected


def test_a_failure_after_the_forward_pass_fails_only_its_job(tiny_model, peft_adapters, oracle, monkeypatch):
    adapters = dict(list(peft_adapters.items())[:2])
    fail_sampling(monkeypatch)
    engine = _engine(tiny_model, adapters)
    try:
        greedy = _greedy_neighbours(oracle, adapters)
        bad = Request("bad", "t", "qv-r4", prompt="hello world",
                      params=SamplingParams(MAX_NEW, temperature=0.7, seed=FAILING_SEED))
        # A failing on_done must not take its neighbours down either.
        boom = Request("boom", "t", None, prompt="hello world", params=SamplingParams(2))
        engine.submit(boom, lambda c: 1 / 0)
        results = submit_all(engine, greedy + [bad])
        after = engine.generate(Request("after", "t", "qv-r4", prompt="hello world",
                                        params=SamplingParams(MAX_NEW)), 60)
    finally:
        engine.stop()
    assert results["bad"].status == "error" and results["bad"].error_code == "internal", results["bad"]
    assert "injected sampling failure" in results["bad"].error_message
    oracle.assert_answers(adapters, greedy, results)
    assert after.status == "ok"


def test_the_step_loop_survives_errors_outside_the_forward_pass(tiny_model, peft_adapters, oracle):
    adapters = dict(list(peft_adapters.items())[:2])
    engine = _engine(tiny_model, adapters)
    try:
        engine.prefetch("no-such-adapter@1")  # a key nobody registered
        first = engine.generate(Request("first", "t", None, prompt="hello world",
                                        params=SamplingParams(MAX_NEW)), 60)
        assert first.status == "ok", first

        # Metrics hooks that raise: the jobs are served regardless.
        def broken_hook(*args):
            raise RuntimeError("hook")

        engine.on_step = engine.on_load = broken_hook
        hooked = _greedy_neighbours(oracle, adapters, count=3, prefix="h")
        results = submit_all(engine, hooked)
        oracle.assert_answers(adapters, hooked, results)
        engine.on_step = engine.on_load = None

        # A scheduling failure: the jobs it held are answered `internal`, and the loop goes on.
        schedule, calls = engine.scheduler.schedule, []

        def failing_schedule(now):
            calls.append(now)
            if len(calls) == 2:
                raise RuntimeError("injected scheduling failure")
            return schedule(now)

        engine.scheduler.schedule = failing_schedule
        held = _greedy_neighbours(oracle, adapters, count=4, prefix="s")
        results = submit_all(engine, held)
        engine.scheduler.schedule = schedule
        failed = [c for c in results.values() if c.status == "error"]
        assert failed and all(c.error_code == "internal" for c in failed), results
        oracle.assert_answers(adapters, [r for r in held if results[r.id].status == "ok"], results)
        later = _greedy_neighbours(oracle, adapters, count=4, prefix="l")
        results = submit_all(engine, later)
        oracle.assert_answers(adapters, later, results)
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_pinned"] == 0
    finally:
        engine.stop()


# ---- 2. sampling of one job never fails another's step ---------------------------------------------


def test_degenerate_sampling_numbers_stay_with_their_job(tiny_model, peft_adapters, oracle):
    adapters = dict(list(peft_adapters.items())[:2])
    engine = _engine(tiny_model, adapters)
    odd_params = {
        "tiny-temperature": SamplingParams(MAX_NEW, temperature=1e-320, seed=1),
        "tiny-top-p": SamplingParams(MAX_NEW, temperature=0.7, top_p=1e-300, seed=2),
        "zero-top-p": SamplingParams(MAX_NEW, temperature=0.7, top_p=0.0, seed=3),
        "huge-temperature": SamplingParams(MAX_NEW, temperature=1e308, top_k=5, seed=4),
    }
    try:
        greedy = _greedy_neighbours(oracle, {"all-r8-rslora": adapters["all-r8-rslora"]})
        ids = oracle.prompt_ids("hello world")
        odd = [Request(name, "t", "qv-r4", prompt_ids=ids, params=p) for name, p in odd_params.items()]
        results = submit_all(engine, greedy + odd)
    finally:
        engine.stop()
    oracle.assert_answers(adapters, greedy, results)
    for request in odd:
        c = results[request.id]
        assert c.status == "ok" or c.error_code == "internal", c
    # As the temperature or top_p goes to 0, sampling becomes greedy: PEFT is the oracle for those too.
    for name in ("tiny-temperature", "tiny-top-p", "zero-top-p"):
        assert results[name].status == "ok", results[name]
        oracle.assert_matches(adapters["qv-r4"], ids, results[name].token_ids, MAX_NEW, name)


@pytest.mark.parametrize("case", ["nan", "all-nan", "inf", "minus-inf", "all-minus-inf", "huge"])
@pytest.mark.parametrize("params", [dict(temperature=1e-320), dict(temperature=0.7, top_p=1e-300),
                                    dict(temperature=0.7, top_k=3), dict(temperature=1e308)],
                         ids=["tiny-t", "tiny-p", "top-k", "huge-t"])
def test_sampler_always_returns_a_token_of_the_vocabulary(case, params):
    vocab = 32
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1))
    best = int(logits.argmax())
    if case == "nan":
        logits[::3] = math.nan
        best = int(torch.nan_to_num(logits, nan=-math.inf).argmax())
    elif case == "all-nan":
        logits[:] = math.nan
    elif case == "inf":
        logits[5] = math.inf
        best = 5
    elif case == "minus-inf":
        logits[1::2] = -math.inf
        best = int(logits.argmax())
    elif case == "all-minus-inf":
        logits[:] = -math.inf
    elif case == "huge":
        logits = logits * 1e38
    sampler = Sampler(SamplingParams(seed=7, **params), torch.device("cpu"))
    tokens = [sampler.sample(logits) for _ in range(20)]
    assert all(isinstance(t, int) and 0 <= t < vocab for t in tokens)
    vanishing = sampler.params.temperature < 1e-300 or sampler.params.top_p < 1e-300
    if case not in ("all-nan", "all-minus-inf") and vanishing:
        assert set(tokens) == {best}, "a vanishing temperature or top_p is greedy over the finite logits"
    if case in ("nan", "minus-inf"):
        assert all(math.isfinite(logits[t]) for t in tokens), "a NaN or -inf logit was drawn"


# ---- 4. a sequence's numbers never reach another sequence's rows -----------------------------------


def _poisoned(weights):
    """The same adapter with NaN everywhere in A and B (what a corrupt file would give without validation)."""
    for module, (a, b, scale) in weights.modules.items():
        weights.modules[module] = (torch.full_like(a, math.nan), torch.full_like(b, math.nan), scale)
    return weights


def _poison_free_kv(engine):
    """NaN into every KV block no running sequence holds."""
    bs = engine.kv.block_size
    held = {b for seq in engine.scheduler.running for b in seq.blocks}
    for block in range(engine.scheduler.blocks.num_blocks):
        if block not in held:
            engine.kv.k[:, block * bs:(block + 1) * bs] = math.nan
            engine.kv.v[:, block * bs:(block + 1) * bs] = math.nan


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_adapter_and_stale_nan_kv_reach_no_other_sequence(tiny_model, peft_adapters, oracle, backend):
    adapters = dict(list(peft_adapters.items())[:2])
    # Small steps: prefill is chunked, so steps mix decode rows, first chunks and later chunks.
    engine = _engine(tiny_model, adapters, max_loras=3, max_step_tokens=24, lora_backend=backend)
    poison = AdapterSpec("poison@1", str(adapters["qv-r4"]))
    engine.register(poison)
    # Bypass validation: the loader takes host-cached weights as they are and writes them into a slot.
    weights = read_adapter(poison.key, poison.path, engine.model.shapes, engine.config.max_lora_rank, engine.dtype)
    engine.adapters.host_cache.put(poison, _poisoned(weights))
    try:
        # One poisoned job first: its NaN K/V stay behind in the blocks it frees.
        first = engine.generate(Request("p-first", "t", poison.key, prompt="hello world",
                                        params=SamplingParams(MAX_NEW)), 60)
        assert first.status == "ok"
        _poison_free_kv(engine)
        names = [poison.key, None, *adapters, poison.key]
        requests = [Request(f"r{i}", "t", names[i % len(names)],
                            prompt_ids=oracle.prompt_ids(PROMPTS[i % len(PROMPTS)] + " x" * (i % 4)),
                            params=SamplingParams(MAX_NEW + i % 3))
                    for i in range(15)]
        results = submit_all(engine, requests)
    finally:
        engine.stop()
    clean = [r for r in requests if r.adapter != poison.key]
    assert len(clean) == 9
    oracle.assert_answers(adapters, clean, results)


# ---- input the engine refuses at submit, before it can reach a step --------------------------------


def test_meaningless_numbers_are_refused_at_submit(tiny_model):
    engine = _engine(tiny_model, {})
    bad = {
        "negative-id": dict(prompt_ids=[5, -1]),
        "float-id": dict(prompt_ids=[5, 6.0]),
        "nan-temperature": dict(params=SamplingParams(4, temperature=math.nan)),
        "inf-temperature": dict(params=SamplingParams(4, temperature=math.inf)),
        "negative-temperature": dict(params=SamplingParams(4, temperature=-1.0)),
        "nan-top-p": dict(params=SamplingParams(4, temperature=1.0, top_p=math.nan)),
        "negative-top-k": dict(params=SamplingParams(4, temperature=1.0, top_k=-3)),
        "zero-new-tokens": dict(params=SamplingParams(0)),
        "float-seed": dict(params=SamplingParams(4, temperature=1.0, seed=1.5)),
    }
    try:
        requests = [Request(name, "t", **{"prompt_ids": [5, 6, 7], **fields}) for name, fields in bad.items()]
        requests.append(Request("fine", "t", prompt_ids=[5, 6, 7], params=SamplingParams(4)))
        results = submit_all(engine, requests)
    finally:
        engine.stop()
    for name in bad:
        assert results[name].status == "error" and results[name].error_code == "invalid_job", results[name]
    assert results["fine"].status == "ok"


def test_kv_cache_limit_is_in_whole_blocks(tmp_path):
    """A job is refused `prompt_too_long` at submit exactly when its blocks exceed the cache's."""
    from lorabus.worker.testing import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "m", max_position_embeddings=4096)  # the KV cache, not the model, limits
    engine = _engine(model_dir, {}, kv_cache_mb=1, kv_block_size=48, max_step_tokens=1024)
    blocks = engine.scheduler.blocks
    capacity = blocks.num_blocks * blocks.block_size
    token_bytes = engine.kv.k[0, 0].nbytes * 2 * len(engine.model.layers)
    # 1 MiB holds more tokens than whole 48-token blocks do: a byte count would let a too-long job in.
    assert capacity < (1 << 20) // token_bytes and capacity < engine.max_model_len
    try:
        fits = Request("fits", "t", prompt_ids=[5] * (capacity - 4), params=SamplingParams(4))
        over = Request("over", "t", prompt_ids=[5] * (capacity - 3), params=SamplingParams(4))
        results = submit_all(engine, [fits, over])
    finally:
        engine.stop()
    assert results["over"].status == "error" and results["over"].error_code == "prompt_too_long", results["over"]
    assert results["fits"].status == "ok" and len(results["fits"].token_ids) == 4, results["fits"]
