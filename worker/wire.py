"""The one place where wire types (schemas) meet engine types (scheduler): a job becomes an engine
`Request`, and what the engine answers becomes a `JobResult`."""

from __future__ import annotations

import json

import msgspec

from lorabus.scheduler import Completion, OutputFormat, Request, SamplingParams, TokenLogprob
from lorabus.schemas import (Choice, ChoiceFormat, Job, JobResult, JsonObjectFormat, JsonSchemaFormat, MixUsed,
                             RegexFormat, TokenLogprob as WireLogprob, TopLogprob, Usage)
from lorabus.worker.registry import ResolvedAdapter


def to_request(job: Job, adapter: ResolvedAdapter | None, content_special_tokens: bool = False) -> Request:
    """The engine's request for a job; `content_special_tokens` is the worker's setting, which the job's own
    `content_special_tokens` overrides."""
    return Request(
        id=job.id, tenant=job.tenant, adapter=adapter.key if adapter else None,
        prompt=job.prompt, prompt_ids=job.prompt_ids,
        messages=[{"role": m.role, "content": m.content} for m in job.messages] if job.messages is not None else None,
        content_special_tokens=(job.content_special_tokens if job.content_special_tokens is not None
                                else content_special_tokens),
        params=sampling_params(job),
        deadline=job.deadline_ms / 1000 if job.deadline_ms is not None else None,
        output_format=output_format(job.response_format),
        n=job.n,
        stream_every=job.stream_every_tokens,
    )


def sampling_params(job: Job) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=job.max_new_tokens, temperature=job.temperature, top_p=job.top_p, top_k=job.top_k,
        seed=job.seed, stop=tuple(job.stop), min_p=job.min_p, repetition_penalty=job.repetition_penalty,
        presence_penalty=job.presence_penalty, frequency_penalty=job.frequency_penalty,
        logit_bias=tuple(sorted((job.logit_bias or {}).items())), min_new_tokens=job.min_new_tokens,
        ignore_eos=job.ignore_eos, stop_token_ids=tuple(job.stop_token_ids), logprobs=job.logprobs,
        prompt_logprobs=job.prompt_logprobs)


def output_format(fmt) -> OutputFormat | None:
    """The engine's form of a job's response_format. A schema keeps its written key order: the grammar writes an
    object's properties in the order the schema lists them (as OpenAI's and vLLM's do)."""
    match fmt:
        case None:
            return None
        case JsonSchemaFormat(schema=schema):
            return OutputFormat("json_schema", msgspec.json.encode(schema).decode())
        case JsonObjectFormat():
            return OutputFormat("json_object")
        case RegexFormat(pattern=pattern):
            return OutputFormat("regex", pattern)
        case ChoiceFormat(choices=choices):
            return OutputFormat("choice", json.dumps(choices, ensure_ascii=False))
    raise TypeError(f"unknown response format {type(fmt).__name__}")


def wire_logprobs(entries: list[TokenLogprob | None] | None) -> list | None:
    if entries is None:
        return None
    return [None if e is None else WireLogprob(e.id, e.text, e.logprob, [TopLogprob(*top) for top in e.top])
            for e in entries]


def provenance(adapter: ResolvedAdapter | None) -> dict:
    """The result fields that say what served a job: adapter and version (a mix: every member's), and the
    route that chose them."""
    if adapter is None:
        return {}
    route = adapter.route
    routed = {"task": route.task if route else None, "route_event_id": route.event_id if route else None}
    if adapter.mix:
        return {"mix": [MixUsed(m.name, m.version, weight) for m, weight in adapter.mix], **routed}
    return {"adapter": adapter.name, "adapter_version": adapter.version, **routed}


def ok_result(job: Job, adapter: ResolvedAdapter | None, completion: Completion, worker: str) -> JobResult:
    choices = None
    if completion.choices is not None:
        choices = [Choice(index=c.index, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
                          logprobs=wire_logprobs(c.logprobs)) for c in completion.choices]
    generated = sum(len(c.token_ids) for c in completion.choices) if completion.choices else len(completion.token_ids)
    return JobResult(
        id=job.id, status="ok", **provenance(adapter), text=completion.text, token_ids=completion.token_ids,
        finish_reason=completion.finish_reason, usage=Usage(completion.prompt_tokens, generated), worker=worker,
        logprobs=wire_logprobs(completion.logprobs), prompt_logprobs=wire_logprobs(completion.prompt_logprobs),
        choices=choices,
    )

