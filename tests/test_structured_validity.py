"""Structured output on the real model: SmolLM2-135M-Instruct sampling at temperature 1.0 (every job its own seed)
under five formats (an object holding a nested object with required keys, an enum, an array with minItems and
maxItems, a regex, a choice), on the base model and on the demo adapter `entities`, all submitted together. Every
output that finishes "stop" must be valid (jsonschema, re.fullmatch, one of the choices); outputs cut at
max_new_tokens ("length": the model wandering, e.g. JSON whitespace) must be few.

The formats and the checks are also the validity sweep of benchmarks/generation.py, which runs 200 jobs per
format and mode (2000 jobs: 8 minutes on 2 shared cores); this test runs JOBS_PER_FORMAT per format and mode.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from pathlib import Path

import jsonschema

from lorabus.scheduler import AdapterSpec, Engine, EngineConfig, OutputFormat, Request, SamplingParams

DEMO_ADAPTER = Path(__file__).resolve().parents[1] / "deploy" / "demo-adapters" / "entities"
JOBS_PER_FORMAT = 20  # per mode: 2 x 5 x 20 = 200 jobs
MAX_NEW = 96
# Cut at max_new_tokens, of a mode's jobs. The 2000-job sweep (docs/benchmarks.md) saw none in either mode
# since JSON compiles with fixed separators (with free whitespace: 5.7% on the adapter); the bound leaves room
# for sampling's spread over 100 jobs.
MAX_LENGTH_SHARE = 0.05
MIN_STOP_SHARE = 0.5  # of each format's jobs

# Strings and numbers are bounded, so a valid output fits in MAX_NEW tokens unless the model wanders.
SCHEMAS = {
    "nested object": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "address": {"type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 20},
                                       "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "light gray"]}},
             "required": ["color"], "additionalProperties": False},
    "array bounds": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                     "minItems": 2, "maxItems": 5},
}
REGEX = r"[A-Z][a-z]{1,9}-[0-9]{2,4}(\.[a-z]{1,3})?"
CHOICES = ["yes", "no", "it depends", "no comment"]
ASKS = {  # what each job asks for, so the model's own answer is near the format
    "nested object": "Give a person's name and address (city and zip code) as JSON.",
    "enum": "Pick a color and answer as JSON with a color field.",
    "array bounds": "List a few small numbers as a JSON array.",
    "regex": "Write a product code: a capitalized word, a dash and a number.",
    "choice": "Answer yes, no, it depends or no comment: is the sea blue?",
}


def formats() -> dict[str, OutputFormat]:
    out = {name: OutputFormat("json_schema", json.dumps(schema, sort_keys=True)) for name, schema in SCHEMAS.items()}
    out["regex"] = OutputFormat("regex", REGEX)
    out["choice"] = OutputFormat("choice", json.dumps(CHOICES))
    return out


def check(name: str, text: str) -> str | None:
    """Why `text` does not match format `name`; None if it does."""
    if name in SCHEMAS:
        try:
            jsonschema.validate(json.loads(text), SCHEMAS[name])
        except (ValueError, jsonschema.ValidationError) as exc:
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        return None
    if name == "regex":
        return None if re.fullmatch(REGEX, text) else "no full match"
    return None if text in CHOICES else "not one of the choices"


def validity_requests(per_format: int, adapter: str | None, tag: str, chat: bool) -> list[tuple[str, Request]]:
    """`per_format` sampled jobs under each format (chat `messages` where the model has a chat template, else a
    plain prompt), seeds distinct across both modes."""
    jobs = []
    for f, (name, fmt) in enumerate(formats().items()):
        for i in range(per_format):
            seed = (f * per_format + i) * 2 + (adapter is not None)
            ask = f"{ASKS[name]} ({i})"
            jobs.append((name, Request(f"{tag}-{name}-{adapter}-{i}", "t", adapter,
                                       messages=[{"role": "user", "content": ask}] if chat else None,
                                       prompt=None if chat else ask,
                                       params=SamplingParams(max_new_tokens=MAX_NEW, temperature=1.0, seed=seed),
                                       output_format=fmt)))
    return jobs


def tally(jobs: list[tuple[str, Request]], results: dict) -> dict[str, dict]:
    """Per format: jobs, stop, length, valid (of stop), the distinct texts and the first invalid outputs."""
    out: dict[str, dict] = {}
    for name, request in jobs:
        c = results[request.id]
        row = out.setdefault(name, {"jobs": 0, "stop": 0, "length": 0, "valid": 0, "texts": Counter(), "invalid": []})
        row["jobs"] += 1
        row[c.finish_reason] += 1
        row["texts"][c.text] += 1
        if c.finish_reason == "stop":
            why = check(name, c.text)
            if why is None:
                row["valid"] += 1
            elif len(row["invalid"]) < 3:
                row["invalid"].append({"id": c.id, "text": c.text, "why": why})
    return out


def test_sampled_outputs_match_their_format_with_and_without_adapter(smollm2):
    engine = Engine(str(smollm2), EngineConfig(kv_cache_mb=512, max_running=64, max_lora_rank=16, max_loras=2))
    engine.register(AdapterSpec("entities", str(DEMO_ADAPTER)))
    jobs = (validity_requests(JOBS_PER_FORMAT, None, "base", chat=True)
            + validity_requests(JOBS_PER_FORMAT, "entities", "adapter", chat=True))
    done, results, lock = threading.Event(), {}, threading.Lock()

    def on_done(c):
        with lock:
            results[c.id] = c
            if len(results) == len(jobs):
                done.set()

    engine.start()
    try:
        for _, request in jobs:
            engine.submit(request, on_done)
        assert done.wait(600), f"{len(results)}/{len(jobs)} answered"
    finally:
        engine.stop()
    failed = [c for c in results.values() if c.status != "ok"]
    assert not failed, failed[:3]
    for mode in ("base", "adapter"):
        rows = tally([(name, r) for name, r in jobs if r.id.startswith(mode + "-")], results)
        summary = {name: {k: row[k] for k in ("jobs", "stop", "length", "valid")} for name, row in rows.items()}
        for name, row in rows.items():
            assert row["valid"] == row["stop"], (mode, name, row["invalid"])
            assert row["stop"] >= MIN_STOP_SHARE * row["jobs"], (mode, summary)
            # Sampling, not one path the grammar forces: the seeds give different outputs (a choice may be
            # one the model is sure of).
            assert name == "choice" or len(row["texts"]) > 1, (mode, name, row["texts"])
        lengths = sum(row["length"] for row in rows.values())
        assert lengths <= MAX_LENGTH_SHARE * len(jobs) / 2, (mode, summary)
