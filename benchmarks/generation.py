"""Generation controls (issue 23): what structured output and n-sample jobs cost, and how often the output is valid.

    .venv/bin/python benchmarks/generation.py [--model DIR | --model-shape tiny] [--parts throughput,n,validity,rows]
                                    [--repeats 5] [--threads T] [--jobs 32] [--max-new 32] [--tp-prompt-len 16]
                                    [--prompt-len 256] [--n-new 8] [--per-schema 200] [--json out.json]

The model is SmolLM2-135M-Instruct from lorabus's model cache (fetched on first use) unless --model DIR names
another, or --model-shape tiny builds the random tiny Llama the tests use. One engine serves every part (its
step thread started, as the worker runs it); every job samples at temperature 1.0 with its own seed.

* throughput: --jobs jobs of --max-new tokens on distinct --tp-prompt-len-token prompts (short, so decode, where
  the grammar masks, dominates), submitted together. "half JSON": every other job carries a JSON schema (an
  object whose one string field must be at least 4 x --max-new characters long, so no constrained job can
  finish before max_new_tokens); "plain": the same jobs with no format. Plain jobs ignore EOS, so both runs
  generate exactly jobs x max_new tokens (checked), and the ratio of their wall times is the ratio of their
  token rates. Target: half JSON >= 0.8x plain.
* n: one job with n=4 against 4 jobs of the same prompt (--prompt-len tokens, --n-new new tokens each) submitted
  together: the n=4 job prefills its prompt once. Target: >= 1.3x (separate wall / shared wall).
* validity: the sweep of tests/test_structured_validity.py at scale (its formats, prompts and checks):
  --per-schema jobs under each of five formats (an object holding a nested object with required keys, an enum,
  an array with minItems/maxItems, a regex, a choice), on the base model and on an adapter (SmolLM2: the demo
  adapter deploy/demo-adapters/entities; another model: a random rank-16 adapter). Every output that finishes
  "stop" must validate (jsonschema, re.fullmatch, equality); "length" outputs are counted. Reported per format
  and mode: valid / stop / length.
* rows: where a sampled row's time goes, on the model's vocabulary, outside the engine: `Sampler.select` at
  temperature 1.0 over --max-new tokens, without a format and with the throughput part's JSON schema (the
  matcher walked on by the drawn tokens); then the same constrained walk with its grammar calls timed: the whole
  `Constraint.mask`, llguidance's `compute_logit_bias` inside it, and `consume_token`. Microseconds per token.

Throughput and n run --repeats times, their two contenders interleaved (order swapped every repeat); tables give
median [min..max] over the repeats, ratios paired within a repeat. The validity sweep runs once (it is a count).
The report starts with the CPU model, the core count and torch's thread count.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, OutputFormat, Request, SamplingParams
from lorabus.scheduler.sampling import Sampler
from lorabus.worker.model_store import fetch_model
from lorabus.worker.testing import build_sample_adapter, build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also under -P / PYTHONSAFEPATH
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the sweep's formats and checks
from serving import machine  # noqa: E402
from step import mmm  # noqa: E402
from test_structured_validity import DEMO_ADAPTER, tally, validity_requests  # noqa: E402

ADAPTER = "adapter"
PARTS = ("throughput", "n", "validity", "rows")


def run_all(engine: Engine, requests: list[Request], timeout: float = 3600) -> tuple[dict, float]:
    """Submit together, wait for every answer; the completions by id and the wall seconds."""
    done, results, lock = threading.Event(), {}, threading.Lock()

    def on_done(c):
        with lock:
            results[c.id] = c
            if len(results) == len(requests):
                done.set()

    started = time.perf_counter()
    for request in requests:
        engine.submit(request, on_done)
    if not done.wait(timeout):
        raise TimeoutError(f"{len(results)}/{len(requests)} answered")
    seconds = time.perf_counter() - started
    failed = [c for c in results.values() if c.status != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} jobs failed, e.g. {failed[0]}")
    return results, seconds


# ---- the parts ------------------------------------------------------------------------------------


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(count)]


def throughput(engine: Engine, args, log) -> dict:
    fmt = long_answer_format(args.max_new)
    prompts = random_prompts(args.jobs, args.tp_prompt_len, engine.limits.vocab_size, seed=1)
    expected = args.jobs * args.max_new

    def run(half_json: bool, rep: int) -> float:
        requests = [Request(f"tp-{half_json}-{rep}-{i}", "t", None, prompt_ids=prompt,
                            params=SamplingParams(max_new_tokens=args.max_new, temperature=1.0, seed=i,
                                                  ignore_eos=True),
                            output_format=fmt if half_json and i % 2 == 0 else None)
                    for i, prompt in enumerate(prompts)]
        results, seconds = run_all(engine, requests)
        tokens = sum(len(c.token_ids) for c in results.values())
        if tokens != expected:
            raise RuntimeError(f"{tokens} tokens generated, not {expected}: a job ended early")
        return seconds

    run(True, -1), run(False, -1)  # warm-up: the grammar compiled, the allocator warm
    times = {True: [], False: []}
    for rep in range(args.repeats):
        for half_json in ((True, False) if rep % 2 == 0 else (False, True)):
            times[half_json].append(run(half_json, rep))
    rate = {k: [expected / s for s in v] for k, v in times.items()}
    ratio = [j / p for j, p in zip(rate[True], rate[False])]
    log(f"throughput ({args.jobs} jobs x {args.max_new} tokens, prompts {args.tp_prompt_len}): plain "
        f"{mmm(rate[False], '.0f')} tok/s, half JSON {mmm(rate[True], '.0f')} tok/s, "
        f"ratio {mmm(ratio)}x (target >= 0.8)")
    return {"plain_tok_s": rate[False], "half_json_tok_s": rate[True], "ratio": ratio}


def shared_prefill(engine: Engine, args, log) -> dict:
    prompt = random_prompts(1, args.prompt_len, engine.limits.vocab_size, seed=2)[0]

    def run(shared: bool, rep: int) -> float:
        params = lambda seed: SamplingParams(max_new_tokens=args.n_new, temperature=1.0, seed=seed)  # noqa: E731
        if shared:
            requests = [Request(f"n4-{rep}", "t", None, prompt_ids=prompt, params=params(0), n=4)]
        else:
            requests = [Request(f"sep-{rep}-{i}", "t", None, prompt_ids=prompt, params=params(i)) for i in range(4)]
        results, seconds = run_all(engine, requests)
        if shared and len(results[requests[0].id].choices or ()) != 4:
            raise RuntimeError("the n=4 job did not answer 4 choices")
        return seconds

    run(True, -1), run(False, -1)
    times = {True: [], False: []}
    for rep in range(args.repeats):
        for shared in ((True, False) if rep % 2 == 0 else (False, True)):
            times[shared].append(run(shared, rep))
    speedup = [s / n for n, s in zip(times[True], times[False])]
    log(f"n=4 (prompt {args.prompt_len}, {args.n_new} new): "
        f"one n=4 job {mmm([t * 1e3 for t in times[True]], '.0f')} ms, "
        f"4 jobs {mmm([t * 1e3 for t in times[False]], '.0f')} ms, speedup {mmm(speedup)}x (target >= 1.3)")
    return {"n4_ms": [t * 1e3 for t in times[True]], "separate_ms": [t * 1e3 for t in times[False]],
            "speedup": speedup}


def long_answer_format(max_new: int) -> OutputFormat:
    """A JSON object whose one string must be longer than max_new tokens can spell: never complete in time."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 4 * max_new}},
              "required": ["answer"]}
    return OutputFormat("json_schema", json.dumps(schema, sort_keys=True))


def timed(fn, seconds: dict[str, float], name: str):
    """`fn`, adding the seconds of each call to seconds[name]."""
    def call(*args):
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
    return call


class TimedMatcher:
    """An llguidance matcher whose mask and advance calls are timed; the rest passes through."""

    def __init__(self, matcher, seconds: dict[str, float]):
        self._matcher = matcher
        self.compute_logit_bias = timed(matcher.compute_logit_bias, seconds, "compute_logit_bias")
        self.consume_token = timed(matcher.consume_token, seconds, "consume_token")

    def __getattr__(self, name):
        return getattr(self._matcher, name)


def row_costs(engine: Engine, args, log) -> dict:
    vocab = engine.model.vocab_size
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(max_new_tokens=args.max_new, temperature=1.0, seed=0)
    fmt = long_answer_format(args.max_new)

    def walk_us(constraint) -> float:
        """Microseconds per token of a sampled walk of --max-new tokens (constrained when a constraint is given)."""
        sampler = Sampler(params, engine.device, engine.eos_ids, constraint)
        output: list[int] = []
        started = time.perf_counter()
        for _ in range(args.max_new):
            output.append(sampler.select(logits, [], output))
        return (time.perf_counter() - started) / args.max_new * 1e6

    costs = {"select, no format": [], "select, JSON schema": [], "of which Constraint.mask": [],
             "of which compute_logit_bias (in mask)": [], "of which consume_token": []}
    for _ in range(args.repeats):
        costs["select, no format"].append(walk_us(None))
        costs["select, JSON schema"].append(walk_us(engine.grammars.constraint(fmt)))
        # The same walk again with its grammar calls timed (the timers' own cost stays out of the row above).
        seconds: dict[str, float] = {}
        constraint = engine.grammars.constraint(fmt)
        constraint._matcher = TimedMatcher(constraint._matcher, seconds)
        constraint.mask = timed(constraint.mask, seconds, "mask")
        walk_us(constraint)
        for name, key in (("of which Constraint.mask", "mask"), ("of which compute_logit_bias (in mask)",
                                                                 "compute_logit_bias"),
                          ("of which consume_token", "consume_token")):
            costs[name].append(seconds[key] / args.max_new * 1e6)
    for name, values in costs.items():
        log(f"rows (vocab {vocab}): {name} {mmm(values, '.0f')} us per token")
    return costs


def validity(engine: Engine, args, log) -> dict:
    out = {}
    for mode, adapter in (("base", None), ("adapter", ADAPTER)):
        jobs = validity_requests(args.per_schema, adapter, "v", chat=bool(engine.tokenizer.chat_template))
        results, seconds = run_all(engine, [r for _, r in jobs])
        out[mode] = {"seconds": seconds, "formats": tally(jobs, results)}
        for name, row in out[mode]["formats"].items():
            log(f"validity {mode:7s} {name:14s}: {row['valid']}/{row['stop']} stop outputs valid, "
                f"{row['length']}/{row['jobs']} hit length, {len(row['texts'])} distinct"
                + (f"; invalid: {row['invalid']}" if row["invalid"] else ""))
            row["texts"] = len(row["texts"])
        log(f"validity {mode}: {len(jobs)} jobs in {seconds:.1f} s")
    return out


# ---- driver -----------------------------------------------------------------------------------------


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="a model directory (default: SmolLM2-135M-Instruct from the cache)")
    p.add_argument("--model-shape", choices=("tiny",), help="the random tiny Llama of the tests instead")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--jobs", type=int, default=32, help="throughput: jobs per batch (half of them JSON)")
    p.add_argument("--max-new", type=int, default=32, help="throughput: new tokens per job")
    p.add_argument("--tp-prompt-len", type=int, default=16, help="throughput: prompt tokens")
    p.add_argument("--prompt-len", type=int, default=256, help="n: prompt tokens")
    p.add_argument("--n-new", type=int, default=8, help="n: new tokens per choice")
    p.add_argument("--per-schema", type=int, default=200, help="validity: jobs per format and mode")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        p.error(f"unknown parts: {sorted(parts - set(PARTS))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    print(f"# {info['cpu']}, {info['cpus']} cores, torch threads {info['torch_threads']}, torch {info['torch']}",
          flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_shape == "tiny":
            model_dir = build_tiny_model(Path(tmp) / "tiny")
        else:
            model_dir = Path(args.model) if args.model else fetch_model("smollm2-135m-instruct")
        # The demo adapter is trained for SmolLM2; any other model gets a random one of its shapes.
        adapter_dir = (DEMO_ADAPTER if model_dir.name == "smollm2-135m-instruct" else
                       build_sample_adapter(Path(tmp) / "adapter", model_dir, rank=16, alpha=16, std=0.05,
                                            target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
        engine = Engine(str(model_dir), EngineConfig(max_running=max(64, args.jobs), max_lora_rank=16, max_loras=2))
        engine.register(AdapterSpec(ADAPTER, str(adapter_dir)))
        engine.start()
        report = {"machine": info, "model": str(model_dir), "adapter": str(adapter_dir), "args": vars(args)}
        log = lambda line: print(line, flush=True)  # noqa: E731
        log(f"# model {model_dir.name}, adapter {adapter_dir.name}")
        try:
            if "throughput" in parts:
                report["throughput"] = throughput(engine, args, log)
            if "n" in parts:
                report["n"] = shared_prefill(engine, args, log)
            if "validity" in parts:
                report["validity"] = validity(engine, args, log)
            if "rows" in parts:
                report["rows"] = row_costs(engine, args, log)
        finally:
            engine.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
