"""The generation controls through the real broker and a real worker: jobs with a repetition penalty and
logprobs, min_new_tokens, logit_bias, stop_token_ids and a JSON schema, on different adapters, sent together
with jobs whose settings are out of range, and an n=3 job. Each good result equals the Hugging Face reference
of tests/generation_oracle.py (tokens; logprobs within 1e-4); each bad one is answered `invalid_job` and
leaves its neighbours as they would be alone."""

import json

import msgspec

from generation_oracle import (FOX, HELLO, SCHEMA, SENTIMENT, assert_logprobs, eos_bias, grammar, hf_greedy,
                               hf_structured, late_token, peft_oracle, prompt_logits, sequence_bias)
from helpers import running_worker, worker_config
from lorabus.schemas import AdapterPublish
from lorabus.worker.client import publish_control, run_jobs

QV, RS, MLP = "qv-r4", "all-r8-rslora", "mlp-r16-patterns"
VOCAB = 512  # the tiny model's (lorabus.worker.testing.TINY_MODEL)


async def test_generation_controls_through_the_broker_match_hf(kafka, tiny_model, peft_adapters):
    oracle = peft_oracle(tiny_model)
    ids, eos = oracle.prompt_ids, oracle.tokenizer.eos_token_id
    to_eos = eos_bias(tiny_model, ids(FOX), eos)
    stop = late_token(tiny_model, peft_adapters[RS], ids(HELLO))
    first = hf_greedy(tiny_model, peft_adapters[RS], ids(FOX), 1).tokens[0]
    bias = {first: -1.0, 300: 0.15}
    jobs = {
        "repetition": dict(adapter=QV, prompt=FOX, max_new_tokens=12, repetition_penalty=1.3, logprobs=5,
                           prompt_logprobs=3),
        "min-new": dict(prompt=FOX, max_new_tokens=12, logit_bias={str(eos): to_eos}, min_new_tokens=6),
        "bias": dict(adapter=RS, prompt=FOX, max_new_tokens=10, logit_bias={str(t): b for t, b in bias.items()}),
        "stop-id": dict(adapter=RS, prompt=HELLO, max_new_tokens=12, stop_token_ids=[stop]),
        "json": dict(adapter=MLP, prompt=SENTIMENT, max_new_tokens=24,
                     response_format={"type": "json_schema", "schema": SCHEMA}),
        "n3": dict(adapter=QV, prompt=HELLO, max_new_tokens=6, temperature=0.8, seed=11, n=3),
        "bias-past-vocab": dict(prompt=FOX, max_new_tokens=4, logit_bias={str(VOCAB): 1.0}),
        "min-p-2": dict(prompt=FOX, max_new_tokens=4, min_p=2),
        "bad-schema": dict(prompt=FOX, max_new_tokens=4,
                           response_format={"type": "json_schema", "schema": {"type": "frobnicate"}}),
    }
    config = worker_config(kafka, tiny_model)
    async with running_worker(config) as worker:
        await publish_control(kafka, config.control_topic,
                              [AdapterPublish(name, "v1", str(path)) for name, path in peft_adapters.items()])
        records = [(job_id, json.dumps({"id": job_id, "tenant": "t", **job}).encode()) for job_id, job in jobs.items()]
        results = await run_jobs(kafka, config.jobs_topic, config.results_topic, records, timeout_s=60)
        # Jobs with different settings shared forward passes: some step ran sequences of several adapters.
        assert _steps_above(worker.metrics.step_adapters, 1) > 0
    answers = {job_id: result for job_id, (result,) in results.items()}
    for job_id, reason in (("bias-past-vocab", "logit_bias"), ("min-p-2", "min_p"), ("bad-schema", "frobnicate")):
        error = answers[job_id].error
        assert answers[job_id].status == "error" and error.code == "invalid_job" and reason in error.message, error
    good = {job_id: answers[job_id] for job_id in jobs if job_id not in ("bias-past-vocab", "min-p-2", "bad-schema")}
    for job_id, result in good.items():
        assert result.status == "ok", msgspec.json.encode(result)
    adapter = {name: peft_adapters.get(jobs[name].get("adapter")) for name in jobs}

    got = good["repetition"]
    ref = hf_greedy(tiny_model, adapter["repetition"], ids(FOX), 12, repetition_penalty=1.3)
    ref.assert_tokens(got.token_ids, "repetition")
    assert_logprobs(got.logprobs, ref.scores, ref.tokens, 5, "repetition")
    assert got.prompt_logprobs[0] is None and len(got.prompt_logprobs) == len(ids(FOX))
    assert_logprobs(got.prompt_logprobs[1:], list(prompt_logits(tiny_model, adapter["repetition"], ids(FOX))[:-1]),
                    ids(FOX)[1:], 3, "prompt logprobs")

    early = hf_greedy(tiny_model, None, ids(FOX), 12, sequence_bias=sequence_bias({eos: to_eos}))
    assert early.tokens[-1] == eos and len(early.tokens) < 6  # without min_new_tokens it would stop early
    hf_greedy(tiny_model, None, ids(FOX), 12, sequence_bias=sequence_bias({eos: to_eos}), min_new_tokens=6,
              eos_token_id=[eos]).assert_tokens(good["min-new"].token_ids, "min-new")
    assert len(good["min-new"].token_ids) >= 6

    hf_greedy(tiny_model, adapter["bias"], ids(FOX), 10,
              sequence_bias=sequence_bias(bias)).assert_tokens(good["bias"].token_ids, "bias")

    got = good["stop-id"]
    assert got.finish_reason == "stop" and got.token_ids[-1] == stop, got
    hf_greedy(tiny_model, adapter["stop-id"], ids(HELLO), 12,
              eos_token_id=[eos, stop]).assert_tokens(got.token_ids, "stop-id")

    got = good["json"]
    ref, complete = hf_structured(tiny_model, adapter["json"], ids(SENTIMENT), 24, grammar("json_schema", SCHEMA), VOCAB)
    ref.assert_tokens(got.token_ids, "json")
    assert complete and got.finish_reason == "stop" and list(json.loads(got.text)) == ["ok", "n"], got.text

    got = good["n3"]
    assert [c.index for c in got.choices] == [0, 1, 2] and got.token_ids == got.choices[0].token_ids
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in got.choices)


def _steps_above(histogram, bound: float) -> float:
    """Observations of a Prometheus histogram above `bound` (one of its bucket bounds)."""
    buckets = {sample.labels["le"]: sample.value for sample in histogram.collect()[0].samples
               if sample.name.endswith("_bucket")}
    return buckets["+Inf"] - buckets[str(float(bound))]
