"""Hostile generation controls submitted straight to an Engine (no Kafka), beside ordinary greedy jobs: a JSON
schema 10,000 levels deep, a ~1 MB schema, regexes that explode when determinised, a million logit_bias
entries, and n=16 with max_new_tokens at the KV cache's limit. Each is refused (invalid_job /
prompt_too_long) or served, quickly, and the ordinary jobs in the same batch still carry PEFT's greedy tokens.
The broker-level twin is tests/test_fuzz_kafka.py::test_hostile_generation_records_are_answered_in_time."""

import json
import re
import threading
import time

from lorabus.scheduler import Engine, EngineConfig, OutputFormat, Request, SamplingParams
from helpers import PeftOracle

PROMPTS = ["the quick brown fox", "hello world", "summarize: the meeting moved to thursday", "jobs arrive on kafka"]
REFUSE_S = 2.0  # from submit to a refusal: llguidance refuses these in milliseconds
SERVE_S = 60.0  # everything answered, the 16 choices that fill the KV cache included, on a shared 2-core CPU
BIASED_TOKEN = 42


def deep_schema(depth: int) -> str:
    """A schema nested `depth` objects deep, as text (no JSON library writes one this deep)."""
    return '{"properties":{"a":' * depth + '{"type":"string"}' + '},"required":["a"],"type":"object"}' * depth


def wide_schema(properties: int) -> str:
    return json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(properties)}},
                      sort_keys=True)


EXPLODING_REGEXES = ["(a|b)*a(a|b){30}", "((a{1,100}){1,100}){1,100}", "(a{1,1000}){1,1000}"]


def hostile_requests(oracle: PeftOracle, kv_tokens: int, max_model_len: int, block: int) -> dict[str, tuple[Request, set]]:
    """id → (request, the answers it may get: "ok" and/or error codes)."""
    ids = oracle.prompt_ids(PROMPTS[0])
    assert len(ids) < block  # no full prompt block to share: each choice holds its own blocks
    at_limit = min(kv_tokens, max_model_len) - len(ids)  # the most one sequence may generate here
    filling = (kv_tokens // 16) // block * block - len(ids)  # the most each of 16 choices may: the cache full
    cases = {
        "deep-schema": (Request("deep-schema", "t", prompt_ids=ids, params=SamplingParams(8),
                                output_format=OutputFormat("json_schema", deep_schema(10_000))), {"invalid_job"}),
        "wide-schema": (Request("wide-schema", "t", prompt_ids=ids, params=SamplingParams(8),
                                output_format=OutputFormat("json_schema", wide_schema(30_000))), {"invalid_job"}),
        "bias-million": (Request("bias-million", "t", prompt_ids=ids, params=SamplingParams(
            8, logit_bias=tuple((BIASED_TOKEN, 1e-4) for _ in range(1_000_000)))), {"ok"}),
        "n16-at-limit": (Request("n16-at-limit", "t", prompt_ids=ids, params=SamplingParams(at_limit), n=16),
                         {"prompt_too_long"}),
        "n16-sharing-cache": (Request("n16-sharing-cache", "t", prompt_ids=ids, n=16, params=SamplingParams(
            filling, ignore_eos=True)), {"ok"}),
    }
    for i, pattern in enumerate(EXPLODING_REGEXES):
        cases[f"regex-{i}"] = (Request(f"regex-{i}", "t", prompt_ids=ids, params=SamplingParams(40),
                                       output_format=OutputFormat("regex", pattern)), {"ok", "invalid_job"})
    return cases


def test_hostile_generation_jobs_are_refused_or_served_beside_normal_ones(tiny_model):
    oracle = PeftOracle(tiny_model)
    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=1, max_running=64))
    hostile = hostile_requests(oracle, engine.limits.kv_tokens, engine.max_model_len, engine.config.kv_block_size)
    normal = oracle.greedy_requests({}, PROMPTS, 8, count=8, prefix="normal-")
    answers, answered_at, lock, done = {}, {}, threading.Lock(), threading.Event()
    submitted_at = {}
    everything = [r for pair in zip(normal, [r for r, _ in hostile.values()]) for r in pair] + normal[len(hostile):]

    def on_done(completion):
        with lock:
            assert completion.id not in answers, f"{completion.id} answered twice"
            answers[completion.id] = completion
            answered_at[completion.id] = time.monotonic()
            if len(answers) == len(everything):
                done.set()

    engine.start()
    try:
        started = time.monotonic()
        for request in everything:  # interleaved: every hostile job has ordinary neighbours in its batch
            submitted_at[request.id] = time.monotonic()
            engine.submit(request, on_done)
        assert done.wait(SERVE_S), f"unanswered after {SERVE_S}s: {sorted({r.id for r in everything} - set(answers))}"
    finally:
        engine.stop()

    report = {rid: (answers[rid].status if answers[rid].status == "ok" else answers[rid].error_code,
                    f"answered {(answered_at[rid] - submitted_at[rid]) * 1000:.0f} ms after its submit",
                    f"{answered_at[rid] - started:.2f} s after the first")
              for rid in hostile}
    print("\n" + "\n".join(f"{rid:>18}: {' / '.join(row)}" for rid, row in report.items()))
    for rid, (request, allowed) in hostile.items():
        answer = answers[rid]
        outcome = "ok" if answer.status == "ok" else answer.error_code
        assert outcome in allowed, (rid, outcome, answer.error_message)
        if outcome != "ok":  # refused before it took a slot, and said why
            assert answered_at[rid] - submitted_at[rid] < REFUSE_S and answer.error_message, report
    assert "recursion" in answers["deep-schema"].error_message or "depth" in answers["deep-schema"].error_message
    assert "too large" in answers["wide-schema"].error_message, answers["wide-schema"].error_message

    # The million biases all land on one token: +100 in all, so it is every token drawn.
    assert answers["bias-million"].token_ids == [BIASED_TOKEN] * 8, answers["bias-million"]
    # Sixteen choices that together fill the KV cache, each its whole length, all greedy: all the same.
    sharing = answers["n16-sharing-cache"]
    length = hostile["n16-sharing-cache"][0].params.max_new_tokens
    assert len(sharing.choices) == 16 and all(len(c.token_ids) == length and c.finish_reason == "length"
                                              for c in sharing.choices), [len(c.token_ids) for c in sharing.choices]
    assert len({tuple(c.token_ids) for c in sharing.choices}) == 1
    for i, pattern in enumerate(EXPLODING_REGEXES):
        answer = answers[f"regex-{i}"]
        if answer.status == "ok":  # every character one the regex allows; the whole of it when it stopped
            assert set(answer.text) <= {"a", "b"}, (pattern, answer.text)
            assert answer.finish_reason == "length" or re.fullmatch(pattern, answer.text), (pattern, answer.text)
    oracle.assert_answers({}, normal, answers)
