"""The engine without Kafka: PEFT parity across the Llama family, the Triton backend on the hot path,
seeded sampling independent of the batch, stop strings, and more adapters than device slots."""

import threading

import pytest

from scheduler import AdapterSpec, Engine, EngineConfig, GenerationRequest, SamplingParams
from tests.helpers import PeftOracle, make_peft_adapter
from worker.samples import build_tiny_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _submit_all(engine, requests, timeout=120):
    """Submit together (so they share batches) and wait for every completion."""
    done, results = threading.Event(), {}

    def on_done(c):
        results[c.id] = c
        if len(results) == len(requests):
            done.set()

    for request in requests:
        engine.submit(request, on_done)
    assert done.wait(timeout), f"only {len(results)}/{len(requests)} completed"
    return results


def _parity(model_dir, adapters, config, prompts, max_new=8):
    oracle = PeftOracle(model_dir)
    engine = Engine(str(model_dir), config)
    for name, path in adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    try:
        names = [None, *adapters]
        requests = [GenerationRequest(f"r{i}", "t", names[i % len(names)], prompt_ids=oracle.prompt_ids(p),
                                      params=SamplingParams(max_new))
                    for i, p in enumerate(prompts)]
        results = _submit_all(engine, requests)
    finally:
        engine.stop()
    for request in requests:
        c = results[request.id]
        assert c.status == "ok", c
        oracle.assert_matches(adapters.get(request.adapter), request.prompt_ids, c.token_ids, max_new, request.id)
    return engine


@pytest.mark.parametrize("model_type,overrides", [
    ("qwen2", dict(tie_word_embeddings=True)),  # q/k/v biases, tied embeddings
    ("mistral", dict(head_dim=32)),  # head_dim ≠ hidden/heads
    ("llama", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),  # MQA, biases everywhere
])
def test_llama_family_matches_peft(tmp_path, model_type, overrides):
    model_dir = build_tiny_model(tmp_path / model_type, model_type=model_type, **overrides)
    adapters = {
        "a": make_peft_adapter(model_dir, tmp_path / "a", seed=1, r=2, lora_alpha=4, target_modules=["k_proj", "up_proj"]),
        "b": make_peft_adapter(model_dir, tmp_path / "b", seed=2, r=12, lora_alpha=6, target_modules=ALL),
    }
    prompts = ["the quick brown fox", "hello world", "summarize: the meeting", "0123456789", "lazy dog"] * 2
    _parity(model_dir, adapters, EngineConfig(kv_cache_mb=16, max_lora_rank=16), prompts)


def test_more_adapters_than_device_slots(tiny_model, peft_adapters):
    prompts = ["the quick brown fox", "hello world", "jobs arrive on kafka"] * 4
    engine = _parity(tiny_model, peft_adapters, EngineConfig(kv_cache_mb=16, max_loras=1), prompts)
    assert engine.max_loras == 1
    assert engine.stats()["adapter_slots_used"] <= 1


def test_triton_backend_on_the_hot_path(tiny_model, peft_adapters, monkeypatch):
    """The model's LoRA layers run the Triton kernels (interpreted on CPU) and still match PEFT."""
    import kernels

    calls = []
    for name in ("lora_shrink", "lora_expand"):
        original = getattr(kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs.get("backend")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    prompts = ["the quick brown fox", "hello world", "jobs arrive"]
    _parity(tiny_model, dict(list(peft_adapters.items())[:2]),
            EngineConfig(kv_cache_mb=16, lora_backend="triton", max_lora_rank=16), prompts, max_new=3)
    assert calls and all(backend == "triton" for _, backend in calls)
    assert {name for name, _ in calls} == {"lora_shrink", "lora_expand"}


def test_seeded_sampling_is_independent_of_the_batch(tiny_model, peft_adapters):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16))
    for name, path in peft_adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    try:
        params = SamplingParams(10, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
        alone = engine.generate(GenerationRequest("alone", "t", "qv-r4", prompt="hello world", params=params), 60)
        crowd = [GenerationRequest(f"n{i}", "t", name, prompt="the quick brown fox", params=SamplingParams(12))
                 for i, name in enumerate([None, *peft_adapters] * 2)]
        crowd.append(GenerationRequest("again", "t", "qv-r4", prompt="hello world", params=params))
        other = dict(params.__dict__, seed=99)
        crowd.append(GenerationRequest("other-seed", "t", "qv-r4", prompt="hello world", params=SamplingParams(**other)))
        results = _submit_all(engine, crowd)
    finally:
        engine.stop()
    assert results["again"].token_ids == alone.token_ids
    assert results["other-seed"].token_ids != alone.token_ids


def test_stop_strings_and_eos(tiny_model):
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16))
    engine.start()
    try:
        free = engine.generate(GenerationRequest("free", "t", prompt="hello world", params=SamplingParams(12)), 60)
        assert free.finish_reason == "length" and len(free.token_ids) == 12
        stop = free.text[len(free.text) // 2:][:3]
        assert stop
        cut = engine.generate(GenerationRequest("cut", "t", prompt="hello world",
                                                params=SamplingParams(12, stop=(stop,))), 60)
    finally:
        engine.stop()
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.find(stop)]
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < 12
