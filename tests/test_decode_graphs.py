"""Decode steps padded to batch-size buckets (the CUDA-graph path's inputs) decode exactly what the eager
forward does, with the torch layers and with the Triton kernels (interpreted on CPU), and never touch a
sequence's cache blocks or the null block. Capture and replay themselves need a GPU: the last test runs
only where CUDA is available (a skip elsewhere, not a pass)."""

import random

import pytest
import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.decode_graphs import DecodeGraphs, batch_buckets, bucket_for
from helpers import record_logits, submit_all

MAX_NEW = 5


def test_buckets():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48)
    buckets = batch_buckets(6)
    assert [bucket_for(n, buckets) for n in range(1, 8)] == [1, 2, 4, 4, 6, 6, None]
    with pytest.raises(ValueError):
        batch_buckets(0)


def _run(model_dir, adapter_dir, mode, prompts, **config):
    """Tokens of each request and every logits row, through DecodeGraphs in `mode`; the padded buckets run."""
    engine = Engine(str(model_dir), EngineConfig(kv_cache_mb=4, kv_block_size=8, max_running=6, **config))
    decode = DecodeGraphs(engine.model, engine.kv, engine.adapters.max_loras, 6, engine.runner.decode.max_blocks,
                          mode)
    padded = []
    if mode != "eager":
        forward = decode._forward
        decode._forward = lambda n: padded.append(n) or forward(n)
    engine.runner.decode = decode
    logits = record_logits(engine)
    engine.register(AdapterSpec("a", str(adapter_dir)))
    engine.start()
    try:
        # One adapter for all: they wait for the same load and then decode together (bucket 4 for three),
        # however slow the loader thread is on a busy machine. Padding rows are the rows without adapter.
        requests = [Request(f"r{i}", "t", "a", prompt_ids=p, params=SamplingParams(MAX_NEW))
                    for i, p in enumerate(prompts)]
        results = submit_all(engine, requests, timeout=600)
    finally:
        engine.stop()
    assert all(c.status == "ok" for c in results.values()), results
    kv = engine.kv
    assert not kv.k_blocks[:, kv.null_block].any() and not kv.v_blocks[:, kv.null_block].any()
    return {rid: c.token_ids for rid, c in results.items()}, logits, padded


@pytest.mark.parametrize("backends", [
    dict(attention_backend="torch", lora_backend="torch"),
    # The CUDA-graph body: in-place attention and the per-token LoRA mapping, through the Triton kernels.
    dict(attention_backend="triton", lora_backend="triton"),
], ids=["torch", "triton"])
def test_padded_decode_matches_eager(tiny_model, peft_adapters, backends):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (4, 11, 19)]  # 3 sequences: bucket 4
    adapter = peft_adapters["all-r8-rslora"]
    eager_tokens, eager_logits, _ = _run(tiny_model, adapter, "eager", prompts, **backends)
    tokens, logits, padded = _run(tiny_model, adapter, "padded", prompts, **backends)
    assert 4 in padded, padded  # three decoding sequences padded to the bucket of four
    assert tokens == eager_tokens
    assert logits.keys() == eager_logits.keys()
    for key, expected in eager_logits.items():
        torch.testing.assert_close(logits[key], expected, rtol=1e-4, atol=1e-4, msg=str(key))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (not counted as passing)")
def test_cuda_graphs_match_eager(tiny_model, peft_adapters):
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (4, 11, 19, 30, 7)]
    adapter = peft_adapters["all-r8-rslora"]
    cuda = dict(device="cuda", dtype="float32", attention_backend="triton", lora_backend="triton")
    eager_tokens, eager_logits, _ = _run(tiny_model, adapter, "eager", prompts, **cuda)
    tokens, logits, captured = _run(tiny_model, adapter, "graphs", prompts, **cuda)
    assert captured  # captured buckets (the warm-up and capture call the body; replays do not)
    assert tokens == eager_tokens
    for key, expected in eager_logits.items():
        torch.testing.assert_close(logits[key], expected, rtol=1e-3, atol=1e-3, msg=str(key))
