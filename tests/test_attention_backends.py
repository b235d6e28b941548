"""The engine's three attention backends agree: torch (block-table gather + SDPA), seats (each sequence's K/V
also in one contiguous row, read in place) and triton (the paged-attention kernel reading the cache in place,
interpreted on CPU), over ragged contexts, chunked prefill over cached
prefixes, mixed decode/prefill steps, several sequences with and without an adapter, and GQA."""

import os
import random
import subprocess
import sys

import pytest
import torch

from lorabus.kernels import resolve_attention_backend
from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, Request, SamplingParams
from lorabus.scheduler.model import TritonPagedAttention
from lorabus.scheduler.requests import State
from helpers import record_logits, submit_all

MAX_NEW = 6


def _run(model_dir, adapter_dir, backend, prompts):
    """Each request's tokens, and the logits of every (request, output position) the engine computed."""
    # Block size 8 and 16-token steps: contexts span several blocks, long prompts prefill in chunks over
    # their cached prefix, and steps mix decode rows with prefill chunks.
    engine = Engine(str(model_dir), EngineConfig(kv_cache_mb=4, kv_block_size=8, max_step_tokens=16,
                                                 max_running=4, attention_backend=backend))
    logits = record_logits(engine)
    engine.launches = []
    if backend == "triton":  # what the kernel was asked: max new rows, and each sequence's (new rows, context)
        launch = engine.model.attention._launch

        def recording_launch(q, k, v, blocks, ctx, cu, max_q_len, *rest):
            engine.launches.append((max_q_len, list(zip((cu[1:] - cu[:-1]).tolist(), ctx.tolist()))))
            return launch(q, k, v, blocks, ctx, cu, max_q_len, *rest)

        engine.model.attention._launch = recording_launch
    engine.register(AdapterSpec("a", str(adapter_dir)))
    engine.start()
    try:
        requests = [Request(f"r{i}", "t", "a" if i % 2 else None, prompt_ids=p, params=SamplingParams(MAX_NEW))
                    for i, p in enumerate(prompts)]
        results = submit_all(engine, requests, timeout=600)
    finally:
        engine.stop()
    assert all(c.status == "ok" for c in results.values()), results
    return {rid: c.token_ids for rid, c in results.items()}, logits, engine


def test_triton_matches_torch_in_the_engine(tiny_model, peft_adapters):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 9, 30, 17)]  # ragged, 1..4 blocks
    adapter = peft_adapters["all-r8-rslora"]
    torch_tokens, torch_logits, torch_engine = _run(tiny_model, adapter, "torch", prompts)
    triton_tokens, triton_logits, triton_engine = _run(tiny_model, adapter, "triton", prompts)
    assert torch_engine.model.attention.name == "torch"
    assert isinstance(triton_engine.model.attention, TritonPagedAttention)
    assert triton_engine.model.num_heads > triton_engine.model.num_kv_heads  # the tiny model is GQA
    launches = triton_engine.launches
    assert {m for m, _ in launches} >= {1} and max(m for m, _ in launches) > 1  # decode-only and prefill steps
    assert any(1 < n < c for _, seqs in launches for n, c in seqs)  # a chunk over a cached prefix
    assert any(min(n for n, _ in seqs) == 1 < m for m, seqs in launches)  # decode rows and prefill chunks
    assert triton_tokens == torch_tokens
    assert all(len(t) == MAX_NEW for t in torch_tokens.values())
    assert triton_logits.keys() == torch_logits.keys() and len(torch_logits) == len(prompts) * MAX_NEW
    for key, expected in torch_logits.items():
        torch.testing.assert_close(triton_logits[key], expected, rtol=1e-4, atol=1e-4, msg=str(key))


def test_seats_match_torch_in_the_engine(tiny_model, peft_adapters):
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 9, 30, 17, 12, 5)]  # more jobs than seats
    adapter = peft_adapters["all-r8-rslora"]
    torch_tokens, torch_logits, _ = _run(tiny_model, adapter, "torch", prompts)
    seat_tokens, seat_logits, seat_engine = _run(tiny_model, adapter, "seats", prompts)
    assert seat_engine.model.attention.name == "seats"
    assert seat_tokens == torch_tokens
    assert seat_logits.keys() == torch_logits.keys() and len(torch_logits) == len(prompts) * MAX_NEW
    for key, expected in torch_logits.items():
        torch.testing.assert_close(seat_logits[key], expected, rtol=1e-5, atol=1e-5, msg=str(key))
    seats = seat_engine.model.attention.seats
    assert seats.k.shape[1] == 4  # seats for max_running sequences, no more: the finished gave theirs back
    assert all(seq.state is State.FINISHED for seq in seats.holders)  # given back at the next step


def test_backend_resolution():
    assert resolve_attention_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_attention_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="attention backend"):
        resolve_attention_backend("flash", torch.device("cpu"))


def test_cpu_engine_does_not_import_triton(tiny_model):
    """On CPU the auto backend is seats or torch (timed at start-up), and building the engine imports no Triton
    kernel module."""
    code = (
        "import sys\n"
        "from lorabus.scheduler import Engine, EngineConfig\n"
        f"engine = Engine({str(tiny_model)!r}, EngineConfig(kv_cache_mb=4))\n"
        "assert engine.model.attention.name in ('seats', 'torch'), engine.model.attention\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('lorabus.kernels.') and 'triton' in m)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
