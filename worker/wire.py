"""The one place where wire types (schemas) meet engine types (scheduler): a job becomes an engine
`Request`, and what the engine answers becomes a `JobResult`."""

from __future__ import annotations

from lorabus.scheduler import Completion, Request, SamplingParams
from lorabus.schemas import Job, JobResult, MixUsed, Usage
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
        params=SamplingParams(job.max_new_tokens, job.temperature, job.top_p, job.top_k, job.seed, tuple(job.stop)),
        deadline=job.deadline_ms / 1000 if job.deadline_ms is not None else None,
    )


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
    return JobResult(
        id=job.id, status="ok", **provenance(adapter), text=completion.text, token_ids=completion.token_ids,
        finish_reason=completion.finish_reason, usage=Usage(completion.prompt_tokens, len(completion.token_ids)), worker=worker,
    )

