"""The generation controls in the engine (no Kafka), against references: Hugging Face `generate` for the
repetition penalty, min_new_tokens, logit_bias, stop_token_ids, ignore_eos, logprobs and prompt logprobs; HF
with an llguidance logits processor of the tests' own for structured output; float64 references for the
presence/frequency penalties and for min_p sampling. Every engine job runs in one mixed batch, each with its
own settings and adapter, so one sequence's controls are shown not to leak into its neighbours'."""

import json
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch

from generation_oracle import (FOX, HELLO, SCHEMA, SENTIMENT, assert_logprobs, eos_bias, grammar, hf_greedy,
                               hf_structured, late_token, peft_oracle, penalized_greedy, prompt_logits, sampling_probs,
                               sequence_bias)
from helpers import submit_all
from lorabus.scheduler import AdapterSpec, Completion, Engine, EngineConfig, OutputFormat, Request, SamplingParams
from lorabus.scheduler.sampling import Sampler

QV, RS, MLP = "qv-r4", "all-r8-rslora", "mlp-r16-patterns"
LONG = "summarize: the meeting moved to thursday at noon and jobs arrive on kafka and results leave on reply topics"
REGEX = "[0-9]{3}-[a-z]{2,4}"
CHOICES = ["positive", "negative", "neutral"]
FORMATS = {"json": ("json_schema", SCHEMA, QV), "regex": ("regex", REGEX, RS), "choice": ("choice", CHOICES, MLP)}
MIN_P = dict(temperature=0.1, top_k=50, top_p=0.9, min_p=0.3)  # 0.1: the tiny model's logits are nearly flat


def engine_format(kind: str, spec) -> OutputFormat:
    # The schema's text as HF's grammar gets it: llguidance writes an object's properties in the schema's order.
    return OutputFormat(kind, spec if kind == "regex" else json.dumps(spec))


def test_min_p_draws_as_the_documented_order():
    """Seeded draws from random logits equal multinomial draws from the float64 temperature → top-k → top-p →
    min-p distribution on a generator of the same seed, and cover exactly its kept set, which min_p shrank."""
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0)) * 3
    settings = dict(temperature=0.7, top_k=40, top_p=0.95, min_p=0.2)
    sampler = Sampler(SamplingParams(seed=7, **settings), torch.device("cpu"))
    want = sampling_probs(logits, **settings)
    kept = set(want.nonzero().flatten().tolist())
    assert len(kept) < int((sampling_probs(logits, **{**settings, "min_p": 0.0}) > 0).sum())
    draws = [sampler.select(logits, [], []) for _ in range(400)]
    reference = torch.Generator().manual_seed(7)
    assert draws == [int(torch.multinomial(want, 1, generator=reference)) for _ in range(400)]
    assert set(draws) == kept


@dataclass
class Batch:
    """The mixed batch's jobs and answers, and what the test recorded while it ran."""

    adapters: dict  # adapter name → directory (None: the base model)
    requests: dict[str, Request]
    results: dict[str, Completion]
    eos: int
    steps: list = field(default_factory=list)  # (sequences, distinct adapters) per forward pass
    step_tokens: Counter = field(default_factory=Counter)  # tokens each job fed the model, over all steps
    logits: dict = field(default_factory=dict)  # (job id, choice, output position) → the raw logits row

    def ids(self, job: str) -> list[int]:
        return self.requests[job].prompt_ids

    def adapter(self, job: str):
        return self.adapters[self.requests[job].adapter]


@pytest.fixture(scope="module")
def batch(tiny_model, peft_adapters) -> Batch:
    oracle = peft_oracle(tiny_model)
    ids, eos = oracle.prompt_ids, oracle.tokenizer.eos_token_id
    to_eos = ((eos, eos_bias(tiny_model, ids(FOX), eos)),)
    stop = late_token(tiny_model, peft_adapters[RS], ids(HELLO))
    first = hf_greedy(tiny_model, peft_adapters[RS], ids(FOX), 1).tokens[0]
    specs = {
        "repetition": (QV, FOX, SamplingParams(12, repetition_penalty=1.3, logprobs=5)),
        "eos-early": (None, FOX, SamplingParams(12, logit_bias=to_eos)),
        "min-new": (None, FOX, SamplingParams(12, logit_bias=to_eos, min_new_tokens=6)),
        "ignore-eos": (None, FOX, SamplingParams(10, logit_bias=to_eos, ignore_eos=True)),
        "bias": (RS, FOX, SamplingParams(10, logit_bias=((first, -1.0), (300, 0.15)))),
        "stop-id": (RS, HELLO, SamplingParams(12, stop_token_ids=(stop,))),
        "penalties": (MLP, FOX, SamplingParams(12, presence_penalty=0.1, frequency_penalty=0.05, logprobs=5)),
        "prompt-logprobs": (None, LONG, SamplingParams(3, prompt_logprobs=3)),
        "min-p": (RS, HELLO, SamplingParams(8, seed=5, **MIN_P)),
        "n3": (QV, HELLO, SamplingParams(6, temperature=0.8, seed=11)),
        **{f"seed{11 + i}": (QV, HELLO, SamplingParams(6, temperature=0.8, seed=11 + i)) for i in range(3)},
        "n4": (MLP, LONG, SamplingParams(5, temperature=1.0, seed=3, ignore_eos=True)),
        **{name: (adapter, SENTIMENT, SamplingParams(24)) for name, (_, _, adapter) in FORMATS.items()},
        "choice-cut": (None, SENTIMENT, SamplingParams(2)),
        "bad-schema": (None, SENTIMENT, SamplingParams(8)),
    }
    requests = {name: Request(name, "t", adapter, prompt_ids=ids(prompt), params=params)
                for name, (adapter, prompt, params) in specs.items()}
    requests["n3"].n, requests["n4"].n = 3, 4
    for name, (kind, spec, _) in FORMATS.items():
        requests[name].output_format = engine_format(kind, spec)
    requests["choice-cut"].output_format = engine_format("choice", CHOICES)
    requests["bad-schema"].output_format = OutputFormat("json_schema", json.dumps({"type": "frobnicate"}))

    engine = Engine(str(tiny_model), EngineConfig(kv_cache_mb=16))
    result = Batch({None: None, **peft_adapters}, requests, {}, eos)
    engine.on_step = lambda sequences, tokens, adapters, seconds: result.steps.append((sequences, adapters))
    run = engine.runner.run

    def recording_run(step):
        out = run(step)
        for seq, n in step:
            result.step_tokens[seq.request.id] += n
        for row, seq in enumerate(out.sequences):
            result.logits[(seq.request.id, seq.index, len(seq.output_ids))] = out.logits[out.rows[row]].double().cpu()
        return out

    engine.runner.run = recording_run
    for name, path in peft_adapters.items():
        engine.register(AdapterSpec(name, str(path)))
    engine.start()
    try:
        result.results = submit_all(engine, list(requests.values()))
    finally:
        engine.stop()
    return result


def answer(batch: Batch, job: str) -> Completion:
    completion = batch.results[job]
    assert completion.status == "ok", completion
    return completion


def test_jobs_shared_forward_passes(batch):
    most = max(sequences for sequences, _ in batch.steps)
    assert most >= len(batch.requests) // 2, f"sequences per step: {[s for s, _ in batch.steps]}"
    assert max(adapters for _, adapters in batch.steps) >= 2


def test_repetition_penalty_and_logprobs_match_hf(batch, tiny_model):
    got = answer(batch, "repetition")
    ref = hf_greedy(tiny_model, batch.adapter("repetition"), batch.ids("repetition"), 12, repetition_penalty=1.3)
    ref.assert_tokens(got.token_ids, "repetition")
    assert ref.tokens != hf_greedy(tiny_model, batch.adapter("repetition"), batch.ids("repetition"), 12).tokens
    assert_logprobs(got.logprobs, ref.scores, ref.tokens, 5, "repetition")


def test_min_new_tokens_holds_eos_back_as_hf(batch, tiny_model):
    eos = batch.eos
    bias = sequence_bias(dict(batch.requests["min-new"].params.logit_bias))
    early, held = answer(batch, "eos-early"), answer(batch, "min-new")
    assert early.finish_reason == "stop" and early.token_ids[-1] == eos and len(early.token_ids) < 6, early
    assert len(held.token_ids) > len(early.token_ids) and eos not in held.token_ids[:6], held
    hf_greedy(tiny_model, None, batch.ids("eos-early"), 12, sequence_bias=bias).assert_tokens(early.token_ids, "eos-early")
    hf_greedy(tiny_model, None, batch.ids("min-new"), 12, sequence_bias=bias, min_new_tokens=6,
              eos_token_id=[eos]).assert_tokens(held.token_ids, "min-new")


def test_ignore_eos_runs_past_eos_as_hf(batch, tiny_model):
    got = answer(batch, "ignore-eos")
    assert got.finish_reason == "length" and len(got.token_ids) == 10 and batch.eos in got.token_ids[:-1], got
    bias = sequence_bias(dict(batch.requests["ignore-eos"].params.logit_bias))
    hf_greedy(tiny_model, None, batch.ids("ignore-eos"), 10, sequence_bias=bias,
              eos_token_id=None).assert_tokens(got.token_ids, "ignore-eos")


def test_logit_bias_matches_hf(batch, tiny_model):
    got, adapter = answer(batch, "bias"), batch.adapter("bias")
    bias = dict(batch.requests["bias"].params.logit_bias)
    ref = hf_greedy(tiny_model, adapter, batch.ids("bias"), 10, sequence_bias=sequence_bias(bias))
    ref.assert_tokens(got.token_ids, "bias")
    assert ref.tokens != hf_greedy(tiny_model, adapter, batch.ids("bias"), 10).tokens


def test_stop_token_ids_end_as_hf_eos_list(batch, tiny_model):
    got, tokenizer = answer(batch, "stop-id"), peft_oracle(tiny_model).tokenizer
    (stop,) = batch.requests["stop-id"].params.stop_token_ids
    assert got.finish_reason == "stop" and got.token_ids[-1] == stop and len(got.token_ids) < 12, got
    assert got.text == tokenizer.decode(got.token_ids[:-1], skip_special_tokens=True) != tokenizer.decode(got.token_ids)
    hf_greedy(tiny_model, batch.adapter("stop-id"), batch.ids("stop-id"), 12,
              eos_token_id=[batch.eos, stop]).assert_tokens(got.token_ids, "stop-id")


def test_presence_and_frequency_penalties_match_float64(batch, tiny_model):
    got, adapter, params = answer(batch, "penalties"), batch.adapter("penalties"), batch.requests["penalties"].params
    ref = penalized_greedy(tiny_model, adapter, batch.ids("penalties"), 12, params.presence_penalty,
                           params.frequency_penalty, {batch.eos})
    ref.assert_tokens(got.token_ids, "penalties")
    assert ref.tokens != hf_greedy(tiny_model, adapter, batch.ids("penalties"), 12).tokens
    assert_logprobs(got.logprobs, ref.scores, ref.tokens, 5, "penalties")


def test_prompt_logprobs_match_hf_raw_logits(batch, tiny_model):
    got, ids = answer(batch, "prompt-logprobs"), batch.ids("prompt-logprobs")
    assert got.logprobs is None and len(got.prompt_logprobs) == len(ids) and got.prompt_logprobs[0] is None
    rows = prompt_logits(tiny_model, None, ids)[:-1]
    assert_logprobs(got.prompt_logprobs[1:], list(rows), ids[1:], 3, "prompt-logprobs")


def test_seeded_min_p_sampling_matches_float64(batch):
    """The engine's draws are multinomial draws from the float64 distribution of its own logits on a generator
    of the job's seed; min_p cut tokens at some step."""
    got, params = answer(batch, "min-p"), batch.requests["min-p"].params
    reference, cut = torch.Generator().manual_seed(params.seed), False
    for i, token in enumerate(got.token_ids):
        logits = batch.logits[("min-p", 0, i)]
        probs = sampling_probs(logits, **MIN_P)
        assert int(torch.multinomial(probs, 1, generator=reference)) == token, f"step {i}"
        cut |= int((probs > 0).sum()) < int((sampling_probs(logits, **{**MIN_P, "min_p": 0.0}) > 0).sum())
    assert len(got.token_ids) == params.max_new_tokens and cut


def test_choices_draw_as_consecutive_seeds_and_share_the_prefill(batch):
    n3 = answer(batch, "n3")
    assert [c.index for c in n3.choices] == [0, 1, 2] and n3.token_ids == n3.choices[0].token_ids
    assert [c.token_ids for c in n3.choices] == [answer(batch, f"seed{11 + i}").token_ids for i in range(3)]
    assert len({tuple(c.token_ids) for c in n3.choices}) > 1
    n4 = answer(batch, "n4")
    assert len(n4.choices) == 4 and all(len(c.token_ids) == 5 for c in n4.choices)
    # The prompt is fed once; each choice then feeds its tokens but the last.
    for job in ("n3", "n4"):
        choices = batch.results[job].choices
        assert batch.step_tokens[job] == len(batch.ids(job)) + sum(len(c.token_ids) - 1 for c in choices), job


def test_structured_output_matches_hf_with_llguidance(batch, tiny_model):
    vocab = len(batch.logits[("json", 0, 0)])
    for name, (kind, spec, _) in FORMATS.items():
        got = answer(batch, name)
        ref, complete = hf_structured(tiny_model, batch.adapter(name), batch.ids(name), 24, grammar(kind, spec), vocab)
        ref.assert_tokens(got.token_ids, name)
        assert complete and got.finish_reason == "stop", (name, got)
    assert json.loads(batch.results["json"].text).keys() == {"ok", "n"}
    assert batch.results["choice"].text in CHOICES
    cut = answer(batch, "choice-cut")
    ref, complete = hf_structured(tiny_model, None, batch.ids("choice-cut"), 2, grammar("choice", CHOICES), vocab)
    assert cut.finish_reason == "length" and not complete
    ref.assert_tokens(cut.token_ids, "choice-cut")


def test_a_schema_llguidance_refuses_is_an_invalid_job(batch):
    bad = batch.results["bad-schema"]
    assert bad.status == "error" and bad.error_code == "invalid_job", bad
    assert "response_format" in bad.error_message and "frobnicate" in bad.error_message, bad.error_message
