"""The engine without Kafka: PEFT parity across the Llama family and Phi-3, the Triton backend on the hot path,
seeded sampling independent of the batch, stop strings, EOS, and more adapters than device slots."""

import json
import time
import shutil
from pathlib import Path

import pytest

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from helpers import PeftOracle, make_peft_adapter, submit_all
from lorabus.worker.testing import build_tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _parity(model_dir, adapters, config, prompts, max_new=8, on_step=None, on_load=None):
    oracle = PeftOracle(model_dir)
    engine = Engine(str(model_dir), config)
    engine.on_step, engine.on_load = on_step, on_load
    for name, path in adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    try:
        requests = oracle.greedy_requests(adapters, prompts, max_new)
        results = submit_all(engine, requests)
    finally:
        engine.stop()
    oracle.assert_answers(adapters, requests, results)
    return engine


@pytest.mark.parametrize("model_type,overrides,some,every", [
    ("qwen2", dict(tie_word_embeddings=True), ["k_proj", "up_proj"], ALL),  # q/k/v biases, tied embeddings
    ("mistral", dict(head_dim=32), ["k_proj", "up_proj"], ALL),  # head_dim ≠ hidden/heads
    # MQA, biases everywhere
    ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True), ["k_proj", "up_proj"], ALL),
    # q/k/v and gate/up fused in the checkpoint and in PEFT's targets; half of each head rotates
    ("phi3", dict(partial_rotary_factor=0.5), ["qkv_proj", "down_proj"], PHI3_ALL),
])
def test_llama_family_matches_peft(tmp_path, model_type, overrides, some, every):
    model_dir = build_tiny_model(tmp_path / model_type, model_type=model_type, **overrides)
    adapters = {
        "a": make_peft_adapter(model_dir, tmp_path / "a", seed=1, r=2, lora_alpha=4, target_modules=some),
        "b": make_peft_adapter(model_dir, tmp_path / "b", seed=2, r=12, lora_alpha=6, target_modules=every),
    }
    prompts = ["the quick brown fox", "hello world", "summarize: the meeting", "0123456789", "lazy dog"] * 2
    _parity(model_dir, adapters, EngineConfig(kv_cache_mb=16, max_lora_rank=16), prompts)


def test_more_adapters_than_device_slots(tiny_model, peft_adapters):
    """Three adapters take turns in one device slot: no step mixes two, and each is loaded into the slot."""
    step_adapters, loads = [], []
    prompts = ["the quick brown fox", "hello world", "jobs arrive on kafka"] * 4
    _parity(tiny_model, peft_adapters, EngineConfig(kv_cache_mb=16, max_loras=1), prompts,
            on_step=lambda seqs, tokens, adapters, seconds: step_adapters.append(adapters),
            on_load=lambda key, seconds, error, source: loads.append((key, error, source)))
    assert step_adapters and max(step_adapters) == 1, f"adapters per step: {step_adapters}"
    assert {key for key, *_ in loads} == set(peft_adapters) and all(error is None for _, error, _ in loads), loads
    assert {source for *_, source in loads} == {"disk"}, loads  # each read its files once


def test_a_load_says_which_tier_it_read(tiny_model, peft_adapters):
    """on_load's source: an adapter's first load reads its files ("disk"); loaded back into the one device slot
    after another took it, it comes from the host-memory tier ("host")."""
    first, second = list(peft_adapters)[:2]
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16, max_loras=1))
    loads = []
    engine.on_load = lambda key, seconds, error, source: loads.append((key, error, source))
    for name in (first, second):
        engine.register(AdapterSpec(name, str(peft_adapters[name])))
    engine.start()
    try:
        for i, name in enumerate((first, second, first)):
            done = engine.generate(Request(f"r{i}", "t", name, prompt="hello world", params=SamplingParams(2)), 60)
            assert done.status == "ok", done
    finally:
        engine.stop()
    assert loads == [(first, None, "disk"), (second, None, "disk"), (first, None, "host")], loads


def test_hot_adapter_and_staggered_prefills_match_peft(tiny_model, peft_adapters, tmp_path, monkeypatch):
    """Steps without a padded grid on the CPU LoRA path match PEFT whichever plan runs them: a hot adapter
    decoding several sequences beside single ones (each token gathering its own weights, or a GEMM per
    segment) and a long prompt prefilling beside decoding sequences (short segments batched, the long one
    alone). The plan tuner's choice is replaced by a rotation through each shape's candidates, so successive
    steps of one shape run every plan, and each step builds its own LoRA mapping (a decode steady state
    would reuse the last one, with the plans chosen for it). The step loop runs here, on adapters warmed
    beforehand and with reordering off, so the batches do not depend on timing."""
    from lorabus import kernels
    from lorabus.kernels.plan_tuner import PlanTuner
    from lorabus.scheduler.runner import ModelRunner

    plans, turns = [], {}

    def rotate(self, group, shape, candidates):
        names = list(candidates)
        turn = turns[group, shape] = turns.get((group, shape), -1) + 1
        plans.append(names[turn % len(names)])
        return plans[-1]

    monkeypatch.setattr(PlanTuner, "choose", rotate)
    monkeypatch.setattr(ModelRunner, "_lora_mapping",
                        lambda self, slots, slots_dev: kernels.make_lora_mapping(slots_dev, self.num_slots))
    adapters = dict(peft_adapters)
    for i in range(2):
        adapters[f"extra{i}"] = make_peft_adapter(tiny_model, tmp_path / f"extra{i}", seed=10 + i, r=4, lora_alpha=8,
                                                  target_modules=["q_proj", "v_proj", "o_proj"])
    hot, b, c, d, e = adapters
    oracle = PeftOracle(tiny_model)
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16, max_running=8, max_lora_rank=16,
                                                  max_wait_ms=600_000, plan_tuning="first-use"))
    for name, path in adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.adapters.start()
    done = []

    def run_until(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(done) < count:
            assert time.monotonic() < deadline, f"{len(done)}/{count} jobs answered"
            engine.loop.iterate()

    long_prompt = "jobs arrive on the bus and every adapter answers its own tenant in the same forward pass"
    # Eight run at once (four on the hot adapter); the first to end lets the long prompts in beside them.
    specs = [(hot, "hello world", 3), (hot, "the quick brown fox", 8), (hot, "lazy dog", 8), (hot, "0123", 8),
             (b, "summarize: the meeting", 8), (c, "hello", 8), (d, "more words here", 8), (None, "base only", 8),
             (e, long_prompt, 5), (hot, long_prompt + " twice", 4)]
    try:
        for key in adapters:
            engine.warm(key, done.append)
        run_until(len(adapters))
        assert all(w.status == "ok" for w in done), done
        requests = [Request(f"r{i}", "t", name, prompt_ids=oracle.prompt_ids(prompt), params=SamplingParams(n))
                    for i, (name, prompt, n) in enumerate(specs)]
        assert len(requests[-2].prompt_ids) > 16  # a prefill segment far longer than the decode ones
        done.clear()
        plans.clear()
        for request in requests:
            engine.submit(request, done.append)
        run_until(len(requests))
    finally:
        engine.stop()
    assert {"token", "segment"} <= set(plans), f"no decode step gathered per token or ran per segment: {plans}"
    assert any(p.startswith("split+") for p in plans), f"no step split a long prefill segment from short ones: {plans}"
    oracle.assert_answers(adapters, requests, {c.id: c for c in done})


def test_triton_backend_on_the_hot_path(tiny_model, peft_adapters, monkeypatch):
    """The model's LoRA layers run the Triton kernels (interpreted on CPU) and still match PEFT."""
    from lorabus.kernels import torch_ops, triton_ops
    calls = []
    for module, name in ((triton_ops, "shrink"), (triton_ops, "expand"), (torch_ops, "apply_slot_major")):
        original = getattr(module, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    prompts = ["the quick brown fox", "hello world", "jobs arrive"]
    _parity(tiny_model, dict(list(peft_adapters.items())[:2]),
            EngineConfig(kv_cache_mb=16, lora_backend="triton", max_lora_rank=16), prompts, max_new=3)
    assert set(calls) == {"shrink", "expand"}  # the Triton kernels, never the torch path


def test_seeded_sampling_is_independent_of_the_batch(tiny_model, peft_adapters):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16))
    for name, path in peft_adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    try:
        params = SamplingParams(10, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
        alone = engine.generate(Request("alone", "t", "qv-r4", prompt="hello world", params=params), 60)
        crowd = [Request(f"n{i}", "t", name, prompt="the quick brown fox", params=SamplingParams(12))
                 for i, name in enumerate([None, *peft_adapters] * 2)]
        crowd.append(Request("again", "t", "qv-r4", prompt="hello world", params=params))
        other = dict(params.__dict__, seed=99)
        crowd.append(Request("other-seed", "t", "qv-r4", prompt="hello world", params=SamplingParams(**other)))
        results = submit_all(engine, crowd)
    finally:
        engine.stop()
    assert results["again"].token_ids == alone.token_ids
    assert results["other-seed"].token_ids != alone.token_ids


def _generate_all(model_dir, requests):
    engine = Engine(str(model_dir), EngineConfig(kv_cache_mb=16))
    engine.start()
    try:
        return [engine.generate(request, 60) for request in requests]
    finally:
        engine.stop()


def test_stop_strings(tiny_model):
    (free,) = _generate_all(tiny_model, [Request("free", "t", prompt="hello world", params=SamplingParams(12))])
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = free.text[len(free.text) // 2:][:3]
    assert stop
    (cut,) = _generate_all(tiny_model, [Request("cut", "t", prompt="hello world",
                                                params=SamplingParams(12, stop=(stop,)))])
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 12


def test_eos_ends_a_sequence(tiny_model, tmp_path):
    """The same weights with an eos_token_id that greedy decoding emits mid-way: generation stops there,
    with the EOS token as the last of `token_ids` and finish_reason "stop"."""
    request = Request("free", "t", prompt="hello world", params=SamplingParams(12))
    (free,) = _generate_all(tiny_model, [request])
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    # The last token that first appears at its position: greedy reaches it only there.
    eos_at = max(i for i, token in enumerate(free.token_ids) if token not in free.token_ids[:i])
    eos = free.token_ids[eos_at]
    model_dir = Path(shutil.copytree(tiny_model, tmp_path / "eos-model"))
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.exists():
            path.write_text(json.dumps({**json.loads(path.read_text()), "eos_token_id": eos}))
    (ended,) = _generate_all(model_dir, [request])
    assert ended.status == "ok", ended
    assert ended.finish_reason == "stop"
    assert ended.token_ids == free.token_ids[:eos_at + 1]


@pytest.mark.parametrize("max_step_tokens", [64, 1024])  # chunked prefill over cached prefixes; one-step prefill
def test_long_ragged_contexts_decode_as_alone(tiny_model, peft_adapters, max_step_tokens):
    """Sequences of 3..300 tokens (block size 16) batched together decode exactly what each does alone, and
    what PEFT does: block-table reads, padding to the longest table and batched (padded, masked) prefill
    change nothing."""
    import random

    rng = random.Random(0)
    lengths = [3, 17, 30, 150, 300]  # 17 and 30 share a padded prefill bucket
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in lengths]
    adapter = next(iter(peft_adapters))

    def run(indices):
        engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16, kv_block_size=16,
                                                      max_step_tokens=max_step_tokens))
        engine.register(AdapterSpec(adapter, str(peft_adapters[adapter])))
        engine.start()
        try:
            requests = [Request(f"r{i}", "t", adapter if i % 2 else None, prompt_ids=prompts[i],
                                params=SamplingParams(12)) for i in indices]
            results = submit_all(engine, requests)
        finally:
            engine.stop()
        assert all(c.status == "ok" for c in results.values()), results
        return {rid: c.token_ids for rid, c in results.items()}

    together = run(range(len(prompts)))
    alone = {}
    for i in range(len(prompts)):
        alone.update(run([i]))
    assert together == alone
    oracle = PeftOracle(tiny_model)
    for i, prompt in enumerate(prompts):
        oracle.assert_matches(peft_adapters[adapter] if i % 2 else None, prompt, together[f"r{i}"], 12, f"r{i}")


def test_prefetch_into_a_free_slot_only_never_evicts(tiny_model, peft_adapters):
    """The worker's look-ahead prefetch: loaded when a device slot is free, ignored (no eviction, no
    host-only load) when every slot is taken, where a plain prefetch evicts an idle adapter."""
    first, second, third = peft_adapters
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16, max_loras=1))
    for name, path in peft_adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()

    def until(condition):
        deadline = time.monotonic() + 30
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.01)
        return condition()

    try:
        engine.prefetch(first, free_slot_only=True)
        assert until(lambda: engine.resident() == [first])  # the slot was free
        engine.prefetch(second, free_slot_only=True)  # every slot taken: ignored
        engine.prefetch(third)  # a plain prefetch evicts the idle adapter; one loader thread, loads in order
        assert until(lambda: engine.resident() == [third])
        assert engine.stats()["host_adapters"] == 2  # first and third: second was never loaded
    finally:
        engine.stop()
